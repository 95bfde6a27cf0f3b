"""Per-user caps on every job gateway, the slurmrestd one included: a user's operations beyond the cap are
refused at once (JobsBusy, HTTP 429) while other users' go through, and a slurmrestd that never answers
costs a request seconds, not minutes."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nagaya.sched.onbehalf import USER_OPS, Bounded, JobsBusy, JobsUnavailable
from nagaya.sched.slurmrest import SlurmRest
from nagaya.server.job_service import default_jobs
from nagaya.server.jobs import Dispatched


class Slow:
    """A spool whose calls wait until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        self.release.wait(30)
        return []


class Gateway:
    """The old call(user, op, args) shape over the Scheduler protocol, so the assertions read as before."""

    def __init__(self, inner: Bounded) -> None:
        self.inner = inner

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        assert op == "list"
        return self.inner.for_user(user).list()


def test_cap_refuses_at_once_and_spares_others() -> None:
    slow = Slow()
    gw = Gateway(Bounded(Dispatched(slow)))
    threads = [threading.Thread(target=gw.call, args=("mallory", "list", {})) for _ in range(USER_OPS)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    with pytest.raises(JobsBusy):
        gw.call("mallory", "list", {})
    assert time.monotonic() - t0 < 0.1                      # refused at once, not queued
    done: list[Any] = []
    other = threading.Thread(target=lambda: done.append(gw.call("alice", "list", {})))
    other.start()
    slow.release.set()
    for t in [*threads, other]:
        t.join(5)
    assert done == [[]]
    assert gw.call("mallory", "list", {}) == []              # the cap counts operations in flight, no more


def test_the_slurmrestd_gateway_is_capped(tmp_path: Path) -> None:
    key = tmp_path / "jwt.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    settings = SimpleNamespace(signing_key=str(tmp_path / "certs" / "key.pem"), portal_submit="slurmrestd",
                               slurmrestd_url="http://127.0.0.1:9", slurmrestd_jwt_key=str(key), job_nagaya="",
                               job_partition="", portal_pull_hours=24)
    jobs = default_jobs(SimpleNamespace(settings=settings))          # type: ignore[arg-type]
    assert isinstance(jobs.schedulers, Bounded) and isinstance(jobs.schedulers.inner, SlurmRest)


def test_a_silent_slurmrestd_costs_seconds(tmp_path: Path) -> None:
    key = tmp_path / "jwt.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    with socket.socket() as srv:                 # accepts, never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        gw = SlurmRest(f"http://127.0.0.1:{srv.getsockname()[1]}", key, tmp_path / "logs")
        gw.timeout = 1.0
        t0 = time.monotonic()
        with pytest.raises(JobsUnavailable):
            gw._request("nobody-here", "GET", "/jobs")
        assert time.monotonic() - t0 < 5
    assert SlurmRest.timeout <= 15                       # the site's own: seconds, not minutes
