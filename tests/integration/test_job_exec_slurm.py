"""`nagaya job exec` and `nagaya run --alloc` on a real Slurm 22.05 (three slurmd, fake GPUs as GRES), as
unprivileged users: exec is an overlapping step of the job (never ssh), lands in the app's namespaces with
its GPUs and environment, on the node and task asked for; another user's job is a missing one; the
allocation runs on a terminal tmux drives."""

from __future__ import annotations

import json
import os
import re
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
from tests.integration.sched_helpers import ensure_users, import_images, wait_for, wait_state
from tests.integration.sched_helpers import submit as _submit
from tests.integration.test_job_exec import Tmux

pytestmark = pytest.mark.integration

CWD: dict[str, Path] = {}
PROBE = ("echo ns $(readlink /proc/self/ns/pid) $(readlink /proc/self/ns/mnt) task $SLURM_PROCID; "
         "echo gpus $(ls /dev | grep 'nvidia[0-9]' | tr '\\n' ' ') cuda $CUDA_VISIBLE_DEVICES")
APP = PROBE + "; echo inside > /dev/only-in-the-job; while :; do sleep 0.2; done"


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "srun", "tmux"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster(gpus=2).start()
    yield c
    c.stop()
    assert not c._stepds() - c.stepds_before, "job steps left behind"


@pytest.fixture(scope="module")
def users(cluster: SlurmCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    a, b = ensure_users(("nagaya-x1", 5000000), ("nagaya-x2", 5100000))
    dirs = []
    for u in (a, b):
        u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="slurm", NAGAYA_GPU_DEV_DIR=str(cluster.gpu_dev_dir))
        import_images(u, rootfs, app_layout)
        dirs.append(d := Path(tempfile.mkdtemp(prefix="slurm-exec-", dir=u.home)))
        os.chown(d, u.uid, u.gid)
        CWD[u.name] = d
    yield a, b
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _end_jobs(cluster: SlurmCluster) -> Iterator[None]:
    yield
    env = {**os.environ, **cluster.env}
    r = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
    if r.stdout.split():
        subprocess.run(["scancel", *r.stdout.split()], env=env, check=False)


def submit(u: User, *args: str, **kw: Any) -> str:
    kw.setdefault("cwd", CWD[u.name])
    return _submit(u, *args, **kw)


def _lines(u: User, job: str, n: int) -> list[str]:
    def ready() -> list[str] | None:
        out = u.nagaya("logs", job).stdout.splitlines()
        got = [x for x in out if x.startswith(("ns ", "gpus "))]
        return got if len(got) >= n else None
    return wait_for(ready, 60, f"job {job} to start its app")


def test_exec_into_a_slurm_job_with_its_gpus(users: tuple[User, User]) -> None:
    alice, bob = users
    job = submit(alice, "--gpus", "1", "--image", "bb", "--", "sh", "-c", APP)
    ns_line, gpu_line = _lines(alice, job, 2)
    r = alice.nagaya("job", "exec", job, "--", "sh", "-c", PROBE + "; cat /dev/only-in-the-job")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == ns_line and out[1] == gpu_line and out[2] == "inside"
    assert len(gpu_line.split()) == 4                    # one GPU, and CUDA numbering from 0: the job's own
    assert alice.nagaya("job", "exec", job, "--", "sh", "-c", "exit 6").returncode == 6
    # the exec step holds the job's GPU too (what a device cgroup lets it open), shared with the app's step
    step = subprocess.Popen(alice.argv(["nagaya", "job", "exec", job, "--", "sleep", "5"]), env=alice.env())
    try:
        def exec_step() -> str | None:
            out = alice.run(["scontrol", "show", "step", "-o", job]).stdout.splitlines()
            return next((x for x in out if x.split()[0] not in (f"StepId={job}.batch", f"StepId={job}.0")), None)
        line = wait_for(exec_step, 30, "the exec step")
        assert "gres:gpu:1" in line, line
    finally:
        step.wait()
    # another user's job: the very answer a missing one gets
    theirs = bob.nagaya("job", "exec", job, "--", "id")
    missing = bob.nagaya("job", "exec", "999999", "--", "id")
    assert theirs.returncode == missing.returncode != 0
    assert theirs.stderr.replace(job, "ID") == missing.stderr.replace("999999", "ID") and theirs.stdout == ""
    assert alice.nagaya("cancel", job).returncode == 0
    wait_state(alice, job, timeout=30)
    r = alice.nagaya("job", "exec", job, "--", "true")
    assert r.returncode != 0 and "has ended" in r.stderr and r.stderr.count("\n") == 1


def test_exec_picks_the_node_and_task(users: tuple[User, User]) -> None:
    alice, _ = users
    job = submit(alice, "--nodes", "2", "--ntasks", "2", "--image", "bb", "--", "sh", "-c", APP)
    lines = [x for x in _lines(alice, job, 4) if x.startswith("ns ")]
    by_task = {x.split()[-1]: x for x in lines}
    for task in ("0", "1"):
        r = alice.nagaya("job", "exec", job, "--task", task, "--", "sh", "-c", PROBE)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == by_task[task]     # that task's namespaces and environment
    show = json.loads(alice.nagaya("job", "show", job, "--json").stdout)
    nodes = alice.run(["scontrol", "show", "hostnames", show["nodes"]]).stdout.split()
    assert len(nodes) == 2
    r = alice.nagaya("job", "exec", "--node", nodes[1], job, "--", "sh", "-c", "readlink /proc/self/ns/pid")
    assert r.returncode == 0 and r.stdout.strip() == by_task["1"].split()[1]
    r = alice.nagaya("job", "exec", "--node", "nowhere", job, "--", "true")
    assert r.returncode != 0 and "nowhere" in r.stderr


def test_alloc_on_slurm_with_a_terminal(users: tuple[User, User]) -> None:
    alice, _ = users
    t = Tmux(alice, f"cd {CWD[alice.name]}; nagaya run --alloc --gpus 1 --time 2 bb sh; echo ALLOC-EXIT=$?")
    try:
        t.keys('[ -t 0 ] && echo TTY-$SLURM_JOB_ID-""YES', "Enter")
        job = wait_for(lambda: (m := re.search(r"TTY-(\d+)-YES", t.screen())) and m.group(1), 60, "a terminal")
        info = json.loads(alice.nagaya("job", "show", job, "--json").stdout)
        assert info["state"] == "RUNNING" and info["digest"].startswith("sha256:") and info["image"]
        t.keys('echo GPUS-$CUDA_VISIBLE_DEVICES-""END', "Enter")
        t.wait("GPUS-0-END")
        t.keys("sleep 300", "Enter")
        wait_for(lambda: any("sleep 300" in x for x in alice.processes()), 30, "sleep to run")
        t.keys("C-c")
        t.keys('echo STILL-""HERE', "Enter")
        t.wait("STILL-HERE")
        r = alice.nagaya("job", "exec", job, "--", "sh", "-c", "[ -t 0 ] || echo no-tty-without-t")
        assert r.returncode == 0 and r.stdout.strip() == "no-tty-without-t", r.stderr
        t.keys("exit 4", "Enter")
        t.wait("ALLOC-EXIT=4", 60)
    finally:
        t.close()
    assert wait_state(alice, job, timeout=30)["state"] in ("FAILED", "COMPLETED")
    rec = (alice.home / ".local/share/nagaya/audit.jsonl").read_text().splitlines()
    assert any('"action":"alloc"' in x and '"backend":"slurm"' in x for x in rec)
