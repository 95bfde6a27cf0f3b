"""OpenPBS across hosts, as unprivileged users: a real OpenPBS with two execution hosts (this host, and a second
pbs_mom in a network and UTS namespace of its own, tests/helpers/pbs.py). `submit --nodes 2` runs one task per
host of `$PBS_NODEFILE` (select=2, place=scatter), the other host's through PBS's own `pbs_tmrsh`; qdel and
the time limit give every host's app TERM and time to clean up before KILL; compose spreads a stack over the
job's hosts. After every test nothing of the user's is left on either host: no process, no mount."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers.pbs import PBS_EXEC, PBSCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, import_images, live_processes, show, wait_for, wait_state
from tests.integration.sched_helpers import submit as _submit

pytestmark = pytest.mark.integration

CWD: dict[str, Path] = {}
PROBE = "echo rank $NAGAYA_NODE_RANK on $(cat /proc/sys/kernel/hostname) hosts $NAGAYA_JOB_HOSTS"


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[PBSCluster]:
    for exe in ("sbin/pbs_server", "sbin/pbs_mom", "bin/qsub", "bin/pbs_tmrsh"):
        require(os.access(f"{PBS_EXEC}/{exe}", os.X_OK), f"{PBS_EXEC}/{exe} is not installed (bash deploy/openpbs.sh)")
    for exe in ("ip", "unshare"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = PBSCluster(gpus=2, extra_hosts=1, kill_delay=8).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def users(cluster: PBSCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    a, b = ensure_users(("nagaya-pm1", 6000000), ("nagaya-pm2", 6100000))
    dirs = []
    for u in (a, b):
        shutil.rmtree(u.home / ".local/share/nagaya/jobs-pm", ignore_errors=True)    # job ids restart at 0
        u.extra_env.clear()
        u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="pbs", NAGAYA_SCHED_KILL_GRACE="5",
                           NAGAYA_SCHED_STATE_DIR=str(u.home / ".local/share/nagaya/jobs-pm"))
        import_images(u, rootfs, app_layout)
        dirs.append(d := Path(tempfile.mkdtemp(prefix="pm-", dir=u.home)))
        os.chown(d, u.uid, u.gid)
        CWD[u.name] = d
    yield a, b
    for u in (a, b):
        shutil.rmtree(u.home / ".local/share/nagaya/jobs-pm", ignore_errors=True)     # job ids restart at 0
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def alice(users: tuple[User, User], cluster: PBSCluster) -> Iterator[User]:
    u = users[0]
    yield u
    nothing_left(u, cluster)


def nothing_left(u: User, cluster: PBSCluster) -> None:
    """No process of the user's on any host (one pid namespace here) and no mount of theirs in either host's
    mount table (the second host's mom runs in a mount namespace of `ip netns exec`)."""
    wait_for(lambda: not live_processes(u), 40, f"{u.name}'s processes to go: {live_processes(u)}")
    tables = cluster.mount_tables()
    assert len(tables) == 1 + len(cluster.extra), tables
    for table in tables:
        text = Path(table).read_text()
        assert f"user_id={u.uid}," not in text and str(u.home / ".local") not in text, (table, text)


def submit(u: User, *args: str, **kw: Any) -> str:
    kw.setdefault("cwd", CWD[u.name])
    return _submit(u, *args, **kw)


def logs(u: User, job: str) -> str:
    return str(u.nagaya("logs", job).stdout)


def test_one_task_per_host(alice: User, cluster: PBSCluster) -> None:
    """Each rank runs on its own host (their host names differ), sees both, and the job's status is rank 1's
    failure although rank 1 ended long before rank 0 (the wrapper keeps an early task's status)."""
    job = submit(alice, "--nodes", "2", "--image", "bb", "--", "sh", "-c",
                 PROBE + "; if [ $NAGAYA_NODE_RANK = 1 ]; then exit 5; fi; sleep 2")
    info = wait_state(alice, job, timeout=90)
    out = logs(alice, job)
    assert info["state"] == "FAILED" and info["exit_code"] == 5, (info, out)
    lines = sorted(x for x in out.splitlines() if x.startswith("rank "))
    both = f"{cluster.host},{cluster.extra[0]}"
    assert lines == [f"rank 0 on {cluster.host} hosts {both}", f"rank 1 on {cluster.extra[0]} hosts {both}"], out
    assert info["nodes"] == both, info
    raw = cluster.cmd("qstat", "-x", "-f", job).stdout
    assert "Resource_List.select = 2:ncpus=1" in raw and "Resource_List.place = scatter" in raw, raw
    ok = submit(alice, "--nodes", "2", "--image", "bb", "--", "sh", "-c", PROBE)
    assert wait_state(alice, ok, timeout=90)["state"] == "COMPLETED", logs(alice, ok)


def _counting(alice: User, *args: str) -> tuple[str, str]:
    """A 2-host job whose app counts into a file per rank and cleans up for a second on TERM."""
    tag = os.urandom(3).hex()
    job = submit(alice, "--nodes", "2", "--image", "bb", *args, "--", "sh", "-c",
                 "trap 'echo rank $NAGAYA_NODE_RANK got TERM on $(cat /proc/sys/kernel/hostname); sleep 1; "
                 "echo rank $NAGAYA_NODE_RANK cleaned up; exit 7' TERM; i=0; "
                 f"while :; do i=$((i+1)); echo $i > {CWD[alice.name]}/count-{tag}-$NAGAYA_NODE_RANK; sleep 0.1; done")
    return job, tag


def _wait_counting(alice: User, job: str, tag: str) -> list[Path]:
    def files() -> list[Path]:
        got = [f for f in CWD[alice.name].glob(f"count-{tag}-*") if f.read_text().strip() not in ("", "1")]
        return got if len(got) >= 2 else []
    return list(wait_for(files, 90, f"both ranks of job {job} to count ({logs(alice, job)})"))


def _cleaned_up_on_both(alice: User, job: str, cluster: PBSCluster) -> str:
    def both() -> str:
        out = logs(alice, job)
        return out if "rank 0 cleaned up" in out and "rank 1 cleaned up" in out else ""
    try:
        out = wait_for(both, 30, "both ranks' TERM handlers to finish")
    except AssertionError as e:
        end = (alice.home / ".local/share/nagaya/jobs-pm/pbs" / f"{job}.end").read_text()
        raise AssertionError(f"{e}: log {logs(alice, job)!r}, end {end!r}, "
                             f"{cluster.cmd('qstat', '-x', '-f', job, check=False).stdout}") from None
    assert f"rank 0 got TERM on {cluster.host}" in out and f"rank 1 got TERM on {cluster.extra[0]}" in out, out
    return out


def test_qdel_gives_term_on_every_host(alice: User, cluster: PBSCluster) -> None:
    job, tag = _counting(alice)
    files = _wait_counting(alice, job, tag)
    assert alice.nagaya("cancel", job).returncode == 0
    info = wait_state(alice, job, timeout=cluster.kill_delay + 40)
    assert info["state"] == "CANCELLED", info
    _cleaned_up_on_both(alice, job, cluster)
    for f in files:
        f.unlink()


def test_time_limit_gives_term_on_every_host(alice: User, cluster: PBSCluster) -> None:
    job, tag = _counting(alice, "--time", "0:06")
    files = _wait_counting(alice, job, tag)
    info = wait_state(alice, job, timeout=90)
    assert info["state"] == "TIMEOUT" and info["time_limit"] == 6, info
    _cleaned_up_on_both(alice, job, cluster)
    for f in files:
        f.unlink()


def test_an_app_ignoring_term_is_killed_on_every_host(alice: User, cluster: PBSCluster) -> None:
    """An app that traps TERM and carries on is KILLed everywhere after the grace: nothing of it is left."""
    job = submit(alice, "--nodes", "2", "--image", "bb", "--", "sh", "-c",
                 "trap 'echo rank $NAGAYA_NODE_RANK ignores TERM' TERM; echo rank $NAGAYA_NODE_RANK ready; "
                 "while :; do sleep 0.1; done")
    wait_for(lambda: "rank 0 ready" in (o := logs(alice, job)) and "rank 1 ready" in o, 90, "both ranks")
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=cluster.kill_delay + 40)["state"] == "CANCELLED"
    out = logs(alice, job)
    assert "rank 0 ignores TERM" in out and "rank 1 ignores TERM" in out, out


def test_compose_across_the_jobs_hosts(alice: User, cluster: PBSCluster) -> None:
    """`submit --compose --nodes 2`: the stack's supervisor on the job's first host reads $PBS_NODEFILE,
    spreads the replicas over both hosts and starts the other host's through pbs_tmrsh; a client on one host
    fetches from httpd on the other by service name; qdel ends every replica on both hosts."""
    from tests.integration.test_compose_slurm import CLIENT_SH, HTTPD_SH, STACK

    d = CWD[alice.name] / f"stack-{os.urandom(3).hex()}"
    d.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "compose.yml").write_text(STACK.format(port=port))
    (d / "httpd.sh").write_text(HTTPD_SH)
    (d / "client.sh").write_text(CLIENT_SH)
    alice.chown_tree(d)
    f = d / "compose.yml"
    r = alice.nagaya("submit", "--json", "--compose", str(f), "--nodes", "2", cwd=d)
    assert r.returncode == 0, r.stderr
    job = str(json.loads(r.stdout)["id"])
    env = {"NAGAYA_BATCH_JOB": f"pbs {job}"}        # compose ps finds a job's stack by its id

    def ps() -> dict[str, Any]:
        r = alice.nagaya("compose", "ps", "--json", "-f", str(f), env=env, cwd=d)
        return dict(json.loads(r.stdout)) if r.returncode == 0 else {}
    try:
        st = wait_for(lambda: (s := ps()).get("status") in ("running", "failed") and s, 120, "the stack", every=0.5)
        assert st["status"] == "running" and st["backend"] == "pbs", (st, logs(alice, job))
        nodes = {x["name"]: x["node"] for x in st["replicas"]}
        assert set(nodes.values()) == {cluster.host, *cluster.extra}, nodes       # spread over both hosts
        server = nodes["httpd-1"]

        def fetched() -> str:
            out = alice.nagaya("compose", "logs", "client", "-f", str(f), env=env, cwd=d).stdout
            return out if all(f"client-{i} | hello from " in out for i in range(1, 5)) else ""
        out = wait_for(fetched, 90, "every client to fetch from httpd by service name", every=0.5)
        assert {nodes[f"client-{i}"] for i in range(1, 5)} - {server}, "no client on another host than httpd"
        assert all(f"client-{i} | hello from {server}" in out for i in range(1, 5)), out
    finally:
        alice.nagaya("cancel", job)
    assert wait_state(alice, job, timeout=cluster.kill_delay + 40)["state"] in ("CANCELLED", "FAILED", "COMPLETED")
    # every replica, on either host, ended on the stop signal (TERM: 143), none was KILLed (137)
    st = ps()
    assert st.get("status") == "down", st
    assert {x["name"]: x["exit_code"] for x in st["replicas"]} == {x["name"]: 143 for x in st["replicas"]}, st


def _root_nagaya(cluster: PBSCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """nagaya as root (a PBS manager): suspending is an operator action in PBS."""
    first = os.environ.get("NAGAYA_TEST_BIN", "")
    env = {**os.environ, **cluster.env, "NAGAYA_SCHED_BACKEND": "pbs",
           "PATH": f"{first}:{os.environ['PATH']}" if first else os.environ["PATH"]}
    return subprocess.run(["nagaya", *args], capture_output=True, text=True, timeout=60, env=env)


def test_suspend_and_resume_reach_every_host(alice: User, cluster: PBSCluster) -> None:
    """PBS's own suspend stops every host's tasks (the other hosts' through their moms) and resume continues
    them; then qdel ends both."""
    job, tag = _counting(alice)
    files = _wait_counting(alice, job, tag)
    r = alice.nagaya("job", "suspend", job)
    assert r.returncode != 0 and "operator" in r.stderr, r.stderr
    r = _root_nagaya(cluster, "job", "suspend", job)
    assert r.returncode == 0, r.stderr
    wait_state(alice, job, ("SUSPENDED",), 20)

    def counts() -> list[str]:
        return [f.read_text() for f in files]
    frozen = wait_for(lambda: (a := counts()) == (time.sleep(0.5), counts())[1] and a, 30, "both ranks to stop")
    time.sleep(2)
    assert counts() == frozen and show(alice, job)["state"] == "SUSPENDED"
    r = _root_nagaya(cluster, "job", "resume", job)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: all(a != b for a, b in zip(counts(), frozen, strict=True)), 20, "both ranks to continue")
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=cluster.kill_delay + 40)["state"] == "CANCELLED"
    _cleaned_up_on_both(alice, job, cluster)
    for f in files:
        f.unlink()
