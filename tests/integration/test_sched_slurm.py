"""`nagaya submit` & co. on a real Slurm 22.05 (munged, slurmctld, three slurmd on loopback) as unprivileged users."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import (
    digest_of,
    ensure_users,
    import_images,
    live_processes,
    nagaya_json,
    show,
    wait_for,
    wait_state,
)
from tests.integration.sched_helpers import submit as _submit

pytestmark = pytest.mark.integration

CWD: dict[str, Path] = {}
TRAP = "trap 'echo cleaning up; exit 7' TERM; echo ready; while :; do sleep 0.1; done"


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster(gpus=2).start()      # each node: two fake GPUs as GRES (gres.conf, /dev/nvidiaN)
    yield c
    c.stop()
    assert not c._stepds() - c.stepds_before, "job steps left behind"


@pytest.fixture(scope="module")
def sched_users(cluster: SlurmCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    a, b = ensure_users(("nagaya-s1", 500000), ("nagaya-s2", 700000))
    dirs = []
    for u in (a, b):
        u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="slurm")
        import_images(u, rootfs, app_layout)
        # A fresh working directory: job logs (slurm-ID.out) of an earlier cluster must not be read as new.
        dirs.append(d := Path(tempfile.mkdtemp(prefix="slurm-", dir=u.home)))
        os.chown(d, u.uid, u.gid)
        CWD[u.name] = d
    yield a, b
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _end_jobs(cluster: SlurmCluster, timeout_job: str) -> Iterator[None]:
    """A failed test must not leave jobs that hold the CPUs the next one needs (the time-limit job stays)."""
    yield
    env = {**os.environ, **cluster.env}
    r = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
    ids = [x for x in r.stdout.split() if x != timeout_job]
    if ids:
        subprocess.run(["scancel", *ids], env=env, check=False)


@pytest.fixture
def alice(sched_users: tuple[User, User]) -> User:
    return sched_users[0]


@pytest.fixture
def bob(sched_users: tuple[User, User]) -> User:
    return sched_users[1]


@pytest.fixture(scope="module")
def timeout_job(sched_users: tuple[User, User]) -> str:
    """Slurm's limits are whole minutes, checked every 30 s: submitted first, checked last, so the wait overlaps."""
    return submit(sched_users[0], "--image", "bb", "--time", "1", "--name", "limited", "--",
                  "sh", "-c", "trap 'echo time is up; exit 9' TERM; echo ready; while :; do sleep 0.5; done")


def submit(u: User, *args: str, **kw: Any) -> str:
    kw.setdefault("cwd", CWD[u.name])
    return _submit(u, *args, **kw)


def root(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nagaya", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **cluster.env, "NAGAYA_SCHED_BACKEND": "slurm"})


def logs(u: User, job: str) -> str:
    return u.nagaya("logs", job).stdout


def test_single_node_job(alice: User, timeout_job: str) -> None:
    job = submit(alice, "--image", "bb", "--name", "one", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    info = wait_state(alice, job, timeout=30)
    assert info["state"] == "FAILED" and info["exit_code"] == 3, info
    assert info["digest"] == digest_of(alice, "bb") and info["nodes"].startswith("n") and info["name"] == "one"
    assert {"out", "err"} <= set(logs(alice, job).splitlines())     # and srun's own note on exit code 3
    ok = submit(alice, "--image", "bb", "--", "true")
    assert wait_state(alice, ok, timeout=30)["state"] == "COMPLETED"
    r = alice.nagaya("jobs")
    assert r.returncode == 0 and job in r.stdout


def test_multi_node_job(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--nodes", "3", "--ntasks", "3", "--",
                 "sh", "-c", "echo task $SLURM_PROCID on $SLURMD_NODENAME")
    info = wait_state(alice, job, timeout=30)
    assert info["state"] == "COMPLETED" and info["nodes"] == "n[1-3]", info
    assert sorted(logs(alice, job).splitlines()) == [f"task {i} on n{i + 1}" for i in range(3)]


def test_script_form(alice: User) -> None:
    d = CWD[alice.name]                 # this module's fresh directory: no slurm-ID.out of an earlier cluster
    script = d / "job.sh"
    script.write_text("#!/bin/sh\n#NAGAYA --image bb\n#SBATCH --job-name=scripted\n"
                      "echo \"args: $*\"; cat /app/data.txt\n")
    os.chown(script, alice.uid, alice.gid)
    job = submit(alice, str(script), "a1", cwd=d)
    info = wait_state(alice, job, timeout=30)
    assert info["state"] == "COMPLETED" and info["name"] == "scripted", logs(alice, job)
    assert logs(alice, job).splitlines() == ["args: a1", "image data"]


def test_cancel_lets_the_app_clean_up(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--", "sh", "-c", TRAP)
    wait_for(lambda: "ready" in logs(alice, job), 30, "the app to start")
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=30)["state"] == "CANCELLED"
    wait_for(lambda: "cleaning up" in logs(alice, job), 10, "the app's TERM handler")
    no_leftovers(alice, "cleaning up")


def no_leftovers(u: User, marker: str) -> None:
    """After a job's end: none of its processes (the supervisor, bwrap and the app carry the command in their
    arguments; squashfuse dies with their pid namespace) and no mount of it in the host's namespace."""
    wait_for(lambda: not [p for p in live_processes(u) if marker in p], 15,
             f"the job's processes to go: {live_processes(u)}")
    mounts = Path("/proc/mounts").read_text()
    assert f"user_id={u.uid}," not in mounts and "nagaya" not in mounts, mounts


def test_suspend_resume(alice: User, cluster: SlurmCluster) -> None:
    job = submit(alice, "--image", "bb", "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done")
    wait_state(alice, job, ("RUNNING",), 30)
    wait_for(lambda: logs(alice, job).count("\n") > 2, 30, "output")
    r = alice.nagaya("job", "suspend", job)              # an operator action in Slurm
    assert r.returncode != 0 and show(alice, job)["state"] == "RUNNING"
    r = root(cluster, "job", "suspend", job)
    assert r.returncode == 0, r.stderr
    wait_state(alice, job, ("SUSPENDED",), 10)
    frozen = wait_for(lambda: (a := logs(alice, job)) == logs(alice, job) and a, 5, "output to stop", every=0.3)
    assert logs(alice, job) == frozen
    assert root(cluster, "job", "resume", job).returncode == 0
    wait_for(lambda: logs(alice, job) != frozen, 10, "the job to continue")   # SIGCONT comes 1.5-2 s late
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=30)["state"] == "CANCELLED"


def test_users_cannot_see_each_others_jobs(alice: User, bob: User) -> None:
    secret = "alice-secret-output"
    job = submit(alice, "--image", "bb", "--name", "alices", "--", "sh", "-c", f"echo {secret}; sleep 60")
    wait_for(lambda: secret in logs(alice, job), 30, "alice's job to start")
    for args in (("job", "show", job), ("logs", job), ("cancel", job)):
        r = bob.nagaya(*args)
        assert r.returncode != 0 and "not found" in r.stderr and secret not in r.stdout, args
    r = bob.nagaya("jobs")
    assert r.returncode == 0 and "alices" not in r.stdout
    assert bob.nagaya("jobs", "--all").returncode != 0
    assert show(alice, job)["state"] == "RUNNING"
    assert alice.nagaya("cancel", job).returncode == 0


def test_time_limit(alice: User, timeout_job: str) -> None:
    info = wait_state(alice, timeout_job, timeout=150)
    assert info["state"] == "TIMEOUT" and info["time_limit"] == 60, info
    wait_for(lambda: "time is up" in logs(alice, timeout_job), 10, "the app's TERM handler")
    no_leftovers(alice, "time is up")


def test_digest_pinning(alice: User) -> None:
    assert alice.nagaya("image", "tag", "bb", "moving:v1").returncode == 0
    pinned = digest_of(alice, "bb")
    # Runs after the time-limit job has ended: a job on every CPU of every node makes the pinned one wait.
    blocker = submit(alice, "--image", "bb", "--nodes", "3", "--ntasks", "3", "--cpus", "2", "--",
                     "sleep", "60")
    wait_state(alice, blocker, ("RUNNING",), 30)
    job = submit(alice, "--image", "moving:v1", "--", "cat", "/app/data.txt")
    assert show(alice, job)["state"] == "PENDING"
    assert alice.nagaya("image", "tag", "app:1", "moving:v1").returncode == 0
    assert alice.nagaya("cancel", blocker).returncode == 0
    info = wait_state(alice, job, timeout=30)
    assert info["state"] == "COMPLETED" and info["digest"] == pinned
    assert logs(alice, job) == "image data\n"


def test_gpus_requested_are_the_gpus_the_container_sees(alice: User, cluster: SlurmCluster) -> None:
    """Two 1-GPU jobs on one node each see one different device, renumbered from 0 for CUDA; a 2-GPU job
    sees both. Without a device cgroup every /dev/nvidiaN is reachable on the node: nagaya is the boundary."""
    d = Path(tempfile.mkdtemp(prefix="sched-gpus-", dir=alice.home))   # no slurm-ID.out of an earlier cluster
    os.chown(d, alice.uid, alice.gid)
    release = d / "release"
    script = d / "gpu.sh"
    # n3: the time-limit job holds a CPU of n1, and both jobs need one CPU each on the same node
    script.write_text("#!/bin/sh\n#NAGAYA --image bb\n#SBATCH --nodelist=n3\n"
                      "echo devices $(ls /dev | grep nvidia | tr '\\n' ' ')\n"
                      "echo visible $NVIDIA_VISIBLE_DEVICES cuda $CUDA_VISIBLE_DEVICES\n"
                      f"i=0; while [ ! -e {release} ] && [ $i -lt 600 ]; do i=$((i+1)); sleep 0.1; done\n")
    os.chown(script, alice.uid, alice.gid)
    env = {"NAGAYA_GPU_DEV_DIR": str(cluster.gpu_dev_dir)}
    jobs = [submit(alice, "--gpus", "1", str(script), cwd=d, env=env) for _ in range(2)]
    for j in jobs:
        wait_for(lambda j=j: "cuda" in logs(alice, j), 30, f"job {j} to report its GPUs")
    seen = []
    for j in jobs:
        out = logs(alice, j)
        lines = dict(x.split(" ", 1) for x in out.splitlines() if x.startswith(("devices ", "visible ")))
        assert set(lines) == {"devices", "visible"}, out
        devices = lines["devices"].split()
        assert len(devices) == 2 and "nvidiactl" in devices, lines
        gpu = next(x for x in devices if x != "nvidiactl")
        assert lines["visible"] == f"{gpu.removeprefix('nvidia')} cuda 0", lines
        seen.append(gpu)
    assert sorted(seen) == ["nvidia0", "nvidia1"], "two jobs on one node must get different GPUs"
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    for j in jobs:
        assert wait_state(alice, j, timeout=30)["state"] == "COMPLETED"
    shutil.rmtree(d, ignore_errors=True)
    both = submit(alice, "--gpus", "2", "--image", "bb", "--", "sh", "-c",
                  "echo $(ls /dev | grep -c 'nvidia[0-9]') $CUDA_VISIBLE_DEVICES", env=env)
    assert wait_state(alice, both, timeout=30)["state"] == "COMPLETED"
    assert logs(alice, both).split() == ["2", "0,1"]


def test_arrays_and_dependencies(alice: User, bob: User) -> None:
    arr = submit(alice, "--image", "bb", "--array", "1-4%2", "--", "sh", "-c",
                 "echo task $NAGAYA_ARRAY_TASK_ID; exit $((NAGAYA_ARRAY_TASK_ID == 3))")
    ok = submit(alice, "--image", "bb", "--after", f"{arr}:ok", "--", "echo", "not me")
    anyway = submit(alice, "--image", "bb", "--after", f"{arr}:any", "--", "echo", "after any")
    info = wait_state(alice, arr, timeout=60)
    assert info["state"] == "FAILED" and info["reason"] == "tasks: 3 COMPLETED, 1 FAILED", info
    assert show(alice, f"{arr}.3")["exit_code"] == 1 and show(alice, f"{arr}.2")["state"] == "COMPLETED"
    assert [x for x in logs(alice, arr).splitlines() if x.startswith("task")] == [f"task {i}" for i in range(1, 5)]
    assert logs(alice, f"{arr}.2") == "task 2\n"
    assert {f"{arr}.{i}" for i in range(1, 5)} <= {j["id"] for j in nagaya_json(alice, "jobs")}
    assert wait_state(alice, anyway, timeout=30)["state"] == "COMPLETED"
    assert logs(alice, anyway) == "after any\n"
    # Slurm's own terms: a job whose afterok can never be met stays pending with the reason (scancel it).
    wait_for(lambda: show(alice, ok)["reason"] == "DependencyNeverSatisfied", 30, "Slurm to give up on it")
    assert alice.nagaya("cancel", ok).returncode == 0
    r = bob.nagaya("submit", "--image", "bb", "--after", arr, "--", "true", cwd=CWD[bob.name])
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr
