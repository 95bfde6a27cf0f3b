"""The compose models, interpolation and placement, without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from nagaya.compose.placement import _indices, gpu_pools, hosts_file, job_gpu_indices, place, service_env
from nagaya.compose.spec import interpolate, load, parse
from nagaya.errors import UsageError


def test_interpolation() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("${A} $A ${B:-x} ${EMPTY:-d} ${EMPTY-d} $${A} ${B:-${A}}", env) == "1 1 x d  ${A} 1"
    with pytest.raises(UsageError, match=r"services\.web\.image: variable B is required: give B"):
        interpolate({"services": {"web": {"image": "${B:?give B}"}}}, env)


def test_short_forms_are_normalised() -> None:
    p = parse({"services": {"web": {
        "image": "bb", "command": "httpd -f -p 80", "environment": ["K=V", "FLAG=true"],
        "ports": ["8080:80/udp", 9000], "volumes": ["./data:/data:ro"], "depends_on": ["db"],
        "healthcheck": {"test": ["CMD", "true"], "interval": "1m30s", "timeout": "500ms"}},
        "db": {"image": "bb", "environment": {"N": 1, "B": True}}}}, {})
    web = p.services["web"]
    assert web.command == ["httpd", "-f", "-p", "80"] and web.environment == {"K": "V", "FLAG": "true"}
    assert [(x.target, x.published, x.protocol, x.host_port) for x in web.ports] == \
        [(80, 8080, "udp", 8080), (9000, None, "tcp", 9000)]
    assert web.volumes[0].source == "./data" and web.volumes[0].read_only
    assert web.depends_on["db"].condition == "service_started"
    assert web.healthcheck is not None and web.healthcheck.interval == 90 and web.healthcheck.timeout == 0.5
    assert web.healthcheck.argv == ["true"]
    assert p.services["db"].environment == {"N": "1", "B": "true"}
    assert p.order() == ["db", "web"]


@pytest.mark.parametrize("svc,where", [
    ({"image": "bb", "x-nagaya": {"cpus": 2}}, "services.web.x-nagaya.cpus"),
    ({"image": "bb", "volumes": [{"type": "npipe", "source": "v", "target": "/v"}]}, "services.web.volumes[0].type"),
    ({"image": "bb", "volumes": [{"type": "volume", "source": "v", "target": "/v"}]}, "services.web.volumes[0]"),
    ({"image": "bb", "healthcheck": {"test": ["BOGUS"]}}, "services.web.healthcheck.test"),
    ({"image": "bb", "deploy": {"resources": {"limits": {"cpu": 2}}}}, "services.web.deploy.resources.limits.cpu"),
])
def test_unsupported_keys_name_their_path(svc: dict, where: str) -> None:
    with pytest.raises(UsageError, match=f"compose file: {where.replace('[', '.').replace(']', '.')}"):
        parse({"services": {"web": svc}}, {})


def test_dotenv_fills_what_the_environment_lacks(tmp_path: Path) -> None:
    (tmp_path / "compose.yml").write_text("services:\n  web:\n    image: ${IMG}\n    command: echo ${MSG}\n")
    (tmp_path / ".env").write_text("# comment\nIMG=from-dotenv\nexport MSG='hi there'\n")
    p = load(tmp_path / "compose.yml", {"IMG": "from-env"})
    assert p.services["web"].image == "from-env" and p.services["web"].command == ["echo", "hi", "there"]
    assert p.name == tmp_path.name.lower().replace(".", "")


def test_placement_spreads_and_refuses_port_clashes() -> None:
    p = parse({"services": {"web": {"image": "bb", "ports": [80]},
                            "worker": {"image": "bb", "deploy": {"replicas": 5}},
                            "gpu": {"image": "bb", "x-nagaya": {"nodes": ["n3"], "gpus": 1},
                                    "deploy": {"replicas": 2}}}}, {})
    reps = place(p, ["n1", "n2", "n3"])
    nodes = [r.node for r in reps]
    assert sorted(nodes) == ["n1", "n1", "n2", "n2", "n3", "n3", "n3", "n3"]
    assert {r.node for r in reps if r.service == "gpu"} == {"n3"}
    addrs = {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}
    hosts = hosts_file(p, reps, addrs)
    web_node = next(r.node for r in reps if r.service == "web")
    assert f"{addrs[web_node]}\tweb\n" in hosts and hosts.count("\ttasks.worker\n") == 5
    assert service_env(p, reps, addrs)["NAGAYA_SERVICE_GPU_HOSTS"] == "10.0.0.3,10.0.0.3"
    clash = parse({"services": {"a": {"image": "bb", "ports": ["8080:80"]},
                                "b": {"image": "bb", "ports": [8080], "deploy": {"replicas": 2}}}}, {})
    assert len(place(clash, ["n1", "n2", "n3"])) == 3
    with pytest.raises(UsageError, match="cannot place b-2: port 8080/tcp"):
        place(clash, ["n1", "n2"])


def test_placement_hands_out_disjoint_gpus() -> None:
    p = parse({"services": {"train": {"image": "bb", "x-nagaya": {"gpus": 2}, "deploy": {"replicas": 2}},
                            "infer": {"image": "bb", "x-nagaya": {"gpus": 1}, "deploy": {"replicas": 4}},
                            "cpu": {"image": "bb", "deploy": {"replicas": 2}}}}, {})
    reps = place(p, ["n1", "n2"], {"n1": [0, 1, 2, 3], "n2": [4, 5, 6, 7]})
    held = [(r.node, g) for r in reps for g in r.gpus]
    assert len(held) == len(set(held)) == 8                     # every GPU once, none twice
    assert sorted(len(r.gpus) for r in reps if r.service == "train") == [2, 2]
    assert all(len(r.gpus) == 1 for r in reps if r.service == "infer")
    assert all(not r.gpus for r in reps if r.service == "cpu")
    assert all(g in {"n1": [0, 1, 2, 3], "n2": [4, 5, 6, 7]}[n] for n, g in held)
    with pytest.raises(UsageError, match=r"cannot place infer-4: it needs 1 GPU\(s\) and no node it may run on "
                                         r"has that many free \(n1: 0 of 4, n2: 0 of 3\)"):
        place(p, ["n1", "n2"], {"n1": [0, 1, 2, 3], "n2": [4, 5, 6]})
    assert len(place(p, ["n1", "n2"])) == 8                     # validation without nodes: GPUs not checked


def test_gpu_pool_honours_the_jobs_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"nvidia{i}").touch()
    (tmp_path / "nvidiactl").touch()
    monkeypatch.delenv("SLURM_JOB_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_pools("local", ["h"], str(tmp_path), {}) == {"h": [0, 1, 2, 3]}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert gpu_pools("local", ["h"], str(tmp_path), {}) == {"h": [1, 3]}
    monkeypatch.setenv("SLURM_JOB_GPUS", "2")
    assert gpu_pools("local", ["h"], str(tmp_path), {}) == {"h": [2]}
    assert _indices("0,2-4,7") == [0, 2, 3, 4, 7]

    # Slurm 22.05's `scontrol -d show job` for `--gres=gpu:2 -N2` (with and without a GPU type).
    detail = ("   JOB_GRES=gpu:4\n     Nodes=n[1-2] CPU_IDs=0 Mem=0 GRES=gpu:2(IDX:0-1)\n   TresPerNode=gres:gpu:2\n"
              "     Nodes=n3 CPU_IDs=0-1 Mem=0 GRES=gpu:a100:2(IDX:1,3),mps:0\n")
    assert job_gpu_indices(detail) == [("n[1-2]", [0, 1]), ("n3", [1, 3])]
