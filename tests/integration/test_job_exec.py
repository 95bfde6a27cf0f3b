"""`nagaya job exec|shell` into a running job's container, on the local backend, as unprivileged users:
the same pid and mount namespaces and environment as the job's app, exit codes, another user's job
answered like a missing one, an ended job in one line, and nothing left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.users import User
from tests.integration.sched_helpers import (
    ensure_users,
    import_images,
    job_processes,
    live_processes,
    reset_user,
    stop_runner,
    submit,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.integration

ENV = {"NAGAYA_SCHED_KILL_GRACE": "2", "NAGAYA_SCHED_IDLE_EXIT": "20", "NAGAYA_SCHED_BACKEND": "local",
       "EXEC_MARK": "from-the-submitter"}
# The app prints its namespaces, makes a file in the container's own /dev (bwrap's private tmpfs), waits.
APP = ("readlink /proc/self/ns/pid; readlink /proc/self/ns/mnt; echo inside > /dev/only-in-the-job; echo ready; "
       "while :; do sleep 0.2; done")


@pytest.fixture(scope="module")
def users(system: None, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    a, b = ensure_users(("nagaya-x1", 5000000), ("nagaya-x2", 5100000))
    for u in (a, b):
        u.extra_env.update(ENV)
        reset_user(u)
        import shutil

        shutil.rmtree(f"/tmp/.nagaya-jobs-{u.uid}", ignore_errors=True)
        import_images(u, rootfs, app_layout)
    yield a, b
    for u in (a, b):
        stop_runner(u)
        wait_for(lambda u=u: not live_processes(u), 10, f"no process of {u.name} left")


def _start(u: User) -> tuple[str, list[str]]:
    job = submit(u, "--image", "bb", "--", "sh", "-c", APP)
    wait_for(lambda: "ready" in u.nagaya("logs", job).stdout, 30, "the app to start")
    return job, u.nagaya("logs", job).stdout.splitlines()[:2]


def _records(u: User) -> list[str]:
    d = Path(f"/tmp/.nagaya-jobs-{u.uid}")
    return sorted(x for x in os.listdir(d)) if d.is_dir() else []


def test_exec_joins_the_jobs_container(users: tuple[User, User]) -> None:
    alice, _ = users
    job, ns = _start(alice)
    try:
        r = alice.nagaya("job", "exec", job, "--", "sh", "-c",
                         "readlink /proc/self/ns/pid; readlink /proc/self/ns/mnt; cat /dev/only-in-the-job; "
                         "echo $EXEC_MARK $NAGAYA_JOB_ID; id -u; cat /proc/self/status | grep NoNewPrivs")
        assert r.returncode == 0, r.stderr
        out = r.stdout.splitlines()
        assert out[:2] == ns                        # the app's own pid and mount namespaces
        assert out[2] == "inside"                   # a file that exists in the job's container only
        assert out[3] == f"from-the-submitter {job}"
        assert out[4] == str(alice.uid)
        assert out[5].split()[-1] == "1"
        assert not Path("/dev/only-in-the-job").exists()
        # exit codes as in `nagaya run`; a missing command is 127
        assert alice.nagaya("job", "exec", job, "--", "sh", "-c", "exit 5").returncode == 5
        r = alice.nagaya("job", "exec", job, "--", "no-such-cmd")
        assert r.returncode == 127 and "command not found" in r.stderr
        # stdin only with -i
        r = alice.nagaya("job", "exec", job, "-i", "--", "cat", input="piped\n")     # options after JOB too
        assert r.returncode == 0 and r.stdout == "piped\n"
        r = alice.nagaya("job", "exec", job, "--", "cat", input="piped\n")
        assert r.returncode == 0 and r.stdout == ""
        # the exec'd process is one of the container's: the app sees it in its pid namespace
        r = alice.nagaya("job", "exec", job, "--", "sh", "-c", "ls /proc | grep -c '^[0-9]'")
        assert r.returncode == 0 and int(r.stdout) >= 3
        assert len(_records(alice)) == 1
    finally:
        alice.nagaya("cancel", job)
    assert wait_state(alice, job)["state"] == "CANCELLED"
    r = alice.nagaya("job", "exec", job, "--", "true")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "has ended" in r.stderr
    wait_for(lambda: not job_processes(alice), 10, "no process of the job left")
    assert _records(alice) == []                    # the run removed its record


def test_another_users_job_is_a_missing_one(users: tuple[User, User]) -> None:
    alice, bob = users
    job, _ = _start(alice)
    try:
        theirs = bob.nagaya("job", "exec", job, "--", "id")
        missing = bob.nagaya("job", "exec", "987654", "--", "id")
        assert theirs.returncode == missing.returncode != 0
        assert theirs.stderr.replace(job, "ID") == missing.stderr.replace("987654", "ID")
        assert theirs.stdout == ""
        shell = bob.nagaya("job", "shell", job)
        assert shell.returncode != 0 and "not found" in shell.stderr
    finally:
        alice.nagaya("cancel", job)
    wait_state(alice, job)


def test_a_killed_run_leaves_a_record_that_leads_nowhere(users: tuple[User, User]) -> None:
    """The supervisor SIGKILLed: its record stays, but exec checks pid and start time and says it ended."""
    alice, _ = users
    job, _ = _start(alice)
    import json

    name = next(x for x in _records(alice) if x.startswith(f"local-{job}-"))
    rec = json.loads(Path(f"/tmp/.nagaya-jobs-{alice.uid}/{name}").read_text())
    os.kill(rec["pid"], 9)
    wait_state(alice, job)
    r = alice.nagaya("job", "exec", job, "--", "true")
    assert r.returncode != 0 and "has ended" in r.stderr
    assert name not in _records(alice)             # dropped once seen stale
    wait_for(lambda: not job_processes(alice), 10, "no process of the job left")
    # and without an exec: the next job's run prunes what a killed run left
    job2, _ = _start(alice)
    name2 = next(x for x in _records(alice) if x.startswith(f"local-{job2}-"))
    os.kill(json.loads(Path(f"/tmp/.nagaya-jobs-{alice.uid}/{name2}").read_text())["pid"], 9)
    wait_state(alice, job2)
    assert name2 in _records(alice)
    job3, _ = _start(alice)
    assert name2 not in _records(alice) and any(x.startswith(f"local-{job3}-") for x in _records(alice))
    alice.nagaya("cancel", job3)
    wait_state(alice, job3)
    wait_for(lambda: not job_processes(alice), 10, "no process of the job left")


# -- run --alloc with a terminal, driven by tmux ---------------------------------------------------------------

class Tmux:
    """A tmux server of the user's own, one window running `cmd`, read back with capture-pane."""

    def __init__(self, user: User, cmd: str) -> None:
        self.user, self.sock = user, f"nagaya-alloc-{os.getpid()}"
        r = user.run(["tmux", "-L", self.sock, "new-session", "-d", "-x", "150", "-y", "40", cmd])
        assert r.returncode == 0, r.stderr
        self.user.run(["tmux", "-L", self.sock, "set-option", "-g", "remain-on-exit", "on"])

    def keys(self, *keys: str) -> None:
        assert self.user.run(["tmux", "-L", self.sock, "send-keys", *keys]).returncode == 0

    def screen(self) -> str:
        return self.user.run(["tmux", "-L", self.sock, "capture-pane", "-p", "-S", "-200"]).stdout

    def wait(self, text: str, timeout: float = 30) -> str:
        try:
            return wait_for(lambda: text in (s := self.screen()) and s, timeout, f"{text!r} on the terminal")
        except AssertionError as e:
            raise AssertionError(f"{e}; the terminal shows:\n{self.screen().rstrip()}") from None

    def close(self) -> None:
        self.user.run(["tmux", "-L", self.sock, "kill-server"])


def test_alloc_on_the_local_backend_with_a_terminal(users: tuple[User, User]) -> None:
    alice, _ = users
    t = Tmux(alice, "nagaya run --alloc --cpus 1 --time 1 bb sh; echo ALLOC-EXIT=$?")
    try:
        t.keys('[ -t 0 ] && echo TTY-$NAGAYA_JOB_ID-""YES', "Enter")
        import re

        job = wait_for(lambda: (m := re.search(r"TTY-(\d+)-YES", t.screen())) and m.group(1), 30, "a terminal")
        import json

        jobs = json.loads(alice.nagaya("jobs", "--json").stdout)
        me = next(j for j in jobs if j["id"] == job)
        assert me["state"] == "RUNNING" and me["digest"].startswith("sha256:") and me["name"] == "interactive"
        r = alice.nagaya("job", "suspend", job)
        assert r.returncode != 0 and "Ctrl-Z" in r.stderr
        # the job can be entered like any other: same pid namespace as the shell on the terminal
        t.keys("readlink /proc/self/ns/pid", "Enter")
        t.wait("pid:[")
        r = alice.nagaya("job", "exec", job, "--", "readlink", "/proc/self/ns/pid")
        assert r.returncode == 0 and r.stdout.strip() in t.screen()
        # Ctrl-C ends the foreground command, not the allocation
        t.keys("sleep 300", "Enter")
        wait_for(lambda: any("sleep 300" in x for x in alice.processes()), 30, "sleep to run")
        t.keys("C-c")
        t.keys('echo STILL-""HERE', "Enter")
        t.wait("STILL-HERE")
        t.keys("exit 4", "Enter")
        t.wait("ALLOC-EXIT=4")
        info = wait_state(alice, job)
        assert info["state"] == "FAILED" and info["exit_code"] == 4
    finally:
        t.close()
    rec = (alice.home / ".local/share/nagaya/audit.jsonl").read_text().splitlines()
    assert any('"action":"alloc"' in x for x in rec)
    wait_for(lambda: not job_processes(alice), 10, "no process of the job left")
    assert _records(alice) == []


def test_alloc_time_limit_and_cancel(users: tuple[User, User]) -> None:
    alice, _ = users
    t = Tmux(alice, "nagaya run --alloc --time 0:2 bb sleep 300; echo ALLOC-EXIT=$?")
    try:
        t.wait("ALLOC-EXIT=143", 40)            # TERM at the limit, as the app sees it
        assert "time limit" in t.screen()
    finally:
        t.close()
    import json

    last = json.loads(alice.nagaya("jobs", "--json").stdout)[-1]
    assert last["state"] == "TIMEOUT"
    t = Tmux(alice, "nagaya run --alloc bb sleep 300; echo ALLOC-EXIT=$?")
    try:
        job = wait_for(lambda: next((j["id"] for j in json.loads(alice.nagaya("jobs", "--json").stdout)
                                     if j["state"] == "RUNNING" and j["name"] == "interactive"), None), 30, "alloc")
        assert alice.nagaya("cancel", job).returncode == 0
        t.wait("ALLOC-EXIT=143", 30)
        assert wait_state(alice, job)["state"] == "CANCELLED"
    finally:
        t.close()
    wait_for(lambda: not job_processes(alice), 10, "no process of the job left")


@pytest.mark.parametrize("how", ["job shell {job}", "job exec {job} -it -- sh"])
def test_job_shell_on_a_terminal(users: tuple[User, User], how: str) -> None:
    """What the portal's web terminal runs: `job shell` and `job exec JOB -it -- sh` with a pty on stdin."""
    alice, _ = users
    job, ns = _start(alice)
    t = Tmux(alice, f"nagaya {how.format(job=job)}; echo SHELL-EXIT=$?")
    try:
        t.keys('[ -t 0 ] && echo TTY-""YES $(readlink /proc/self/ns/pid) $(cat /dev/only-in-the-job)', "Enter")
        t.wait(f"TTY-YES {ns[0]} inside")
        t.keys("sleep 300", "Enter")
        wait_for(lambda: any("sleep 300" in x for x in alice.processes()), 30, "sleep to run")
        t.keys("C-c")                               # the foreground command, not the shell
        t.keys('echo STILL-""HERE', "Enter")
        t.wait("STILL-HERE")
        t.keys("exit 3", "Enter")
        t.wait("SHELL-EXIT=3")
    finally:
        t.close()
        alice.nagaya("cancel", job)
    wait_state(alice, job)
    wait_for(lambda: not job_processes(alice), 10, "no process of the job left")


def test_exec_has_the_jobs_gpus(users: tuple[User, User]) -> None:
    from tests.helpers.fake_gpu import fake_gpus, gpu_locks

    alice, _ = users
    env = gpu_locks(fake_gpus(Path("/tmp/nagaya-fake-gpu-exec"), 2), Path("/tmp/nagaya-fake-gpu-exec"))
    probe = "echo devs $(ls /dev | grep nvidia | tr '\\n' ' ') cuda=$CUDA_VISIBLE_DEVICES; nvidia-smi"
    job = submit(alice, "--gpus", "1", "--image", "bb", "--", "sh", "-c", probe + "; while :; do sleep 0.2; done",
                 env=env)
    try:
        want = wait_for(lambda: (o := alice.nagaya("logs", job).stdout).count("\n") >= 2 and o, 30, "the app")
        r = alice.nagaya("job", "exec", job, "--", "sh", "-c", probe)
        assert r.returncode == 0, r.stderr
        assert r.stdout == want and "devs nvidia0 nvidiactl cuda=0" in want and "NVIDIA-SMI fake" in want, want
    finally:
        alice.nagaya("cancel", job)
    wait_state(alice, job)
    wait_for(lambda: not job_processes(alice), 10, "no process of the job left")


def test_alloc_job_control(users: tuple[User, User]) -> None:
    """Ctrl-Z stops the allocation's command in an interactive shell, `fg` continues it, Ctrl-C ends it."""
    alice, _ = users
    t = Tmux(alice, "bash --norc --noprofile -i")
    try:
        t.keys("nagaya run --alloc bb sh -c 'echo G\"\"O; sleep 300; echo not-\"\"interrupted'", "Enter")
        t.wait("GO")
        wait_for(lambda: any("sleep 300" in x for x in alice.processes()), 30, "sleep to run")
        t.keys("C-z")
        t.wait("Stopped")
        wait_for(lambda: any(x.split()[1].startswith("T") and "sleep 300" in x for x in alice.processes()), 10,
                 "the container's command to be stopped")
        t.keys("fg", "Enter")
        wait_for(lambda: any(not x.split()[1].startswith("T") and "sleep 300" in x for x in alice.processes()), 10,
                 "the command to continue")
        t.keys("C-c")
        t.keys('echo RC-$?-""END', "Enter")
        t.wait("RC-130-END")
        assert "not-interrupted" not in t.screen()
    finally:
        t.close()
    wait_for(lambda: not job_processes(alice), 10, "no process of the job left")
