"""One conformance suite for every scheduler backend (local, Slurm, Grid Engine, OpenPBS), as unprivileged
users: submit, digest pinning, show, logs, cancel with the app's TERM handler, suspend/resume, the time limit,
arrays, dependencies, GPUs on fake device nodes, the wall between users, and nothing left behind.

Each backend is one module-scoped parameter: its cluster is started, every test runs against it, and it is
stopped before the next one starts (Grid Engine and PBS are machine-global, and PBS moves the host name off
loopback while it runs). Where schedulers differ on purpose, the difference is spelled out per backend
(`Backend`): suspending is an operator action in Slurm and PBS; Slurm counts limits in whole minutes and keeps
a job whose afterok can never be met pending, where the others cancel it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers.users import User
from tests.integration.sched_helpers import (
    digest_of,
    ensure_users,
    import_images,
    live_processes,
    nagaya_json,
    reset_user,
    show,
    stop_runner,
    wait_for,
    wait_state,
)
from tests.integration.sched_helpers import submit as _submit

pytestmark = pytest.mark.integration

TRAP = "trap 'echo cleaning up; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
COUNT = "i=0; while :; do i=$((i+1)); echo $i > {f}; sleep 0.1; done"
ACTIVE = ("PENDING", "RUNNING", "SUSPENDED")


@dataclass
class Backend:
    name: str
    env: dict[str, str]
    cluster: Any = None
    operator_suspend: bool = False          # owners may not suspend (Slurm, PBS): root does, owners are refused
    time_limit: str = "0:03"                # and what `job show` then says, in seconds
    time_limit_s: int = 3
    time_wait: float = 60
    gpu_directive: str = ""                 # a script line that keeps two 1-GPU jobs on one node
    cwd: dict[str, Path] = field(default_factory=dict)

    def root(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nagaya", *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.env})


def _start(name: str) -> Backend:
    if name == "local":
        from tests.helpers.fake_gpu import fake_gpus, gpu_locks

        gpus = gpu_locks(fake_gpus(Path("/tmp/nagaya-conformance-gpu"), 2), Path("/tmp/nagaya-conformance-gpu"))
        return Backend("local", {**gpus, "NAGAYA_SCHED_BACKEND": "local", "NAGAYA_SCHED_KILL_GRACE": "2",
                                 "NAGAYA_SCHED_IDLE_EXIT": "20"})
    if name == "slurm":
        from tests.helpers.slurm import SlurmCluster

        for exe in ("slurmctld", "slurmd", "munged", "sbatch"):
            require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
        s = SlurmCluster(gpus=2).start()
        return Backend("slurm", {**s.env, "NAGAYA_SCHED_BACKEND": "slurm",
                                 "NAGAYA_GPU_DEV_DIR": str(s.gpu_dev_dir)}, s, operator_suspend=True,
                       time_limit="1", time_limit_s=60, time_wait=150, gpu_directive="#SBATCH --nodelist=n3")
    if name == "gridengine":
        from tests.helpers.gridengine import GridEngineCluster

        for exe in ("/usr/sbin/sge_qmaster", "/usr/sbin/sge_execd", "/usr/bin/qsub", "/usr/bin/qacct"):
            require(os.access(exe, os.X_OK), f"{exe} is not installed (bash deploy/install.sh)")
        g = GridEngineCluster(gpus=2).start()
        return Backend("gridengine", {**g.env, "NAGAYA_SCHED_BACKEND": "gridengine"}, g)
    from tests.helpers.pbs import PBS_EXEC, PBSCluster

    for exe in ("sbin/pbs_server", "sbin/pbs_mom", "bin/qsub", "bin/qsig"):
        require(os.access(f"{PBS_EXEC}/{exe}", os.X_OK),
                f"{PBS_EXEC}/{exe} is not installed (bash deploy/openpbs.sh)")
    p = PBSCluster(gpus=2).start()
    return Backend("pbs", {**p.env, "NAGAYA_SCHED_BACKEND": "pbs"}, p, operator_suspend=True)


@pytest.fixture(scope="module", params=["local", "slurm", "gridengine", "pbs"])
def backend(request: pytest.FixtureRequest, system: None, rootfs: Path,
            app_layout: Path) -> Iterator[tuple[Backend, User, User]]:
    bk = _start(request.param)
    users = ensure_users(("nagaya-cf1", 1200000), ("nagaya-cf2", 1300000))
    dirs = []
    try:
        for u in users:
            reset_user(u)
            u.extra_env.clear()
            u.extra_env.update(bk.env, NAGAYA_SCHED_STATE_DIR=str(u.home / f".local/share/nagaya/jobs-{bk.name}"))
            import_images(u, rootfs, app_layout)
            dirs.append(d := Path(tempfile.mkdtemp(prefix=f"cf-{bk.name}-", dir=u.home)))
            os.chown(d, u.uid, u.gid)
            bk.cwd[u.name] = d
        yield bk, users[0], users[1]
        for u in users:
            for j in nagaya_json(u, "jobs"):
                if j["state"] in ACTIVE:
                    u.nagaya("cancel", j["id"])
        for u in users:
            wait_for(lambda u=u: not [p for p in live_processes(u) if "nagaya" in p or "sleep" in p], 30,
                     f"{u.name}'s jobs to go: {live_processes(u)}")
            stop_runner(u)
            assert f"user_id={u.uid}," not in Path("/proc/mounts").read_text(), "a job's mount was left"
    finally:
        if bk.cluster is not None:
            bk.cluster.stop()
        for u in users:
            stop_runner(u)
            shutil.rmtree(u.home / f".local/share/nagaya/jobs-{bk.name}", ignore_errors=True)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def submit(bk: Backend, u: User, *args: str, **kw: Any) -> str:
    kw.setdefault("cwd", bk.cwd[u.name])
    return _submit(u, *args, **kw)


def logs(u: User, job: str) -> str:
    return str(u.nagaya("logs", job).stdout)


def no_leftovers(u: User, marker: str) -> None:
    """After a job's end: none of its processes and no mount of it in the host's namespace."""
    wait_for(lambda: not [p for p in live_processes(u) if marker in p], 20,
             f"the job's processes to go: {live_processes(u)}")
    assert f"user_id={u.uid}," not in Path("/proc/mounts").read_text()


def test_submit_show_logs_and_pinning(backend: tuple[Backend, User, User]) -> None:
    bk, alice, _ = backend
    job = submit(bk, alice, "--image", "bb", "--name", "one", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    info = wait_state(alice, job, timeout=60)
    assert info["state"] == "FAILED" and info["exit_code"] == 3, info
    assert info["digest"] == digest_of(alice, "bb") and info["name"] == "one" and info["backend"] == bk.name
    assert info["submit_time"] and info["end_time"], info
    assert {"out", "err"} <= set(logs(alice, job).splitlines())
    # Pinning: the job waits (for a running one) while its tag moves; it runs the digest of submit time.
    assert alice.nagaya("image", "tag", "bb", "moving:v1").returncode == 0
    pinned = digest_of(alice, "bb")
    release = bk.cwd[alice.name] / "release-first"
    first = submit(bk, alice, "--image", "bb", "--name", "listed", "--", "sh", "-c",
                   f"while [ ! -e {release} ]; do sleep 0.1; done")
    wait_state(alice, first, ("RUNNING",), 60)
    later = submit(bk, alice, "--image", "moving:v1", "--after", f"{first}:any", "--", "cat", "/app/data.txt")
    assert show(alice, later)["state"] == "PENDING"
    r = alice.nagaya("jobs")
    assert r.returncode == 0 and first in r.stdout and "listed" in r.stdout, r.stdout
    assert alice.nagaya("image", "tag", "app:1", "moving:v1").returncode == 0
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    assert wait_state(alice, first, timeout=60)["state"] == "COMPLETED"
    info = wait_state(alice, later, timeout=60)
    assert info["state"] == "COMPLETED" and info["digest"] == pinned, info
    assert logs(alice, later).splitlines()[-1:] == ["image data"]


def test_cancel_lets_the_app_clean_up(backend: tuple[Backend, User, User]) -> None:
    bk, alice, _ = backend
    job = submit(bk, alice, "--image", "bb", "--", "sh", "-c", TRAP)
    wait_for(lambda: "ready" in logs(alice, job), 60, "the app to start")
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=60)["state"] == "CANCELLED"
    wait_for(lambda: "cleaning up" in logs(alice, job), 10, "the app's TERM handler")
    no_leftovers(alice, "cleaning up")
    assert alice.nagaya("cancel", job).returncode != 0          # finished: nothing to cancel


def test_suspend_resume_stop_and_continue_the_app(backend: tuple[Backend, User, User]) -> None:
    bk, alice, _ = backend
    f = bk.cwd[alice.name] / "count"
    job = submit(bk, alice, "--image", "bb", "--", "sh", "-c", COUNT.format(f=f))
    wait_for(lambda: f.exists() and f.read_text().strip() not in ("", "1"), 60, "the app to count")

    def control(verb: str) -> None:
        if bk.operator_suspend:          # the scheduler's own terms: an operator action, the owner is refused
            r = alice.nagaya("job", verb, job)
            assert r.returncode != 0 and "operator" in r.stderr, r.stderr
            r = bk.root("job", verb, job)
        else:
            r = alice.nagaya("job", verb, job)
        assert r.returncode == 0, r.stderr

    control("suspend")
    wait_state(alice, job, ("SUSPENDED",), 20)
    frozen = wait_for(lambda: (a := f.read_text()) == (time.sleep(0.5), f.read_text())[1] and a, 30,
                      "counting to stop")   # generous: a loaded execd may pass the order on seconds late
    time.sleep(6)                        # past Grid Engine's own SIGSTOP ('notify' 5 s after its warning)
    assert f.read_text() == frozen and show(alice, job)["state"] == "SUSPENDED"
    control("resume")
    wait_for(lambda: f.read_text() != frozen, 20, "the app to continue")
    assert show(alice, job)["state"] == "RUNNING"
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=60)["state"] == "CANCELLED"
    no_leftovers(alice, str(f))


def test_time_limit(backend: tuple[Backend, User, User]) -> None:
    bk, alice, _ = backend
    job = submit(bk, alice, "--image", "bb", "--time", bk.time_limit, "--", "sh", "-c",
                 "trap 'echo time is up; exit 9' TERM; echo ready; while :; do sleep 0.1; done")
    info = wait_state(alice, job, timeout=bk.time_wait)
    assert info["state"] == "TIMEOUT" and info["time_limit"] == bk.time_limit_s, info
    wait_for(lambda: "time is up" in logs(alice, job), 10, "the app's TERM handler")
    no_leftovers(alice, "time is up")


def test_arrays_and_dependencies(backend: tuple[Backend, User, User]) -> None:
    bk, alice, bob = backend
    release = bk.cwd[alice.name] / "release-array"
    arr = submit(bk, alice, "--image", "bb", "--array", "1-4%2", "--", "sh", "-c",
                 f"echo task $NAGAYA_ARRAY_TASK_ID; while [ ! -e {release} ]; do sleep 0.1; done; "
                 "exit $((NAGAYA_ARRAY_TASK_ID == 3))")
    ok = submit(bk, alice, "--image", "bb", "--after", f"{arr}:ok", "--", "echo", "not me")
    anyway = submit(bk, alice, "--image", "bb", "--after", f"{arr}:any", "--", "echo", "after any")
    assert show(alice, ok)["state"] == "PENDING"
    reason = wait_for(lambda: "RUNNING" in (r := show(alice, arr)["reason"]) and r, 60, "the array to start")
    assert "3 RUNNING" not in reason and "4 RUNNING" not in reason, f"%2 runs two at a time: {reason}"
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    info = wait_state(alice, arr, timeout=120)
    assert info["state"] == "FAILED" and info["reason"] == "tasks: 3 COMPLETED, 1 FAILED", info
    assert show(alice, f"{arr}.3")["exit_code"] == 1 and show(alice, f"{arr}.2")["state"] == "COMPLETED"
    assert [x for x in logs(alice, arr).splitlines() if x.startswith("task")] == [f"task {i}" for i in range(1, 5)]
    assert logs(alice, f"{arr}.2") == "task 2\n"
    assert wait_state(alice, anyway, timeout=60)["state"] == "COMPLETED"
    assert logs(alice, anyway) == "after any\n"
    if bk.name == "slurm":              # Slurm's own terms: it stays pending with the reason (scancel it)
        wait_for(lambda: show(alice, ok)["reason"] == "DependencyNeverSatisfied", 60, "Slurm to give up on it")
        assert alice.nagaya("cancel", ok).returncode == 0
    else:
        info = wait_state(alice, ok, timeout=60)
        assert info["state"] == "CANCELLED" and "dependency" in info["reason"], info
    assert "not me" not in logs(alice, ok)
    r = bob.nagaya("submit", "--image", "bb", "--after", arr, "--", "true", cwd=bk.cwd[bob.name])
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr


def test_two_jobs_never_share_a_gpu(backend: tuple[Backend, User, User]) -> None:
    bk, alice, _ = backend
    d = bk.cwd[alice.name]
    release = d / "release"
    script = d / "gpu.sh"
    script.write_text("#!/bin/sh\n#NAGAYA --image bb\n" + (bk.gpu_directive + "\n" if bk.gpu_directive else "") +
                      "echo devices $(ls /dev | grep nvidia | tr '\\n' ' ')\n"
                      f"i=0; while [ ! -e {release} ] && [ $i -lt 900 ]; do i=$((i+1)); sleep 0.1; done\n")
    os.chown(script, alice.uid, alice.gid)
    jobs = [submit(bk, alice, "--gpus", "1", str(script), cwd=d) for _ in range(2)]
    for j in jobs:
        wait_for(lambda j=j: "devices" in logs(alice, j), 60, f"job {j} to report its GPUs")
    seen = []
    for j in jobs:
        devices = next(x for x in logs(alice, j).splitlines() if x.startswith("devices")).split()[1:]
        assert len(devices) == 2 and "nvidiactl" in devices, devices
        seen.append(next(x for x in devices if x != "nvidiactl"))
    assert sorted(seen) == ["nvidia0", "nvidia1"], "two jobs on one node must get different GPUs"
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    for j in jobs:
        assert wait_state(alice, j, timeout=60)["state"] == "COMPLETED", logs(alice, j)
    os.unlink(release)
    both = submit(bk, alice, "--gpus", "2", "--image", "bb", "--", "sh", "-c", "ls /dev | grep -c 'nvidia[0-9]'")
    assert wait_state(alice, both, timeout=60)["state"] == "COMPLETED", logs(alice, both)
    assert logs(alice, both).split()[-1:] == ["2"]


def test_users_cannot_see_each_others_jobs(backend: tuple[Backend, User, User]) -> None:
    bk, alice, bob = backend
    secret = "alice-secret-output"
    job = submit(bk, alice, "--image", "bb", "--name", "alices", "--", "sh", "-c", f"echo {secret}; sleep 60")
    wait_for(lambda: secret in logs(alice, job), 60, "alice's job to start")
    for args in (("job", "show", job), ("logs", job), ("cancel", job), ("job", "suspend", job)):
        r = bob.nagaya(*args)
        assert r.returncode != 0 and "not found" in r.stderr and secret not in r.stdout, (args, r.stderr)
    r = bob.nagaya("jobs")
    assert r.returncode == 0 and "alices" not in r.stdout
    assert bob.nagaya("jobs", "--all").returncode != 0
    assert show(alice, job)["state"] == "RUNNING"
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=60)["state"] == "CANCELLED"
    assert bob.nagaya("job", "show", job).returncode != 0          # finished: still alice's alone


def test_hold_and_release(backend: tuple[Backend, User, User]) -> None:
    bk, alice, bob = backend
    release = bk.cwd[alice.name] / "release-hold"
    first = submit(bk, alice, "--image", "bb", "--", "sh", "-c", f"while [ ! -e {release} ]; do sleep 0.1; done")
    wait_state(alice, first, ("RUNNING",), 60)
    r = alice.nagaya("job", "hold", first)
    assert r.returncode != 0 and "pending" in r.stderr, r.stderr        # a running job is not held
    later = submit(bk, alice, "--image", "bb", "--after", f"{first}:any", "--", "echo", "released")
    r = bob.nagaya("job", "hold", later)
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr
    assert alice.nagaya("job", "hold", later).returncode == 0
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    assert wait_state(alice, first, timeout=60)["state"] == "COMPLETED"
    time.sleep(5)                       # past the scheduler's next cycles: held, it does not start
    info = show(alice, later)
    assert info["state"] == "PENDING" and "held" in info["reason"].lower(), info
    assert bob.nagaya("job", "release", later).returncode != 0
    assert alice.nagaya("job", "release", later).returncode == 0, "release"
    info = wait_state(alice, later, timeout=60)
    assert info["state"] == "COMPLETED" and logs(alice, later) == "released\n", info
    assert alice.nagaya("job", "release", later).returncode != 0      # ended: nothing to release
