"""`nagaya job usage` on the local backend, as an unprivileged user: a job that burns CPU and holds memory shows
rising CPU time and resident memory above what it allocated; another user's job answers like a missing one."""

from __future__ import annotations

import json
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

ENV = {"NAGAYA_SCHED_KILL_GRACE": "2", "NAGAYA_SCHED_IDLE_EXIT": "20", "NAGAYA_SCHED_BACKEND": "local"}
ALLOC = 96 << 20


@pytest.fixture(scope="module")
def users(system: None, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    a, b = ensure_users(("nagaya-us1", 9000000), ("nagaya-us2", 9100000))
    for u in (a, b):
        u.extra_env.update(ENV)
        reset_user(u)
        import_images(u, rootfs, app_layout)
    yield a, b
    for u in (a, b):
        r = u.nagaya("jobs", "--json")
        for j in json.loads(r.stdout or "[]"):
            if j["state"] in ("PENDING", "RUNNING", "SUSPENDED"):
                u.nagaya("cancel", j["id"])
        wait_for(lambda u=u: not job_processes(u), 15, "jobs to end")
        stop_runner(u)
        wait_for(lambda u=u: not live_processes(u), 5, f"no process of {u.name} left")


def _usage(u: User, job: str) -> list[dict]:
    r = u.nagaya("job", "usage", job, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cpu_rises_and_memory_shows_the_allocation(users: tuple[User, User]) -> None:
    alice, bob = users
    # dd holds one ALLOC-sized buffer, filled from /dev/zero again and again: CPU time and resident memory
    job = submit(alice, "--image", "bb", "--", "dd", "if=/dev/zero", "of=/dev/null", f"bs={ALLOC}",
                 "count=100000000")
    wait_state(alice, job, ("RUNNING",))

    def risen() -> list[dict] | None:
        s = _usage(alice, job)
        return s if len(s) >= 3 and s[-1]["cpu_seconds"] > s[0]["cpu_seconds"] and s[-1]["rss_bytes"] > ALLOC \
            else None

    samples = wait_for(risen, 90, "usage samples with rising CPU and the allocation resident", every=1.0)
    assert [x["t"] for x in samples] == sorted(x["t"] for x in samples)
    assert max(x["cpu_cores"] for x in samples) > 0
    assert all(x["gpus"] == 0 and x["processes"] >= 1 for x in samples)
    assert (Path(alice.home) / ".local/share/nagaya/jobs/logs" / f"{job}.usage").stat().st_uid == alice.uid
    r = alice.nagaya("job", "usage", job)                  # the table for people
    assert r.returncode == 0 and "CORES" in r.stdout and "MiB" in r.stdout

    other = bob.nagaya("job", "usage", job, "--json")      # bob's own (empty) queue: no such job
    assert other.returncode != 0 and "not found" in other.stderr
    assert alice.nagaya("cancel", job).returncode == 0
    wait_state(alice, job)
    assert len(_usage(alice, job)) >= len(samples)         # kept after the end
