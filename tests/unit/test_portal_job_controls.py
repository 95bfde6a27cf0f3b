"""The Jobs page's controls beyond cancel (server side, FastAPI TestClient): the job's page offers the one its
state allows, the form goes through the job service's Scheduler as the logged-in user, with the session's
CSRF token only; another user's job is not found. The dispatcher's stand-in answers like the spool (the real
crossing: tests/e2e/test_portal_job_controls.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nagaya.errors import NotFound
from nagaya.server import app as app_module
from nagaya.server.job_service import JobService
from tests.helpers.inproc import portal_csrf, portal_login, server


class Wire:
    """bob's job 7, in whatever state the test sets; records the operations asked of it."""

    def __init__(self) -> None:
        self.state, self.reason, self.sent = "RUNNING", "", []  # type: ignore[var-annotated]

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        if user != "bob" or args.get("job_id") != "7":
            raise NotFound(f"job {args.get('job_id')} not found")
        self.sent.append(op)
        if op == "status":
            return {"id": "7", "user": "bob", "state": self.state, "reason": self.reason, "name": "burn"}
        if op == "logs":
            return {"log": "tick\n", "truncated": False}
        if op == "usage":
            return []
        return {}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, Wire]]:
    wire = Wire()
    monkeypatch.setattr(app_module, "default_jobs", lambda site: JobService(site, wire))   # type: ignore[arg-type]
    with server(tmp_path) as c:
        yield c, wire


def offered(c: TestClient) -> set[str]:
    html = c.get("/jobs/7/log").text
    return {w for w in ("suspend", "resume", "hold", "release", "cancel") if f'action="/jobs/7/{w}"' in html}


def test_the_page_offers_what_the_state_allows(site: tuple[TestClient, Wire]) -> None:
    c, wire = site
    portal_login(c, "bob")
    cases = [("RUNNING", "", {"suspend", "cancel"}), ("SUSPENDED", "", {"resume", "cancel"}),
             ("PENDING", "", {"hold", "cancel"}), ("PENDING", "held", {"release", "cancel"}), ("COMPLETED", "", set())]
    for state, reason, want in cases:
        wire.state, wire.reason = state, reason
        assert offered(c) == want, (state, reason)


def test_a_control_runs_as_the_user_with_the_sessions_token(site: tuple[TestClient, Wire]) -> None:
    c, wire = site
    portal_login(c, "bob")
    csrf = portal_csrf(c, "/jobs/7/log")
    wire.sent.clear()
    assert c.post("/jobs/7/suspend", data={"csrf": "forged"}, follow_redirects=False).status_code == 403
    assert "suspend" not in wire.sent
    r = c.post("/jobs/7/suspend", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/jobs/7", r.text
    assert wire.sent[-1] == "suspend"
    for what in ("resume", "hold", "release"):
        assert c.post(f"/jobs/7/{what}", data={"csrf": csrf}, follow_redirects=False).status_code == 303
        assert wire.sent[-1] == what
    portal_login(c, "ada")                          # another user's job: not found, as everywhere
    csrf = portal_csrf(c, "/jobs")
    wire.sent.clear()
    assert c.post("/jobs/7/suspend", data={"csrf": csrf}, follow_redirects=False).status_code == 404
    assert wire.sent == []
