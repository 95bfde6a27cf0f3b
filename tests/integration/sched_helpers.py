"""Shared by the scheduler suites: own test users (other suites `pkill -u` theirs), polling, no sleeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.users import User

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition", every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def nagaya_json(user: User, *args: str, **kw: Any) -> Any:
    r = user.nagaya(*args, "--json", **kw)
    assert r.returncode == 0, f"nagaya {' '.join(args)}: {r.stderr}"
    return json.loads(r.stdout)


def submit(user: User, *args: str, **kw: Any) -> str:
    r = user.nagaya("submit", "--json", *args, **kw)      # --json before the job's own `--` and command
    assert r.returncode == 0, f"nagaya submit {' '.join(args)}: {r.stderr}"
    return str(json.loads(r.stdout)["id"])


def show(user: User, job: str, *extra: str) -> dict[str, Any]:
    return nagaya_json(user, "job", "show", job, *extra)


def wait_state(user: User, job: str, states: tuple[str, ...] = TERMINAL, timeout: float = 20.0,
               extra: tuple[str, ...] = ()) -> dict[str, Any]:
    return wait_for(lambda: (j := show(user, job, *extra))["state"] in states and j, timeout,
                    f"job {job} to reach {'/'.join(states)}", every=0.1)


def state_dir(user: User) -> Path:
    return user.home / ".local" / "share" / "nagaya" / "jobs"


def stop_runner(user: User) -> None:
    """Kill this user's local runner by the pid it recorded, and wait until it is gone."""
    try:
        pid, start = (state_dir(user) / "runner.pid").read_text().split()
    except (OSError, ValueError):
        return
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[19] != start:
                return
        os.kill(int(pid), signal.SIGKILL)
    except (OSError, IndexError):
        return
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 5, "the runner to exit")


def _zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def reset_user(user: User) -> None:
    stop_runner(user)
    if state_dir(user).exists():
        shutil.rmtree(state_dir(user))


def job_processes(user: User) -> list[str]:
    """The user's processes other than the runner itself (it idles on purpose; job watchers count)."""
    try:
        runner = (state_dir(user) / "runner.pid").read_text().split()[0]
    except (OSError, IndexError):
        runner = ""
    return [p for p in live_processes(user) if p.split()[0] != runner]


def live_processes(user: User) -> list[str]:
    return [p for p in user.processes() if not p.split()[1].startswith("Z")]


def import_images(user: User, rootfs: Path, app_layout: Path) -> None:
    for src, name in ((rootfs, "bb"), (app_layout, "app:1")):
        r = user.nagaya("image", "import", str(src), "--name", name)
        assert r.returncode == 0, r.stderr


def digest_of(user: User, image: str) -> str:
    r = user.nagaya("image", "inspect", image)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["digest"]


def ensure_users(a: tuple[str, int], b: tuple[str, int]) -> tuple[User, User]:
    ua, ub = User.ensure(*a), User.ensure(*b)
    for u in (ua, ub):
        subprocess.run(["chmod", "755", str(u.home)], check=False)
    return ua, ub
