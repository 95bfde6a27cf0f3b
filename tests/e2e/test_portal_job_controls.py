"""Job controls beyond cancel, through /api/jobs: the portal's Scheduler (the root dispatcher, the user's own
local backend run as the user) suspends and resumes a running job, holds and releases a pending one, and
answers another user exactly as for a missing job. Each control is audited with its door."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import api_login


def state(portal: Any, tok: tuple[str, str], job: str) -> str:
    r = portal.api("GET", f"/api/jobs/{job}", auth=tok)
    assert r.status_code == 200, r.text
    return str(r.json()["state"])


def wait_state(portal: Any, tok: tuple[str, str], job: str, want: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while (got := state(portal, tok, job)) != want:
        assert time.monotonic() < deadline, f"job {job} is {got}, never {want}"
        time.sleep(0.5)


def test_suspend_resume_hold_release_as_the_owner_only(portal: Any, users: dict[str, Any], world: dict[str, Any],
                                                        job_service: Path) -> None:
    alice, bob = api_login(portal, users["alice"]), api_login(portal, users["bob"])
    image = f"{portal.registry}/nye-alice/hello:1"
    r = portal.api("POST", "/api/jobs", auth=alice, json={
        "image": image, "command": ["/bin/busybox", "sleep", "300"], "name": "e2e-controls"})
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    try:
        wait_state(portal, alice, job, "RUNNING")
        for what in ("suspend", "resume", "hold", "release"):          # another user's job: as if missing
            assert portal.api("POST", f"/api/jobs/{job}/{what}", auth=bob).status_code == 404, what
        assert state(portal, alice, job) == "RUNNING"
        r = portal.api("POST", f"/api/jobs/{job}/suspend", auth=alice)
        assert r.status_code == 200 and r.json() == {"suspended": job}, r.text
        wait_state(portal, alice, job, "SUSPENDED")
        r = portal.api("POST", f"/api/jobs/{job}/resume", auth=alice)
        assert r.status_code == 200 and r.json() == {"resumed": job}, r.text
        wait_state(portal, alice, job, "RUNNING")
        # a running job cannot be held: a clear refusal, not a server error
        r = portal.api("POST", f"/api/jobs/{job}/hold", auth=alice)
        assert 400 <= r.status_code < 500, r.text
    finally:
        portal.api("DELETE", f"/api/jobs/{job}", auth=alice)
    wait_state(portal, alice, job, "CANCELLED")
    admin = world["creds"]["admin"]
    rows = [e for action in ("job.suspend", "job.resume")
            for e in portal.api("GET", "/api/audit", auth=admin, params={"action": action}).json()
            if e["details"].get("job") == job]
    assert sorted(e["action"] for e in rows) == ["job.resume", "job.suspend"]
    assert {e["actor"] for e in rows} == {users["alice"].name} and {e["details"]["via"] for e in rows} == {"api"}
