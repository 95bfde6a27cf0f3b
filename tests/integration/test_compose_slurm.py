"""`nagaya submit --compose` on the private Slurm cluster (three slurmd on one host): replicas spread over
n1..n3 as srun steps, clients reach the http server by service name, and cancelling the job tears the
stack down on every node.

The three slurmd share this host and 127.0.0.1 (their NodeAddr), so `httpd` resolves to 127.0.0.1 wherever
it runs; per-node network namespaces with distinct IPs are not part of this cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, import_images, wait_for, wait_state

pytestmark = pytest.mark.integration
CWD: dict[str, Path] = {}

STACK = """\
services:
  httpd:
    image: bb
    command: ["sh", "-c", "mkdir -p $$HOME/www-c && echo hello from $$SLURMD_NODENAME > $$HOME/www-c/index.html \
&& exec httpd -f -p {port} -h $$HOME/www-c"]
    ports: ["{port}"]
    healthcheck:
      test: "wget -q -O- http://127.0.0.1:{port}/"
      interval: 300ms
      retries: 100
  client:
    image: bb
    deploy: {{replicas: 4}}
    depends_on: {{httpd: {{condition: service_healthy}}}}
    command: ["sh", "-c", "wget -q -O- http://httpd:{port}/ && echo on $$SLURMD_NODENAME \
&& echo \\"hosts $$NAGAYA_SERVICE_CLIENT_HOSTS\\" && exec sleep 600"]
"""


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "srun"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster().start()
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stack_over_three_nodes_then_cancel(user: User, cluster: SlurmCluster) -> None:
    d = CWD[user.name]
    f = d / "compose.yml"
    f.write_text(STACK.format(port=_free_port()))
    os.chown(f, user.uid, user.gid)
    before = {p.split()[0] for p in user.processes()}
    r = user.nagaya("submit", "--json", "--compose", str(f), "--nodes", "3", cwd=d)
    assert r.returncode == 0, r.stderr
    job = str(json.loads(r.stdout)["id"])
    ps_env = {"SLURM_JOB_ID": job}          # ps/logs/down find a job's stack by its id

    def ps() -> dict:
        r = user.nagaya("compose", "ps", "--json", "-f", str(f), env=ps_env, cwd=d)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    try:
        st = wait_for(lambda: (s := ps())["status"] in ("running", "failed") and s, 90, "the stack to come up",
                      every=0.3)
        assert st["status"] == "running", (st, user.nagaya("logs", job).stdout)
        assert st["backend"] == "slurm" and st["job"] == job
        nodes = {r["name"]: r["node"] for r in st["replicas"]}
        assert set(nodes.values()) == {"n1", "n2", "n3"}, nodes      # spread over every node

        def fetched() -> str:
            out = user.nagaya("compose", "logs", "client", "-f", str(f), env=ps_env, cwd=d).stdout
            return out if all(f"client-{i} | on {nodes[f'client-{i}']}" in out for i in range(1, 5)) else ""

        out = wait_for(fetched, 60, "every client to fetch from httpd by service name", every=0.3)
        assert out.count(f"hello from {nodes['httpd-1']}") == 4
        assert "hosts 127.0.0.1,127.0.0.1,127.0.0.1,127.0.0.1" in out
    finally:
        assert user.nagaya("cancel", job).returncode == 0
    assert wait_state(user, job, timeout=60)["state"] == "CANCELLED"
    wait_for(lambda: ps()["status"] in ("down", "failed"), 30, "the supervisor to record the teardown")
    wait_for(lambda: not ({p.split()[0] for p in user.processes()} - before), 30, "no process of the stack left")
    assert not cluster._stepds() - cluster.stepds_before or wait_for(
        lambda: not cluster._stepds() - cluster.stepds_before, 30, "every step to end")


def test_submit_compose_validates_first(user: User) -> None:
    d = CWD[user.name]
    f = d / "clash.yml"
    f.write_text("services:\n  web:\n    image: bb\n    ports: [9000]\n    deploy: {replicas: 3}\n")
    os.chown(f, user.uid, user.gid)
    r = user.nagaya("submit", "--compose", str(f), "--nodes", "2", cwd=d)
    assert r.returncode == 2 and "cannot place web-3: port 9000/tcp" in r.stderr, r.stderr
    r = user.nagaya("submit", "--compose", str(f), "--nodes", "3", "--backend", "local", cwd=d)
    assert r.returncode == 2 and "needs a Slurm backend" in r.stderr, r.stderr
