"""`nagaya submit` & co. on the local backend, as unprivileged users: the per-user runner, its records, limits,
signals, time limits, digest pinning and the wall between users."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.users import User
from tests.integration.sched_helpers import (
    digest_of,
    ensure_users,
    import_images,
    job_processes,
    live_processes,
    nagaya_json,
    reset_user,
    show,
    state_dir,
    stop_runner,
    submit,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.integration

# Short grace and idle periods keep the suite fast; the runner reads them from the submitting environment.
ENV = {"NAGAYA_SCHED_KILL_GRACE": "2", "NAGAYA_SCHED_IDLE_EXIT": "20", "NAGAYA_SCHED_BACKEND": "local"}
NCPUS = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def sched_users(system: None, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    # Users of our own: other suites kill every process of theirs after each test, runners included.
    a, b = ensure_users(("nagaya-s1", 500000), ("nagaya-s2", 700000))
    for u in (a, b):
        u.extra_env.update(ENV)
        reset_user(u)
        import_images(u, rootfs, app_layout)
    yield a, b
    for u in (a, b):
        for j in _active(u):
            u.nagaya("cancel", j)
        wait_for(lambda u=u: not job_processes(u), 10, "jobs to end")
        stop_runner(u)
        wait_for(lambda u=u: not live_processes(u), 5, f"no process of {u.name} left")


def _active(u: User) -> list[str]:
    import json

    r = u.nagaya("jobs", "--json")
    return [j["id"] for j in json.loads(r.stdout or "[]") if j["state"] in ("PENDING", "RUNNING", "SUSPENDED")]


@pytest.fixture
def alice(sched_users: tuple[User, User]) -> User:
    return sched_users[0]


@pytest.fixture
def bob(sched_users: tuple[User, User]) -> User:
    return sched_users[1]


def test_submit_state_logs_exit_code(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--name", "hello", "--",
                 "sh", "-c", "echo out; echo err >&2; grep Cpus_allowed_list /proc/self/status; exit 3")
    info = wait_state(alice, job)
    assert info["state"] == "FAILED" and info["exit_code"] == 3
    assert info["name"] == "hello" and info["user"] == alice.name and info["nodes"] == socket.gethostname()
    assert info["digest"] == digest_of(alice, "bb")
    assert info["start_time"] and info["end_time"] and info["submit_time"]
    r = alice.nagaya("logs", job)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[:2] == ["out", "err"]
    if NCPUS > 1:                      # one CPU asked for: one CPU of its own
        assert lines[2].split()[-1].isdigit()
    ok = submit(alice, "--image", "bb", "--", "true")
    assert wait_state(alice, ok)["state"] == "COMPLETED" and show(alice, ok)["exit_code"] == 0
    r = alice.nagaya("jobs")
    assert r.returncode == 0 and "hello" in r.stdout and "FAILED" in r.stdout
    rec = (alice.home / ".local/share/nagaya/audit.jsonl").read_text().splitlines()
    assert any('"action":"submit"' in x and f'"job":"{job}"' in x for x in rec)


def test_script_form(alice: User) -> None:
    script = alice.mkdir(alice.home / "sched-script") / "job.sh"
    script.write_text("#!/bin/sh\n#NAGAYA --image bb\n#SBATCH --job-name=scripted\n#SBATCH --time=1\n"
                      "echo \"args: $*\"\necho \"job $NAGAYA_JOB_ID\"\n")
    os.chown(script, alice.uid, alice.gid)
    job = submit(alice, str(script), "a1", "a2", cwd=script.parent)
    info = wait_state(alice, job)
    assert info["state"] == "COMPLETED", alice.nagaya("logs", job).stdout
    assert info["name"] == "scripted" and info["time_limit"] == 60
    assert alice.nagaya("logs", job).stdout.splitlines() == ["args: a1 a2", f"job {job}"]


def test_cancel_lets_the_app_clean_up(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--",
                 "sh", "-c", "trap 'echo cleaning up; exit 7' TERM; echo ready; while :; do sleep 0.1; done")
    wait_for(lambda: "ready" in alice.nagaya("logs", job).stdout, what="the app to start")
    r = alice.nagaya("cancel", job)
    assert r.returncode == 0, r.stderr
    info = wait_state(alice, job)
    assert info["state"] == "CANCELLED" and info["exit_code"] == 7
    assert "cleaning up" in alice.nagaya("logs", job).stdout
    wait_for(lambda: not job_processes(alice), 5, "no process of the job left")
    assert alice.nagaya("cancel", job).returncode != 0         # already finished


def test_cancel_an_app_that_ignores_term(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done")
    wait_for(lambda: "ready" in alice.nagaya("logs", job).stdout, what="the app to start")
    assert alice.nagaya("cancel", job).returncode == 0
    info = wait_state(alice, job, timeout=10)                   # KILL after the 2 s grace
    assert info["state"] == "CANCELLED" and info["exit_code"] == 128 + 9
    wait_for(lambda: not job_processes(alice), 5, "no process of the job left")


def test_time_limit(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--time", "0:02", "--",
                 "sh", "-c", "trap 'echo time is up; exit 9' TERM; while :; do sleep 0.1; done")
    info = wait_state(alice, job, timeout=15)
    assert info["state"] == "TIMEOUT" and info["time_limit"] == 2
    assert "time is up" in alice.nagaya("logs", job).stdout


def test_suspend_resume(alice: User) -> None:
    job = submit(alice, "--image", "bb", "--", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done")
    wait_for(lambda: alice.nagaya("logs", job).stdout.count("\n") > 2, what="output")
    assert alice.nagaya("job", "suspend", job).returncode == 0
    wait_state(alice, job, ("SUSPENDED",), 5)
    # The app itself is stopped (ps state T), and its output no longer grows.
    wait_for(lambda: (apps := [p for p in alice.processes() if "i=$((i+1))" in p])
             and all(p.split()[1].startswith("T") for p in apps), 5, f"the app to stop {alice.processes()}")
    frozen = alice.nagaya("logs", job).stdout
    assert alice.nagaya("logs", job).stdout == frozen, "the job kept running while suspended"
    assert alice.nagaya("job", "resume", job).returncode == 0
    wait_state(alice, job, ("RUNNING",), 5)
    wait_for(lambda: alice.nagaya("logs", job).stdout != frozen, 5, "the job to continue")
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job)["state"] == "CANCELLED"


def _blocker(user: User) -> str:
    """A job holding every CPU, so the next one waits in the queue."""
    job = submit(user, "--image", "bb", "--cpus", str(NCPUS), "--", "sh", "-c", "echo up; sleep 60")
    wait_state(user, job, ("RUNNING",), 10)
    return job


def test_limits_queue_and_digest_pinning(alice: User) -> None:
    assert alice.nagaya("image", "tag", "bb", "moving:v1").returncode == 0
    pinned = digest_of(alice, "bb")
    blocker = _blocker(alice)
    job = submit(alice, "--image", "moving:v1", "--", "cat", "/app/data.txt")
    assert show(alice, job)["state"] == "PENDING"
    # The tag moves to another image before the job starts: the job still runs the digest of submit time.
    assert alice.nagaya("image", "tag", "app:1", "moving:v1").returncode == 0
    assert digest_of(alice, "moving:v1") != pinned
    assert show(alice, job)["state"] == "PENDING"
    assert alice.nagaya("cancel", blocker).returncode == 0
    info = wait_state(alice, job)
    assert info["state"] == "COMPLETED" and info["digest"] == pinned
    assert alice.nagaya("logs", job).stdout == "image data\n"       # bb's file, not app:1's "upper data"
    r = alice.nagaya("submit", "--image", "bb", "--cpus", str(NCPUS + 1), "--", "true")
    assert r.returncode != 0 and "CPUs" in r.stderr


def test_runner_restart_keeps_records(alice: User) -> None:
    done = submit(alice, "--image", "bb", "--", "echo", "before")
    wait_state(alice, done)
    blocker = _blocker(alice)
    queued = submit(alice, "--image", "bb", "--", "echo", "after")
    old = (state_dir(alice) / "runner.pid").read_text()
    stop_runner(alice)                                  # SIGKILL: no chance to save anything
    # The running job goes on under its watcher; the next command finds the pending job and starts a runner.
    assert show(alice, blocker)["state"] == "RUNNING"
    assert show(alice, queued)["state"] == "PENDING"
    wait_for(lambda: (state_dir(alice) / "runner.pid").read_text() != old, 10, "a new runner")
    assert show(alice, done)["state"] == "COMPLETED"
    assert alice.nagaya("cancel", blocker).returncode == 0
    assert wait_state(alice, blocker)["state"] == "CANCELLED"
    assert wait_state(alice, queued)["state"] == "COMPLETED"
    assert alice.nagaya("logs", queued).stdout == "after\n"


def test_users_cannot_see_each_others_jobs(alice: User, bob: User, tmp_path: Path) -> None:
    secret = "alice-secret-output"
    job = submit(alice, "--image", "bb", "--name", "alices", "--", "sh", "-c", f"echo {secret}; sleep 60")
    wait_for(lambda: secret in alice.nagaya("logs", job).stdout, what="alice's job to start")
    r = bob.nagaya("jobs")
    assert r.returncode == 0 and "alices" not in r.stdout
    r = bob.nagaya("job", "show", job)
    assert "alices" not in r.stdout and alice.name not in r.stdout
    r = bob.nagaya("logs", job)
    assert secret not in r.stdout
    bob.nagaya("cancel", job)
    r = bob.nagaya("jobs", "--all")
    assert r.returncode != 0 and "administrators" in r.stderr
    # Nor around nagaya: the state dir (records, logs) is private.
    assert (state_dir(alice).stat().st_mode & 0o777) == 0o700
    r = bob.run(["cat", str(state_dir(alice) / "logs" / f"{job}.out")])
    assert r.returncode != 0 and secret not in r.stdout
    assert show(alice, job)["state"] == "RUNNING"
    # An administrator (root) sees everyone's.
    r = subprocess.run(["nagaya", "jobs", "--all", "--json"], capture_output=True, text=True, env={
        **os.environ, "XDG_DATA_HOME": str(tmp_path), "NAGAYA_SCHED_BACKEND": "local"})
    assert r.returncode == 0 and "alices" in r.stdout
    assert alice.nagaya("cancel", job).returncode == 0
    assert wait_state(alice, job)["state"] == "CANCELLED"


def test_dependencies(alice: User, bob: User) -> None:
    release = alice.home / "dep-release"
    first = submit(alice, "--image", "bb", "--", "sh", "-c",
                   f"while [ ! -e {release} ]; do sleep 0.1; done; exit 4")
    ok = submit(alice, "--image", "bb", "--after", f"{first}:ok", "--", "echo", "not me")
    anyway = submit(alice, "--image", "bb", "--after", first + ":any", "--", "echo", "after any")
    free = submit(alice, "--image", "bb", "--", "echo", "not held up")     # a held job blocks no one
    assert wait_state(alice, free)["state"] == "COMPLETED"
    assert show(alice, ok)["state"] == "PENDING" and show(alice, anyway)["state"] == "PENDING"
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    assert wait_state(alice, first)["state"] == "FAILED"
    info = wait_state(alice, ok)
    assert info["state"] == "CANCELLED" and info["reason"] == "dependency not satisfied", info
    assert wait_state(alice, anyway)["state"] == "COMPLETED"
    assert alice.nagaya("logs", anyway).stdout == "after any\n"
    os.unlink(release)
    r = bob.nagaya("submit", "--image", "bb", "--after", first, "--", "true")
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr


def test_arrays(alice: User) -> None:
    release = alice.home / "arr-release"
    arr = submit(alice, "--image", "bb", "--array", "1-4%2", "--", "sh", "-c",
                 f"echo task $NAGAYA_ARRAY_TASK_ID; while [ ! -e {release} ]; do sleep 0.1; done; "
                 "exit $((NAGAYA_ARRAY_TASK_ID == 3))")
    after = submit(alice, "--image", "bb", "--after", f"{arr}:any", "--", "echo", "after the array")
    wait_for(lambda: show(alice, arr)["reason"] == "tasks: 2 PENDING, 2 RUNNING", 20, "two tasks to run (%2)")
    ids = {j["id"]: j["state"] for j in nagaya_json(alice, "jobs") if j["id"].startswith(f"{arr}.")}
    assert sorted(ids) == [f"{arr}.{i}" for i in range(1, 5)] and sorted(ids.values()).count("RUNNING") == 2, ids
    os.close(os.open(release, os.O_CREAT | os.O_WRONLY, 0o644))
    info = wait_state(alice, arr, timeout=30)
    assert info["state"] == "FAILED" and info["reason"] == "tasks: 3 COMPLETED, 1 FAILED", info
    assert show(alice, f"{arr}.3")["exit_code"] == 1
    assert alice.nagaya("logs", arr).stdout.splitlines() == [f"task {i}" for i in range(1, 5)]
    assert alice.nagaya("logs", f"{arr}.2").stdout == "task 2\n"
    assert wait_state(alice, after)["state"] == "COMPLETED"
    os.unlink(release)
    many = submit(alice, "--image", "bb", "--array", "1-3", "--", "sleep", "30")
    wait_for(lambda: show(alice, many)["state"] == "RUNNING", 20, "the array to start")
    assert alice.nagaya("cancel", many).returncode == 0
    assert wait_state(alice, many, timeout=30)["state"] == "CANCELLED"
