"""Grid Engine across hosts, as unprivileged users: a real Son of Grid Engine with three exec hosts (this host
and two execds in network and UTS namespaces of their own, tests/helpers/gridengine.py). `submit --nodes 3`
runs one task per host of the job's parallel environment ($PE_HOSTFILE, qrsh -inherit); `nagaya job exec`
enters the container on the host and task asked for, as a task of the job (qrsh -inherit, never ssh).
(`nagaya run --alloc` on Grid Engine, qrsh -pty, is tested in test_sched_gridengine.py.)"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers.gridengine import GridEngineCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, import_images, live_processes, wait_for, wait_state
from tests.integration.sched_helpers import submit as _submit

pytestmark = pytest.mark.integration

CWD: dict[str, Path] = {}
PROBE = "echo ns $(readlink /proc/self/ns/pid) rank $NAGAYA_NODE_RANK hosts $NAGAYA_JOB_HOSTS"
APP = PROBE + "; echo inside-$NAGAYA_NODE_RANK > /dev/only-in-the-job; while :; do sleep 0.2; done"


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[GridEngineCluster]:
    for exe in ("/usr/sbin/sge_qmaster", "/usr/sbin/sge_execd", "/usr/bin/qrsh", "ip", "unshare", "tmux"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = GridEngineCluster(gpus=2, extra_hosts=2).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def users(cluster: GridEngineCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    a, b = ensure_users(("nagaya-gh1", 1400000), ("nagaya-gh2", 1500000))
    dirs = []
    for u in (a, b):
        u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="gridengine",
                           NAGAYA_SCHED_STATE_DIR=str(u.home / ".local/share/nagaya/jobs-gh"))
        import_images(u, rootfs, app_layout)
        dirs.append(d := Path(tempfile.mkdtemp(prefix="gh-", dir=u.home)))
        os.chown(d, u.uid, u.gid)
        CWD[u.name] = d
    yield a, b
    for u in (a, b):
        wait_for(lambda u=u: not live_processes(u), 30, f"{u.name}'s processes to go: {live_processes(u)}")
        shutil.rmtree(u.home / ".local/share/nagaya/jobs-gh", ignore_errors=True)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def submit(u: User, *args: str, **kw: Any) -> str:
    kw.setdefault("cwd", CWD[u.name])
    return _submit(u, *args, **kw)


def _probes(u: User, job: str, n: int) -> dict[str, str]:
    """rank -> the probe line of that rank's container, once all n have started."""
    def ready() -> dict[str, str] | None:
        got = {x.split()[3]: x for x in u.nagaya("logs", job).stdout.splitlines() if x.startswith("ns ")}
        return got if len(got) >= n else None
    return wait_for(ready, 90, f"job {job}'s {n} tasks to start")


def test_one_task_per_host_and_exec_into_each(users: tuple[User, User], cluster: GridEngineCluster) -> None:
    alice, bob = users
    job = submit(alice, "--nodes", "3", "--image", "bb", "--", "sh", "-c", APP)
    probes = _probes(alice, job, 3)
    hosts = probes["0"].split()[-1].split(",")
    assert sorted(hosts) == sorted([cluster.host, *cluster.extra]), probes     # one task on each host
    assert len({p.split()[1] for p in probes.values()}) == 3                   # three containers
    for rank in ("0", "1", "2"):
        r = alice.nagaya("job", "exec", job, "--task", rank, "--", "sh", "-c", PROBE + "; cat /dev/only-in-the-job")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [probes[rank], f"inside-{rank}"]
    r = alice.nagaya("job", "exec", "--node", hosts[2], job, "--", "cat", "/dev/only-in-the-job")
    assert r.returncode == 0 and r.stdout == "inside-2\n", r.stderr
    r = alice.nagaya("job", "exec", job, "--", "sh", "-c", "exit 6")         # the first host's, its status
    assert r.returncode == 6
    r = alice.nagaya("job", "exec", "--node", "nowhere", job, "--", "true")
    assert r.returncode != 0 and "nowhere" in r.stderr
    # another user's job: the very answer a missing one gets
    theirs = bob.nagaya("job", "exec", job, "--", "id")
    missing = bob.nagaya("job", "exec", "999999", "--", "id")
    assert theirs.returncode == missing.returncode != 0
    assert theirs.stderr.replace(job, "ID") == missing.stderr.replace("999999", "ID") and theirs.stdout == ""
    info = json.loads(alice.nagaya("job", "show", job, "--json").stdout)
    assert info["state"] == "RUNNING", info
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=60)["state"] == "CANCELLED"
    wait_for(lambda: not [p for p in live_processes(alice) if "only-in-the-job" in p], 30,
             f"every host's task to end: {live_processes(alice)}")
    r = alice.nagaya("job", "exec", job, "--", "true")
    assert r.returncode != 0 and "has ended" in r.stderr


def test_cancel_reaches_every_host_and_suspend_is_refused(users: tuple[User, User]) -> None:
    alice, _ = users
    d = CWD[alice.name]
    job = submit(alice, "--nodes", "3", "--image", "bb", "--", "sh", "-c",
                 f"trap 'echo rank $NAGAYA_NODE_RANK cleans up; exit 7' TERM; i=0; "
                 f"while :; do i=$((i+1)); echo $i > {d}/count-$NAGAYA_NODE_RANK; sleep 0.1; done")
    files = [d / f"count-{r}" for r in range(3)]
    wait_for(lambda: all(f.exists() and f.read_text().strip() not in ("", "1") for f in files), 90, "3 counters")
    r = alice.nagaya("job", "suspend", job)            # qrsh -inherit tasks do not survive qmod -sj/-usj
    assert r.returncode != 0 and "several hosts" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=60)["state"] == "CANCELLED"
    # The first host's app gets TERM and time to clean up; the other hosts' qrsh -inherit tasks get it too, or
    # are KILLed as their client ends (a race inside Grid Engine): either way nothing of them is left.
    wait_for(lambda: "rank 0 cleans up" in alice.nagaya("logs", job).stdout, 20, "the app's TERM handler")
    wait_for(lambda: not [p for p in live_processes(alice) if "count-" in p], 30,
             f"every host's task to end: {live_processes(alice)}")


def test_a_failing_task_fails_the_job(users: tuple[User, User]) -> None:
    alice, _ = users
    job = submit(alice, "--nodes", "2", "--image", "bb", "--", "sh", "-c",
                 'echo rank $NAGAYA_NODE_RANK; exit $((NAGAYA_NODE_RANK == 1 ? 5 : 0))')
    info = wait_state(alice, job, timeout=90)
    assert info["state"] == "FAILED" and info["exit_code"] == 5, info
    out = alice.nagaya("logs", job).stdout.splitlines()
    assert sorted(x for x in out if x.startswith("rank")) == ["rank 0", "rank 1"], out


def test_compose_across_the_jobs_hosts(users: tuple[User, User], cluster: GridEngineCluster) -> None:
    """`submit --compose --nodes 3`: the stack's supervisor on the job's first host reads $PE_HOSTFILE, spreads
    the replicas over the hosts and starts the others' through qrsh -inherit; services find each other by name."""
    import socket

    from tests.integration.test_compose_slurm import CLIENT_SH, HTTPD_SH, STACK

    alice, _ = users
    d = CWD[alice.name] / "stack"
    d.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "compose.yml").write_text(STACK.format(port=port))
    (d / "httpd.sh").write_text(HTTPD_SH)
    (d / "client.sh").write_text(CLIENT_SH)
    alice.chown_tree(d)
    f = d / "compose.yml"
    r = alice.nagaya("submit", "--json", "--compose", str(f), "--nodes", "3", cwd=d)
    assert r.returncode == 0, r.stderr
    job = str(json.loads(r.stdout)["id"])
    env = {"NAGAYA_BATCH_JOB": f"gridengine {job}"}        # compose ps finds a job's stack by its id

    def ps() -> dict[str, Any]:
        r = alice.nagaya("compose", "ps", "--json", "-f", str(f), env=env, cwd=d)
        return dict(json.loads(r.stdout)) if r.returncode == 0 else {}
    try:
        st = wait_for(lambda: (s := ps()).get("status") in ("running", "failed") and s, 120, "the stack", every=0.5)
        assert st["status"] == "running" and st["backend"] == "gridengine", (st, alice.nagaya("logs", job).stdout)
        nodes = {x["name"]: x["node"] for x in st["replicas"]}
        assert set(nodes.values()) == {cluster.host, *cluster.extra}, nodes       # spread over every host
        server = nodes["httpd-1"]

        def fetched() -> str:
            out = alice.nagaya("compose", "logs", "client", "-f", str(f), env=env, cwd=d).stdout
            return out if all(f"client-{i} | hello from " in out for i in range(1, 5)) else ""
        out = wait_for(fetched, 90, "every client to fetch from httpd by service name", every=0.5)
        assert {nodes[f"client-{i}"] for i in range(1, 5)} - {server}, "no client on another host than httpd"
        assert all(f"client-{i} | hello from {server}" in out for i in range(1, 5)), out
    finally:
        alice.nagaya("cancel", job)
    assert wait_state(alice, job, timeout=60)["state"] in ("CANCELLED", "FAILED", "COMPLETED")
    wait_for(lambda: not [p for p in live_processes(alice) if "httpd" in p or "client.sh" in p], 60,
             f"every host's replicas to end: {live_processes(alice)}")
