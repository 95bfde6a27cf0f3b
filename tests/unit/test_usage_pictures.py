"""The portal's pictures of use, server side (FastAPI TestClient): a job page charts the samples the job service
answers (sampled here by the real sampler from a real process) as SVG, and a project page shows its storage
against its quota with the quota check's own figure. No inline styles: the portal's CSP forbids them."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nagaya.errors import NotFound
from nagaya.sched.usage import Sampler, read
from nagaya.server import app as app_module
from nagaya.server.job_service import JobService
from tests.helpers.inproc import login, portal_login, push, server

MiB = 1 << 20


class Gateway:
    """A job gateway that answers for bob's job 7 with the samples in `usage` (the dispatcher needs root and
    a user's runner; tests/integration/test_job_usage_local.py covers that path)."""

    def __init__(self, usage: list[dict[str, Any]]) -> None:
        self.usage = usage

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        if user != "bob" or args.get("job_id") != "7":
            raise NotFound(f"job {args.get('job_id')} not found")
        if op == "status":
            return {"id": "7", "user": "bob", "state": "RUNNING", "name": "burn", "backend": "local"}
        if op == "usage":
            return self.usage
        if op == "logs":
            return {"log": "", "truncated": False}
        raise NotFound(op)


@pytest.fixture
def samples(tmp_path: Path) -> list[dict[str, Any]]:
    s = Sampler(os.getpid(), tmp_path / "7.usage", gpus=1, interval=0)
    s.tick()
    end = time.process_time() + 0.2
    while time.process_time() < end:                # some CPU time between the readings
        pass
    s.tick()
    return read(tmp_path / "7.usage")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, samples: list[dict[str, Any]]
         ) -> Iterator[tuple[TestClient, Gateway]]:
    gw = Gateway(samples)
    monkeypatch.setattr(app_module, "default_jobs", lambda site: JobService(site, gw))   # type: ignore[arg-type]
    with server(tmp_path) as c:
        yield c, gw


def test_job_page_charts_cpu_and_memory(site: tuple[TestClient, Gateway], samples: list[dict[str, Any]]) -> None:
    c, gw = site
    assert len(samples) == 2 and samples[1]["cpu_seconds"] > samples[0]["cpu_seconds"]
    portal_login(c, "bob")
    page = c.get("/jobs/7")
    assert page.status_code == 200, page.text
    html = page.text
    assert 'aria-label="CPU (cores in use) over time"' in html and 'aria-label="Memory (resident) over time"' in html
    assert html.count("<polyline points=") == 2
    assert "GPUs held: 1" in html
    assert not re.search(r"\sstyle=", html) and "<style" not in html
    assert 'hx-get="/jobs/7/usage" hx-trigger="every 10s"' in html     # a running job's charts refresh
    part = c.get("/jobs/7/usage", headers={"HX-Request": "true"}).text
    assert part.count("<polyline points=") == 2 and "<html" not in part

    gw.usage = []                                   # nothing sampled yet: a sentence, no chart
    html = c.get("/jobs/7").text
    assert "No usage samples yet" in html and "<polyline" not in html

    portal_login(c, "ada")                          # another user's job: not found, as everywhere
    assert c.get("/jobs/7").status_code == 404
    assert c.get("/jobs/7/usage").status_code == 404


def test_project_page_shows_storage_against_quota(site: tuple[TestClient, Gateway]) -> None:
    c, _ = site
    auth = login(c, "ada")
    assert c.post("/api/projects", json={"name": "lab"}, headers=auth).status_code == 201
    push(c, "lab/app", "1", "sha256:" + "1" * 64, 3 * MiB)
    push(c, "lab/app", "2", "sha256:" + "1" * 64, 3 * MiB)    # the same image twice: counted once
    assert c.put("/api/admin/projects/lab/quota", json={"quota_bytes": 4 * MiB}, headers=auth).status_code == 200
    portal_login(c, "ada")
    html = c.get("/projects/lab").text
    assert "3.0 MiB used of 4.0 MiB (75.0%)" in html
    bar = re.search(r'<svg role="img" aria-label="storage used of the quota".*?</svg>', html, re.S)
    assert bar and 'width="450.0"' in bar.group(0), html
    assert not re.search(r"\sstyle=", html)

    push(c, "lab/tools", "1", "sha256:" + "2" * 64, 2 * MiB)   # past the quota: said, and the bar is full
    html = c.get("/projects/lab").text
    assert "5.0 MiB used of 4.0 MiB" in html and "over quota" in html


def test_the_api_answers_the_same_samples(site: tuple[TestClient, Gateway], samples: list[dict[str, Any]]) -> None:
    c, _ = site
    r = c.get("/api/jobs/7/usage", headers=login(c, "bob"))
    assert r.status_code == 200 and r.json() == samples
    assert c.get("/api/jobs/7/usage", headers=login(c, "ada")).status_code == 404
