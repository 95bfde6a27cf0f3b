"""The portal's jobs on Grid Engine and on OpenPBS: a site whose users' backend is `gridengine` or `pbs` (their
nagaya config), reached through /api/jobs and the root dispatcher, which runs the user's own `Scheduler` as the
user. Alice submits, lists and cancels; Bob gets a missing job's answer. Real GE / PBS (machine-global: these
run one at a time, each cluster stopped before the next starts)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.e2e.conftest import api_login


@pytest.fixture(params=["gridengine", "pbs"])
def backend(request: pytest.FixtureRequest, users: dict[str, Any]) -> Iterator[str]:
    if request.param == "gridengine":
        from tests.helpers.gridengine import GridEngineCluster

        require(os.access("/usr/sbin/sge_qmaster", os.X_OK), "Grid Engine is not installed (bash deploy/install.sh)")
        cluster: Any = GridEngineCluster(gpus=0).start()
    else:
        from tests.helpers.pbs import PBS_EXEC, PBSCluster

        require(os.access(f"{PBS_EXEC}/sbin/pbs_server", os.X_OK), "OpenPBS is not built (bash deploy/openpbs.sh)")
        cluster = PBSCluster(gpus=0).start()
    saved: dict[Path, bytes | None] = {}
    try:
        for u in (users["alice"], users["bob"]):        # the users' own config: their jobs go to this scheduler
            f = u.u.home / ".config" / "nagaya" / "nagaya.toml"
            saved[f] = f.read_bytes() if f.exists() else None
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text((saved[f] or b"").decode() + f'\n[sched]\nbackend = "{request.param}"\n')
            for p in (f.parent.parent, f.parent, f):
                os.chown(p, u.u.uid, u.u.gid)
        yield request.param
    finally:
        for f, old in saved.items():
            if old is None:
                f.unlink(missing_ok=True)
            else:
                f.write_bytes(old)
        for u in (users["alice"], users["bob"]):
            shutil.rmtree(u.u.home / ".local/share/nagaya/jobs" / request.param, ignore_errors=True)
        cluster.stop()


def _job(portal: Any, tok: tuple[str, str], job: str) -> dict[str, Any]:
    r = portal.api("GET", f"/api/jobs/{job}", auth=tok)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait(portal: Any, tok: tuple[str, str], job: str, want: tuple[str, ...], timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (info := _job(portal, tok, job))["state"] not in want:
        assert time.monotonic() < deadline, f"job {job} is {info}, never {want}"
        time.sleep(0.5)
    return info


def test_portal_jobs_on_the_sites_scheduler(backend: str, portal: Any, users: dict[str, Any],
                                            world: dict[str, Any], job_service: Path) -> None:
    alice, bob = api_login(portal, users["alice"]), api_login(portal, users["bob"])
    image = f"{portal.registry}/nye-alice/hello:1"
    r = portal.api("POST", "/api/jobs", auth=alice, json={
        "image": image, "command": ["/bin/busybox", "echo", f"hello from {backend}"], "name": "portal-quick"})
    assert r.status_code == 201, r.text
    quick = str(r.json()["id"])
    info = _wait(portal, alice, quick, ("COMPLETED", "FAILED"))
    assert info["state"] == "COMPLETED" and info["backend"] == backend and info["digest"].startswith("sha256:"), info
    r = portal.api("POST", "/api/jobs", auth=alice, json={
        "image": image, "command": ["/bin/busybox", "sleep", "300"], "name": "portal-long"})
    assert r.status_code == 201, r.text
    long = str(r.json()["id"])
    _wait(portal, alice, long, ("RUNNING",))
    listed = portal.api("GET", "/api/jobs", auth=alice)
    assert listed.status_code == 200 and long in {str(j["id"]) for j in listed.json()}, listed.text
    assert portal.api("GET", f"/api/jobs/{long}", auth=bob).status_code == 404        # as if missing
    assert portal.api("DELETE", f"/api/jobs/{long}", auth=bob).status_code == 404
    assert long not in {str(j["id"]) for j in portal.api("GET", "/api/jobs", auth=bob).json()}
    r = portal.api("DELETE", f"/api/jobs/{long}", auth=alice)
    assert r.status_code in (200, 202, 204), r.text
    assert _wait(portal, alice, long, ("CANCELLED",))["backend"] == backend
