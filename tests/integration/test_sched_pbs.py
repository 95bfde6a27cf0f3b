"""`nagaya submit` & co. on a real OpenPBS (server, scheduler, comm, mom and its data service on this host) as
unprivileged users: what is PBS's own. The checks every backend shares live in test_sched_conformance.py."""

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
from tests.helpers.pbs import PBS_EXEC, PBSCluster
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


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[PBSCluster]:
    for exe in ("sbin/pbs_server", "sbin/pbs_mom", "bin/qsub", "bin/qsig"):
        require(os.access(f"{PBS_EXEC}/{exe}", os.X_OK), f"{PBS_EXEC}/{exe} is not installed (bash deploy/openpbs.sh)")
    c = PBSCluster(gpus=2).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def sched_users(cluster: PBSCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    a, b = ensure_users(("nagaya-pb1", 1000000), ("nagaya-pb2", 1100000))
    dirs = []
    for u in (a, b):
        u.extra_env.clear()
        u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="pbs",
                           NAGAYA_SCHED_STATE_DIR=str(u.home / ".local/share/nagaya/jobs-pbs"))
        import_images(u, rootfs, app_layout)
        dirs.append(d := Path(tempfile.mkdtemp(prefix="pbs-", dir=u.home)))
        os.chown(d, u.uid, u.gid)
        CWD[u.name] = d
    yield a, b
    for u in (a, b):
        wait_for(lambda u=u: not [p for p in live_processes(u) if "nagaya" in p], 30,
                 f"{u.name}'s jobs to go: {live_processes(u)}")
        shutil.rmtree(u.home / ".local/share/nagaya/jobs-pbs", ignore_errors=True)   # job ids restart at 0
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def alice(sched_users: tuple[User, User]) -> User:
    return sched_users[0]


def submit(u: User, *args: str, **kw: Any) -> str:
    kw.setdefault("cwd", CWD[u.name])
    return _submit(u, *args, **kw)


def logs(u: User, job: str) -> str:
    return str(u.nagaya("logs", job).stdout)


def test_script_with_pbs_directives(alice: User) -> None:
    d = CWD[alice.name]
    script = d / "job.sh"
    script.write_text("#!/bin/sh\n#NAGAYA --image bb\n#PBS -N scripted\n"
                      "echo \"args: $*\"; cat /app/data.txt; pwd\n")
    os.chown(script, alice.uid, alice.gid)
    job = submit(alice, str(script), "a1", cwd=d)
    info = wait_state(alice, job, timeout=60)
    assert info["state"] == "COMPLETED" and info["name"] == "scripted", logs(alice, job)
    assert logs(alice, job).splitlines() == ["args: a1", "image data", str(d)]


def test_resources_reach_pbs_and_logs_follow(alice: User, cluster: PBSCluster) -> None:
    """--cpus/--mem/--gpus are one select chunk; the job sees PBS's NCPUS; `logs -f` follows the live log."""
    job = submit(alice, "--image", "bb", "--cpus", "2", "--mem", "256M", "--gpus", "1", "--time", "5:00", "--",
                 "sh", "-c", "echo cpus $NCPUS gpus $NAGAYA_JOB_GPUS; sleep 1; echo done")
    r = alice.nagaya("logs", "-f", job, timeout=90)
    assert r.returncode == 0 and r.stdout.splitlines()[-1:] == ["done"], r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith("cpus 2 gpus "), r.stdout
    raw = cluster.cmd("qstat", "-x", "-f", job).stdout
    assert "Resource_List.select = 1:ncpus=2:mem=262144kb:ngpus=1" in raw, raw
    assert "Resource_List.walltime = 00:05:15" in raw or "Resource_List.walltime = 0:05:15" in raw, raw
    info = show(alice, job)
    assert info["state"] == "COMPLETED" and info["cpus"] == 2 and info["time_limit"] == 300, info


def test_pbs_refusals_are_one_line(alice: User) -> None:
    for args, words in ((("--array", "3"), "two tasks"), (("--array", "1-x"), "invalid --array")):
        r = alice.nagaya("submit", "--image", "bb", *args, "--", "true", cwd=CWD[alice.name])
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    arr = submit(alice, "--image", "bb", "--array", "1-2", "--", "true")
    r = alice.nagaya("submit", "--image", "bb", "--after", f"{arr}.1", "--", "true", cwd=CWD[alice.name])
    assert r.returncode != 0 and "one array task" in r.stderr, r.stderr
    assert wait_state(alice, arr, timeout=60)["state"] == "COMPLETED"
    failed = submit(alice, "--image", "bb", "--", "false")
    assert wait_state(alice, failed, timeout=60)["state"] == "FAILED"
    r = alice.nagaya("submit", "--image", "bb", "--after", failed, "--", "true", cwd=CWD[alice.name])
    assert r.returncode != 0 and "can never be met" in r.stderr, r.stderr


def test_qdel_gives_the_app_kill_delay_then_kill(alice: User, cluster: PBSCluster) -> None:
    """An app that ignores TERM is KILLed after the queue's kill_delay: nothing of it is left."""
    job = submit(alice, "--image", "bb", "--", "sh", "-c",
                 "trap 'echo got TERM' TERM; echo ready; while :; do sleep 0.1; done")
    wait_for(lambda: "ready" in logs(alice, job), 60, "the app to start")
    assert alice.nagaya("cancel", job).returncode == 0
    info = wait_state(alice, job, timeout=cluster.kill_delay + 30)
    assert info["state"] == "CANCELLED", info
    assert "got TERM" in logs(alice, job)
    wait_for(lambda: not [p for p in live_processes(alice) if "got TERM" in p], 20, "the app to be KILLed")
    assert f"user_id={alice.uid}," not in Path("/proc/mounts").read_text()


def test_reproduce_a_pbs_job_after_its_tag_moved(alice: User, rootfs: Path, app_layout: Path) -> None:
    """The audit trail names the backend and the digest; `reproduce` submits the same digest to PBS again."""
    work = CWD[alice.name]
    first = digest_of(alice, "bb")
    job = submit(alice, "--image", "bb", "--cpus", "2", "--time", "5", "--", "sh", "-c", "echo $NAGAYA_IMAGE_DIGEST")
    assert wait_state(alice, job, timeout=60)["state"] == "COMPLETED"
    try:
        assert alice.nagaya("image", "import", str(app_layout), "--name", "bb").returncode == 0
        assert digest_of(alice, "bb") != first
        r = alice.nagaya("reproduce", job, "--backend", "pbs", "--dry-run", "--json", cwd=work)
        assert r.returncode == 0, r.stderr
        plan = json.loads(r.stdout)
        assert plan["backend"] == "pbs" and plan["digest"] == first and plan["resources"]["cpus"] == 2, plan
        r = alice.nagaya("reproduce", job, "--backend", "pbs", "--json", cwd=work)
        assert r.returncode == 0, r.stderr
        again = json.loads(r.stdout)["id"]
        info = wait_state(alice, again, timeout=60)
        assert info["state"] == "COMPLETED" and info["digest"] == first and info["time_limit"] == 300, info
        assert info["cpus"] == 2 and logs(alice, again).strip() == first
    finally:
        import_images(alice, rootfs, app_layout)       # `bb` back as the other tests expect it


APP = "echo ns $(readlink /proc/self/ns/pid); echo inside > /dev/only-in-the-job; while :; do sleep 0.2; done"


def test_exec_into_a_pbs_job_on_its_host(sched_users: tuple[User, User]) -> None:
    """`nagaya job exec` is a task of the job through PBS's own pbs_attach, on the job's host."""
    alice, bob = sched_users
    job = submit(alice, "--image", "bb", "--", "sh", "-c", APP)
    ns = wait_for(lambda: next((x for x in logs(alice, job).splitlines() if x.startswith("ns ")), None), 60,
                  "the app to start")
    r = alice.nagaya("job", "exec", job, "--", "sh", "-c", "echo ns $(readlink /proc/self/ns/pid); "
                     "cat /dev/only-in-the-job")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [ns, "inside"]
    assert alice.nagaya("job", "exec", job, "--", "sh", "-c", "exit 6").returncode == 6
    theirs = bob.nagaya("job", "exec", job, "--", "id")
    missing = bob.nagaya("job", "exec", "999999", "--", "id")
    assert theirs.returncode == missing.returncode != 0
    assert theirs.stderr.replace(job, "ID") == missing.stderr.replace("999999", "ID") and theirs.stdout == ""
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job, timeout=60)["state"] == "CANCELLED"
    r = alice.nagaya("job", "exec", job, "--", "true")
    assert r.returncode != 0 and "has ended" in r.stderr


def test_alloc_on_pbs_with_a_terminal(sched_users: tuple[User, User]) -> None:
    """`nagaya run --alloc` is PBS's own interactive job (qsub -I) on this terminal."""
    from tests.integration.test_job_exec import Tmux

    alice, _ = sched_users
    t = Tmux(alice, f"cd {CWD[alice.name]}; nagaya run --alloc --scheduler pbs --time 2 bb sh; echo ALLOC-EXIT=$?")
    try:
        t.keys('[ -t 0 ] && echo TTY-""YES', "Enter")
        t.wait("TTY-YES", 60)
        jobs = json.loads(alice.nagaya("jobs", "--json").stdout)
        assert [j["state"] for j in jobs if j["name"] == "interactive"] == ["RUNNING"], jobs
        t.keys("exit 4", "Enter")
        t.wait("ALLOC-EXIT=", 60)
    finally:
        t.close()
    rec = (alice.home / ".local/share/nagaya/audit.jsonl").read_text().splitlines()
    assert any('"action":"alloc"' in x and '"backend":"pbs"' in x for x in rec)
