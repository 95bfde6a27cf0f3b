"""`nagaya submit --compose` on a private Slurm cluster whose three nodes live in network namespaces of their
own (hostnames n1..n3, addresses 10.77.0.11..13 on a host bridge; tests/helpers/slurm.py): replicas spread
over the nodes as srun steps, four clients reach the healthchecked http server by service name across nodes,
and SIGINT to `compose up` or cancelling the job tears the stack down on every node. The same stack runs on
the local backend in test_compose.py. GPUs (Slurm GRES): replicas on one node get disjoint ones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.fake_gpu import fake_gpus
from tests.helpers.ports import free_port
from tests.helpers.slurm import SlurmCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, import_images, wait_for, wait_state

pytestmark = pytest.mark.integration
CWD: dict[str, Path] = {}

STACK = """\
services:
  httpd:
    image: bb
    command: ["sh", "/stack/httpd.sh"]
    environment: {{PORT: "{port}"}}
    volumes: ["./:/stack:ro"]
    ports: ["{port}"]
    healthcheck:
      test: "wget -q -O- http://127.0.0.1:{port}/"
      interval: 5s
      start_interval: 300ms
      retries: 100
  client:
    image: bb
    deploy: {{replicas: 4}}
    depends_on: {{httpd: {{condition: service_healthy}}}}
    environment: {{PORT: "{port}"}}
    volumes: ["./:/stack:ro"]
    command: ["sh", "/stack/client.sh"]
"""
HTTPD_SH = """\
mkdir -p "$HOME/www-$PORT" && echo "hello from $(hostname)" > "$HOME/www-$PORT/index.html"
exec httpd -f -p "$PORT" -h "$HOME/www-$PORT"
"""
CLIENT_SH = """\
wget -q -O- "http://httpd:$PORT/" || exit 1
echo "on $(hostname) $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "hosts $NAGAYA_SERVICE_CLIENT_HOSTS"
exec sleep 600
"""


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "ip", "nsenter"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster(netns=True, gpus=2).start()       # two GPUs per node as GRES (fake devices)
    yield c
    c.stop()
    assert not c._stepds() - c.stepds_before, "job steps left behind"


@pytest.fixture(scope="module")
def user(cluster: SlurmCluster, rootfs: Path, app_layout: Path) -> Iterator[User]:
    u, _ = ensure_users(("nagaya-s1", 500000), ("nagaya-s2", 700000))
    u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="slurm")
    import_images(u, rootfs, app_layout)
    d = Path(tempfile.mkdtemp(prefix="compose-slurm-", dir=u.home))
    os.chown(d, u.uid, u.gid)
    CWD[u.name] = d
    yield u
    shutil.rmtree(d, ignore_errors=True)


def _pids(user: User) -> set[str]:
    return {p.split()[0] for p in user.processes()}


def _stack(user: User, name: str) -> Path:
    d = user.mkdir(CWD[user.name] / name)
    (d / "compose.yml").write_text(STACK.format(port=free_port()))
    (d / "httpd.sh").write_text(HTTPD_SH)
    (d / "client.sh").write_text(CLIENT_SH)
    user.chown_tree(d)
    return d / "compose.yml"


class Up:
    """A stack submitted with `nagaya submit --compose --nodes 3`, watched through `compose ps/logs`."""

    def __init__(self, user: User, f: Path) -> None:
        self.user, self.f = user, f
        r = user.nagaya("submit", "--json", "--compose", str(f), "--nodes", "3", cwd=f.parent)
        assert r.returncode == 0, r.stderr
        self.job = str(json.loads(r.stdout)["id"])
        self.env = {"SLURM_JOB_ID": self.job}          # ps/logs/down find a job's stack by its id

    def ps(self) -> dict:
        r = self.user.nagaya("compose", "ps", "--json", "-f", str(self.f), env=self.env, cwd=self.f.parent)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def logs(self, service: str) -> str:
        return self.user.nagaya("compose", "logs", service, "-f", str(self.f), env=self.env, cwd=self.f.parent).stdout

    def running(self) -> dict:
        st = wait_for(lambda: (s := self.ps())["status"] in ("running", "failed") and s, 120, "the stack to come up",
                      every=0.3)
        assert st["status"] == "running", (st, self.user.nagaya("logs", self.job).stdout)
        assert st["backend"] == "slurm" and st["job"] == self.job
        return st

    def fetched(self, nodes: dict[str, str]) -> str:
        def done() -> str:
            out = self.logs("client")
            return out if all(f"client-{i} | on {nodes[f'client-{i}']} " in out for i in range(1, 5)) else ""

        return wait_for(done, 60, "every client to fetch from httpd by service name", every=0.3)


def _gone_everywhere(user: User, cluster: SlurmCluster, before: set[str]) -> None:
    wait_for(lambda: not (_pids(user) - before), 30, "no process of the stack left on any node")
    for n in cluster.nodes:         # nothing of the user's left in any node's namespace (and none moved out)
        assert not [p for p in _pids(user) if cluster.node_of(p) == n], n
    with open("/proc/mounts") as f:     # one mount namespace for every node: no FUSE or overlay left over
        assert not [m for m in f if m.split()[2].startswith(("fuse", "overlay")) and
                    (str(user.home) in m or "nagaya" in m)]
    wait_for(lambda: not cluster._stepds() - cluster.stepds_before, 30, "every job step to end")


def test_stack_across_namespaced_nodes_then_sigint(user: User, cluster: SlurmCluster) -> None:
    before = _pids(user)
    up = Up(user, _stack(user, "sigint"))
    try:
        st = up.running()
        nodes = {r["name"]: r["node"] for r in st["replicas"]}
        assert set(nodes.values()) == {"n1", "n2", "n3"}, nodes      # spread over every node
        assert next(r for r in st["replicas"] if r["name"] == "httpd-1")["health"] == "healthy"
        server = nodes["httpd-1"]
        out = up.fetched(nodes)
        for i in range(1, 5):
            node = nodes[f"client-{i}"]
            # Each replica saw its node's own hostname and address, and fetched from the server's node.
            assert f"client-{i} | on {node} {cluster.addr(node)}/24" in out, out
            assert f"client-{i} | hello from {server}" in out, out
        assert {nodes[f"client-{i}"] for i in range(1, 5)} - {server}, "no client on another node than httpd"
        addrs = ",".join(cluster.addr(nodes[f"client-{i}"]) for i in range(1, 5))
        assert f"hosts {addrs}" in out
        hosts = Path(st["replicas"][0]["log"]).parent.parent / "hosts"
        assert f"{cluster.addr(server)}\thttpd\n" in hosts.read_text()
        # The stack's processes run inside the nodes' namespaces, on every node.
        assert {cluster.node_of(p) for p in _pids(user) - before} >= {"n1", "n2", "n3"}
        supervisor = int(st["pid"])
        assert cluster.node_of(supervisor) == "n1"      # the batch step, on the job's first node
        os.kill(supervisor, signal.SIGINT)              # as ^C would: compose up stops the whole stack
        wait_for(lambda: up.ps()["status"] == "down", 60, "the supervisor to record the teardown")
    finally:
        user.nagaya("cancel", up.job)
    assert wait_state(user, up.job, timeout=60)["state"] in ("FAILED", "CANCELLED", "COMPLETED")
    assert all(r["state"] == "exited" for r in up.ps()["replicas"])
    _gone_everywhere(user, cluster, before)


def test_cancelling_the_job_tears_the_stack_down(user: User, cluster: SlurmCluster) -> None:
    before = _pids(user)
    up = Up(user, _stack(user, "cancel"))
    try:
        st = up.running()
        up.fetched({r["name"]: r["node"] for r in st["replicas"]})
    finally:
        assert user.nagaya("cancel", up.job).returncode == 0
    assert wait_state(user, up.job, timeout=60)["state"] == "CANCELLED"
    wait_for(lambda: up.ps()["status"] in ("down", "failed"), 30, "the supervisor to record the teardown")
    _gone_everywhere(user, cluster, before)


GPUS = """\
services:
  train:
    image: bb
    deploy: {replicas: 4}
    x-nagaya: {gpus: 1, nodes: 2}
    command: ["sh", "-c", "echo on $$(hostname) devs $$(ls /dev | grep nvidia | sort | tr '\\n' ' ') \
nv=$$NVIDIA_VISIBLE_DEVICES cuda=$$CUDA_VISIBLE_DEVICES"]
"""


def test_replicas_on_a_node_get_disjoint_gpus(user: User, cluster: SlurmCluster) -> None:
    # The job's GPUs per node come from Slurm (GRES IDX); two replicas per node, one GPU each.
    gpu_env = {"NAGAYA_GPU_DEV_DIR": str(cluster.gpu_dev_dir)}
    d = user.mkdir(CWD[user.name] / "gpus")
    (d / "compose.yml").write_text(GPUS)
    user.chown_tree(d)
    f = d / "compose.yml"
    r = user.nagaya("submit", "--json", "--compose", str(f), "--nodes", "3", "--gpus", "6", cwd=d, env=gpu_env)
    assert r.returncode == 0, r.stderr
    job = str(json.loads(r.stdout)["id"])
    assert wait_state(user, job, timeout=90)["state"] == "COMPLETED", user.nagaya("logs", job).stdout
    ps = user.nagaya("compose", "ps", "--json", "-f", str(f), env={"SLURM_JOB_ID": job}, cwd=d)
    reps = json.loads(ps.stdout)["replicas"]
    by_node: dict[str, list[list[int]]] = {}
    for x in reps:
        by_node.setdefault(x["node"], []).append(x["gpus"])
    assert len(by_node) == 2 and all(sorted(g) == [[0], [1]] for g in by_node.values()), by_node
    out = user.nagaya("compose", "logs", "-f", str(f), env={"SLURM_JOB_ID": job}, cwd=d).stdout
    for x in reps:
        g = x["gpus"][0]
        assert f"{x['name']} | on {x['node']} devs nvidia{g} nvidiactl nv={g} cuda=0" in out, out
    # A job without GPUs on nodes whose GPUs Slurm manages: the stack fails at once, saying why.
    r = user.nagaya("submit", "--json", "--compose", str(f), "--nodes", "2", cwd=d, env=gpu_env)
    job = str(json.loads(r.stdout)["id"])
    assert wait_state(user, job, timeout=60)["state"] == "FAILED"
    log = user.nagaya("logs", job).stdout + user.nagaya("logs", job).stderr
    assert "x-nagaya.gpus: this job has no GPUs on n1, n2 (submit with --gpus or --gres=gpu:N)" in log, log


def test_submit_compose_validates_first(user: User) -> None:
    d = CWD[user.name]
    f = d / "clash.yml"
    f.write_text("services:\n  web:\n    image: bb\n    ports: [9000]\n    deploy: {replicas: 3}\n")
    os.chown(f, user.uid, user.gid)
    r = user.nagaya("submit", "--compose", str(f), "--nodes", "2", cwd=d)
    assert r.returncode == 2 and "cannot place web-3: port 9000/tcp" in r.stderr, r.stderr
    r = user.nagaya("submit", "--compose", str(f), "--nodes", "3", "--backend", "local", cwd=d)
    assert r.returncode == 2 and "needs a Slurm backend" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["webapp", "swarm", "gpu", "hpc"])
def test_corpus_runs_unchanged_on_slurm(user: User, cluster: SlurmCluster, name: str) -> None:
    """The corpus of test_compose_corpus.py, submitted as it is with `submit --compose` over three nodes: the
    same ignored-key lines as locally (at submit), services reaching each other by name across nodes, and
    SIGINT to the supervisor stopping every replica with its stop_signal."""
    from tests.integration.test_compose_corpus import copy_stack, corpus_env, expected_ignored, ignored_lines

    env = corpus_env(user)
    args = ["--nodes", "3"]
    if name == "gpu":               # the cluster's GRES devices; driver files and nvidia-smi from the fakes
        env.update(fake_gpus(Path("/tmp/nagaya-fake-gpu-corpus-slurm"), 2),
                   NAGAYA_GPU_DEV_DIR=str(cluster.gpu_dev_dir))
        args += ["--gpus", "6"]
    f = copy_stack(user, user.mkdir(CWD[user.name] / f"corpus-{name}"), name)
    before = _pids(user)
    r = user.nagaya("submit", "--json", "--compose", str(f), *args, cwd=f.parent, env=env)
    assert r.returncode == 0, r.stderr
    assert ignored_lines(r.stderr) == expected_ignored(f, env), r.stderr
    job = str(json.loads(r.stdout)["id"])
    jenv = {**env, "SLURM_JOB_ID": job}

    def ps() -> dict:
        out = user.nagaya("compose", "ps", "--json", "-f", str(f), env=jenv, cwd=f.parent)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def logs() -> str:
        return user.nagaya("compose", "logs", "-f", str(f), env=jenv, cwd=f.parent).stdout

    try:
        st = wait_for(lambda: (s := ps())["status"] in ("running", "failed") and s, 120, "the stack", every=0.3)
        assert st["status"] == "running", (st, user.nagaya("logs", job).stdout)
        nodes = {r["name"]: r["node"] for r in st["replicas"]}
        if name == "webapp":
            out = wait_for(lambda: "web on web " in (o := logs()) and o, 60, "the web app", every=0.3)
            assert "webapp-web | web on web env=production db=ok cache=+PONG secret=9 meta=1" in out, out
            assert len({nodes["webapp-web"], nodes["db-1"], nodes["cache-1"]}) == 3, nodes
        elif name == "swarm":
            assert nodes["api-1"] == "n1"                             # node.role == manager: the job's first
            assert sorted(n for k, n in nodes.items() if k.startswith("agent-")) == ["n1", "n2", "n3"]
            out = wait_for(lambda: all(f"worker-{i} | worker on " in (o := logs()) for i in (1, 2, 3)) and o, 60,
                           "every worker", every=0.3)
            assert "worker-1 | api on n1" in out, out
            for i in (1, 2, 3):
                assert f"worker-{i} | worker on {nodes[f'worker-{i}']} ok" in out, out
        elif name == "gpu":
            held = [(nodes[r["name"]], tuple(r["gpus"])) for r in st["replicas"] if r["service"] == "inference"]
            assert len(held) == 2 and all(len(g) == 1 for _, g in held), held
            out = wait_for(lambda: (o := logs()).count("NVIDIA-SMI fake") == 2 and o, 60, "both replicas", every=0.3)
            for r in (x for x in st["replicas"] if x["service"] == "inference"):
                assert f"{r['name']} | serving resnet50 on {r['node']} gpus=0 devs=1" in out, out
        else:
            out = wait_for(lambda: "client-2 | client 2 done" in (o := logs()) and "client-1 | client 1 done" in o
                           and o, 60, "the clients", every=0.3)
            assert f"server-1 | server up as {user.uid} on server0" in out, out
        os.kill(int(st["pid"]), signal.SIGINT)
        wait_for(lambda: ps()["status"] == "down", 60, "the supervisor to record the teardown")
        if name == "hpc":
            assert "server-1 | server0 got USR1, checkpointing" in logs()
    finally:
        user.nagaya("cancel", job)
    wait_state(user, job, timeout=60)
    _gone_everywhere(user, cluster, before)
