"""`nagaya submit` & co. on a real Grid Engine (Son of Grid Engine 8.1.9: qmaster + execd on loopback) as
unprivileged users: the conformance checks of the Slurm suite, on Grid Engine's own terms."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers.gridengine import GridEngineCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import (
    digest_of,
    ensure_users,
    import_images,
    live_processes,
    show,
    wait_for,
    wait_state,
)
from tests.integration.sched_helpers import submit as _submit

pytestmark = pytest.mark.integration

CWD: dict[str, Path] = {}
TRAP = "trap 'echo cleaning up; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
COUNT = "i=0; while :; do i=$((i+1)); echo $i > {f}; sleep 0.1; done"


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[GridEngineCluster]:
    for exe in ("/usr/sbin/sge_qmaster", "/usr/sbin/sge_execd", "/usr/bin/qsub", "/usr/bin/qacct"):
        require(os.access(exe, os.X_OK), f"{exe} is not installed (bash deploy/install.sh)")
    c = GridEngineCluster(gpus=2).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def sched_users(cluster: GridEngineCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    a, b = ensure_users(("nagaya-ge1", 800000), ("nagaya-ge2", 900000))
    dirs = []
    for u in (a, b):
        u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="gridengine",
                           NAGAYA_SCHED_STATE_DIR=str(u.home / ".local/share/nagaya/jobs-ge"))
        import_images(u, rootfs, app_layout)
        dirs.append(d := Path(tempfile.mkdtemp(prefix="ge-", dir=u.home)))
        os.chown(d, u.uid, u.gid)
        CWD[u.name] = d
    yield a, b
    for u in (a, b):          # every job's end left nothing of it running
        wait_for(lambda u=u: not live_processes(u), 20, f"{u.name}'s processes to go: {live_processes(u)}")
    for u in (a, b):          # job records and logs: a later cluster reuses job ids
        shutil.rmtree(u.home / ".local/share/nagaya/jobs-ge", ignore_errors=True)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def alice(sched_users: tuple[User, User]) -> User:
    return sched_users[0]


@pytest.fixture
def bob(sched_users: tuple[User, User]) -> User:
    return sched_users[1]


def submit(u: User, *args: str, **kw: Any) -> str:
    kw.setdefault("cwd", CWD[u.name])
    return _submit(u, *args, **kw)


def logs(u: User, job: str) -> str:
    return u.nagaya("logs", job).stdout


def no_leftovers(u: User, marker: str) -> None:
    """After a job's end: none of its processes and no mount of it in the host's namespace."""
    wait_for(lambda: not [p for p in live_processes(u) if marker in p], 15,
             f"the job's processes to go: {live_processes(u)}")
    mounts = Path("/proc/mounts").read_text()
    assert f"user_id={u.uid}," not in mounts, mounts


def test_job_runs_and_reports(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--name", "one", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    ok = submit(alice, "--image", "bb", "--", "true")
    info = wait_state(alice, job, timeout=30)
    assert info["state"] == "FAILED" and info["exit_code"] == 3, info
    assert info["digest"] == digest_of(alice, "bb") and info["nodes"] and info["name"] == "one"
    assert info["backend"] == "gridengine" and info["end_time"] and info["submit_time"], info
    assert set(logs(alice, job).splitlines()) == {"out", "err"}
    assert wait_state(alice, ok, timeout=30)["state"] == "COMPLETED"
    running = submit(alice, "--image", "bb", "--name", "listed", "--", "sleep", "30")
    assert wait_state(alice, running, ("RUNNING",), 30)["submit_time"]
    r = alice.nagaya("jobs")
    assert r.returncode == 0 and running in r.stdout and "listed" in r.stdout, r.stdout
    assert alice.nagaya("cancel", running).returncode == 0
    assert wait_state(alice, running, timeout=30)["state"] == "CANCELLED"


def test_resources_and_follow(alice: User) -> None:
    """--cpus through the smp PE (NSLOTS), --mem as h_vmem per slot (the job's limit is the whole 256M)."""
    job = submit(alice, "--image", "bb", "--cpus", "2", "--mem", "256M", "--", "sh", "-c",
                 "echo slots $NSLOTS vmem $(ulimit -v); sleep 1; echo done")
    r = alice.nagaya("logs", "-f", job, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines() == ["slots 2 vmem 262144", "done"], r.stdout + r.stderr
    info = show(alice, job)
    assert info["state"] == "COMPLETED" and info["cpus"] == 2, info


def test_script_form(alice: User) -> None:
    d = CWD[alice.name]
    script = d / "job.sh"
    script.write_text("#!/bin/sh\n#NAGAYA --image bb\n#$ -N scripted\n"
                      "echo \"args: $*\"; cat /app/data.txt; pwd\n")
    os.chown(script, alice.uid, alice.gid)
    job = submit(alice, str(script), "a1", cwd=d)
    info = wait_state(alice, job, timeout=30)
    assert info["state"] == "COMPLETED" and info["name"] == "scripted", logs(alice, job)
    assert logs(alice, job).splitlines() == ["args: a1", "image data", str(d)]


def test_cancel_lets_the_app_clean_up(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--", "sh", "-c", TRAP)
    wait_for(lambda: "ready" in logs(alice, job), 30, "the app to start")
    assert alice.nagaya("cancel", job).returncode == 0
    info = wait_state(alice, job, timeout=30)
    assert info["state"] == "CANCELLED" and info["exit_code"] == 7, info
    assert "cleaning up" in logs(alice, job).splitlines()
    no_leftovers(alice, "cleaning up")
    assert alice.nagaya("cancel", job).returncode != 0


def test_suspend_resume_stop_and_continue_the_app(alice: User) -> None:
    f = CWD[alice.name] / "count"
    job = submit(alice, "--image", "bb", "--", "sh", "-c", COUNT.format(f=f))
    wait_for(lambda: f.exists() and f.read_text().strip() not in ("", "1"), 30, "the app to count")
    assert alice.nagaya("job", "suspend", job).returncode == 0      # GE lets owners suspend their jobs
    wait_state(alice, job, ("SUSPENDED",), 10)
    frozen = wait_for(lambda: (a := f.read_text()) == (time.sleep(0.5), f.read_text())[1] and a, 30,
                      "counting to stop")   # generous: a loaded execd may pass the order on seconds late
    time.sleep(6)                          # past GE's own SIGSTOP ('notify' = 5 s after its USR1 warning)
    assert f.read_text() == frozen and show(alice, job)["state"] == "SUSPENDED"
    assert alice.nagaya("job", "resume", job).returncode == 0
    wait_for(lambda: f.read_text() != frozen, 10, "the app to continue")
    assert show(alice, job)["state"] == "RUNNING"
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=30)["state"] == "CANCELLED"
    no_leftovers(alice, str(f))


def test_users_cannot_see_each_others_jobs(alice: User, bob: User) -> None:
    secret = "alice-secret-output"
    job = submit(alice, "--image", "bb", "--name", "alices", "--", "sh", "-c", f"echo {secret}; sleep 60")
    wait_for(lambda: secret in logs(alice, job), 30, "alice's job to start")
    for args in (("job", "show", job), ("logs", job), ("cancel", job), ("job", "suspend", job)):
        r = bob.nagaya(*args)
        assert r.returncode != 0 and "not found" in r.stderr and secret not in r.stdout, (args, r.stderr)
    missing = bob.nagaya("job", "show", "999999")
    assert missing.stderr.replace("999999", job) == bob.nagaya("job", "show", job).stderr
    r = bob.nagaya("jobs")
    assert r.returncode == 0 and "alices" not in r.stdout
    assert bob.nagaya("jobs", "--all").returncode != 0
    assert show(alice, job)["state"] == "RUNNING"
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=30)["state"] == "CANCELLED"
    assert bob.nagaya("job", "show", job).returncode != 0          # finished: qacct's record is alice's too


def test_time_limit(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--time", "0:03", "--", "sh", "-c",
                 "trap 'echo time is up; exit 9' TERM; echo ready; while :; do sleep 0.1; done")
    info = wait_state(alice, job, timeout=40)
    assert info["state"] == "TIMEOUT" and info["time_limit"] == 3 and info["exit_code"] == 9, info
    assert "time is up" in logs(alice, job)
    no_leftovers(alice, "time is up")


def test_digest_pinning(alice: User) -> None:
    assert alice.nagaya("image", "tag", "bb", "moving:v1").returncode == 0
    pinned = digest_of(alice, "bb")
    blocker = submit(alice, "--image", "bb", "--cpus", "4", "--", "sleep", "60")    # every slot of all.q
    wait_state(alice, blocker, ("RUNNING",), 30)
    job = submit(alice, "--image", "moving:v1", "--", "cat", "/app/data.txt")
    dropped = submit(alice, "--image", "bb", "--", "true")
    assert show(alice, job)["state"] == "PENDING"
    assert alice.nagaya("cancel", dropped).returncode == 0          # never started: CANCELLED all the same
    assert wait_state(alice, dropped, timeout=30)["state"] == "CANCELLED"
    assert alice.nagaya("image", "tag", "app:1", "moving:v1").returncode == 0
    assert alice.nagaya("cancel", blocker).returncode == 0
    info = wait_state(alice, job, timeout=40)
    assert info["digest"] == pinned and info["state"] == "COMPLETED", info
    assert logs(alice, job) == "image data\n"
    assert alice.nagaya("job", "show", blocker).returncode == 0


def test_two_jobs_never_share_a_gpu(alice: User, cluster: GridEngineCluster) -> None:
    d = CWD[alice.name]
    release = d / "release"
    script = d / "gpu.sh"
    script.write_text("#!/bin/sh\n#NAGAYA --image bb\n"
                      "echo devices $(ls /dev | grep nvidia | tr '\\n' ' ')\n"
                      "echo visible $NVIDIA_VISIBLE_DEVICES\n"
                      f"i=0; while [ ! -e {release} ] && [ $i -lt 600 ]; do i=$((i+1)); sleep 0.1; done\n")
    os.chown(script, alice.uid, alice.gid)
    jobs = [submit(alice, "--gpus", "1", str(script), cwd=d) for _ in range(2)]
    third = submit(alice, "--gpus", "1", "--image", "bb", "--", "true")    # the consumable: 2 per host
    for j in jobs:
        wait_for(lambda j=j: "visible" in logs(alice, j), 30, f"job {j} to report its GPUs")
    assert show(alice, third)["state"] == "PENDING"
    seen = []
    for j in jobs:
        lines = dict(x.split(" ", 1) for x in logs(alice, j).splitlines() if " " in x)
        devices = lines["devices"].split()
        assert len(devices) == 2 and "nvidiactl" in devices, lines
        seen.append(next(x for x in devices if x != "nvidiactl"))
    assert sorted(seen) == ["nvidia0", "nvidia1"], "two jobs on one node must get different GPUs"
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    for j in [*jobs, third]:
        assert wait_state(alice, j, timeout=40)["state"] == "COMPLETED", logs(alice, j)
    both = submit(alice, "--gpus", "2", "--image", "bb", "--", "sh", "-c", "ls /dev | grep -c 'nvidia[0-9]'")
    assert wait_state(alice, both, timeout=30)["state"] == "COMPLETED"
    assert logs(alice, both).split() == ["2"]


def test_arrays_and_dependencies(alice: User, bob: User) -> None:
    release = CWD[alice.name] / "release-array"     # the array ends only once its dependents are queued
    arr = submit(alice, "--image", "bb", "--array", "1-4%2", "--", "sh", "-c",
                 f"echo task $NAGAYA_ARRAY_TASK_ID; while [ ! -e {release} ]; do sleep 0.1; done; "
                 "exit $((NAGAYA_ARRAY_TASK_ID == 3))")
    ok = submit(alice, "--image", "bb", "--after", f"{arr}:ok", "--", "echo", "not me")
    anyway = submit(alice, "--image", "bb", "--after", f"{arr}:any", "--", "echo", "after any")
    assert show(alice, ok)["state"] == "PENDING"
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    info = wait_state(alice, arr, timeout=60)
    assert info["state"] == "FAILED" and info["reason"] == "tasks: 3 COMPLETED, 1 FAILED", info
    assert show(alice, f"{arr}.3")["exit_code"] == 1 and show(alice, f"{arr}.2")["state"] == "COMPLETED"
    assert logs(alice, arr).splitlines() == [f"task {i}" for i in range(1, 5)]
    assert logs(alice, f"{arr}.2") == "task 2\n"
    info = wait_state(alice, ok, timeout=30)
    assert info["state"] == "CANCELLED" and "dependency" in info["reason"], info
    assert wait_state(alice, anyway, timeout=30)["state"] == "COMPLETED"
    assert logs(alice, anyway) == "after any\n"
    r = bob.nagaya("submit", "--image", "bb", "--after", arr, "--", "true", cwd=CWD[bob.name])
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr


def test_alloc_on_gridengine_with_a_terminal(alice: User) -> None:
    """`nagaya run --alloc` is Grid Engine's own interactive job (qrsh -pty yes) on this terminal: the shell
    in the container has the terminal, the job is listed while it runs, its exit status comes back."""
    from tests.integration.test_job_exec import Tmux

    t = Tmux(alice, f"cd {CWD[alice.name]}; nagaya run --alloc --scheduler gridengine --time 2 bb sh; "
                    "echo ALLOC-EXIT=$?")
    try:
        # The shell's prompt first, as a person would: Grid Engine 8.1.9's shepherd can lose a job whose
        # terminal gets input before the job's shell has started (README: Grid Engine, interactive jobs).
        t.wait("built-in commands", 90)               # busybox sh has started: its banner, then the prompt
        t.keys('[ -t 0 ] && echo TTY-""YES', "Enter")
        t.wait("TTY-YES", 60)
        jobs = json.loads(alice.nagaya("jobs", "--json").stdout)
        assert [j["state"] for j in jobs if j["name"] == "interactive"] == ["RUNNING"], jobs
        t.keys("exit 4", "Enter")
        t.wait("ALLOC-EXIT=4", 60)
    finally:
        t.close()
    rec = (alice.home / ".local/share/nagaya/audit.jsonl").read_text().splitlines()
    assert any('"action":"alloc"' in x and '"backend":"gridengine"' in x for x in rec)
