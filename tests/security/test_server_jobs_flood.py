"""Shared services never wait on a user's file or process. One user's config is a FIFO; another keeps every
job operation of theirs hanging (their jobs database locked) and floods the jobs API. Every other user's
login, dashboard, registry token and job list must still answer at once; the flooder is told 429 at once,
the hanging operations are killed after a few seconds, and the flooder's service recovers afterwards."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from nagaya.server.jobs import OP_TIMEOUT, REPLY_TIMEOUT
from tests.integration.site.conftest import Site, SiteUser, module_people
from tests.security.helpers import PY, portal

pytestmark = pytest.mark.integration

FLOOD, CONCURRENCY = 200, 50
# Seconds for each of the victim's requests during the flood (goal: < 1 s; 0.1–1.1 s on a quiet 2-core machine,
# 3.7 s once under a full CI's load). A victim queued behind the flooder's hanging operations would wait
# until they are killed, OP_TIMEOUT (15 s) or more: the deadline keeps well clear of both.
DEADLINE = 5.0
assert DEADLINE < OP_TIMEOUT / 2


@pytest.fixture(scope="module")
def users(site: Site) -> dict[str, SiteUser]:
    return module_people(site, "fl", ("victim", "fifo", "flooder"))


def _jobs(site: Site, creds: tuple[str, str], timeout: float = 60) -> httpx.Response:
    with httpx.Client(timeout=timeout) as c:
        return c.get(f"{site.server}/api/jobs", auth=creds)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def test_fifo_config_answers_at_once(site: Site, users: dict[str, SiteUser]) -> None:
    u = users["fifo"]
    cfg = u.u.home / ".config" / "nagaya" / "nagaya.toml"
    r = u.run(["sh", "-c", f"mkdir -p {cfg.parent} && rm -f {cfg} && mkfifo {cfg}"])
    assert r.returncode == 0, r.stderr
    try:
        took, resp = _timed(lambda: _jobs(site, u.creds(site.registry)))
        assert took < 10, f"a FIFO config held the request for {took:.1f} s"
        assert resp.status_code == 400 and "plain file" in resp.json()["detail"], resp.text
        assert "\n" not in resp.json()["detail"]
    finally:
        cfg.unlink(missing_ok=True)
    assert _jobs(site, u.creds(site.registry)).status_code == 200          # their own service is back


@pytest.fixture
def locked_jobs(site: Site, users: dict[str, SiteUser]) -> Iterator[SiteUser]:
    """The flooder's jobs database held locked: each of their job operations waits on it until killed."""
    u = users["flooder"]
    assert _jobs(site, u.creds(site.registry)).status_code == 200          # creates the database
    found = sorted(u.u.home.glob(".local/*/nagaya/jobs/jobs.db"))
    assert found, "the local executor keeps its jobs elsewhere: update this test"
    holder = u.u.popen([PY, "-c", "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None);"
                        "c.execute('PRAGMA journal_mode=DELETE'); c.execute('BEGIN EXCLUSIVE');"
                        "print('locked', flush=True); time.sleep(300)", str(found[0])],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked", holder.stderr
    yield u
    holder.kill()
    holder.wait()


def _ops_of(u: SiteUser) -> list[str]:
    return [p for p in u.u.processes() if "nagaya.server.jobs op" in p]


def test_flood_of_hanging_job_operations_starves_no_one(site: Site, users: dict[str, SiteUser],
                                                        locked_jobs: SiteUser) -> None:
    victim, flooder = users["victim"], locked_jobs
    vcreds, fcreds = victim.creds(site.registry), flooder.creds(site.registry)
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        flood = [pool.submit(_timed, lambda: _jobs(site, fcreds, timeout=REPLY_TIMEOUT + 30))
                 for _ in range(FLOOD)]
        time.sleep(1.0)                                 # the flood is on: the service's pools are under it
        seen: dict[str, list[float]] = {"login": [], "dashboard": [], "token": [], "own jobs": []}
        while not all(f.done() for f in flood) or not seen["login"]:
            took, (c, r) = _timed(lambda: portal(site, victim.name, victim.password, timeout=30))
            assert r.status_code in (200, 303) and "nagaya_session" in c.cookies, r.text
            seen["login"].append(took)
            took, r = _timed(lambda c=c: c.get("/dashboard"))  # type: ignore[misc]
            assert r.status_code == 200 and victim.name in r.text
            seen["dashboard"].append(took)
            c.close()
            took, r = _timed(lambda: site.token(f"repository:{victim.name}/app:pull", vcreds))
            assert r.status_code == 200, r.text
            seen["token"].append(took)
            took, r = _timed(lambda: _jobs(site, vcreds))
            assert r.status_code == 200, r.text
            seen["own jobs"].append(took)
            time.sleep(0.2)
        results = [f.result() for f in flood]
    flood_time = time.monotonic() - t0
    print({k: f"max {max(v):.2f} s of {len(v)}" for k, v in seen.items()}, f"flood {flood_time:.1f} s")
    slow = {k: max(v) for k, v in seen.items() if max(v) > DEADLINE}
    assert not slow, f"the victim waited during the flood (s): {slow}"
    codes = [r.status_code for _, r in results]
    assert set(codes) <= {429, 503}, sorted(set(codes))    # none served: every operation of theirs hangs
    assert codes.count(429) >= FLOOD - 16, codes.count(429)   # refused at once beyond the per-user cap
    assert all("in flight" in r.json()["detail"] for _, r in results if r.status_code == 429)
    assert max(t for t, _ in results) < REPLY_TIMEOUT + 10
    assert flood_time < 3 * REPLY_TIMEOUT, f"the flood took {flood_time:.0f} s"
    # The hanging operations were killed (their process groups), not left to the user's lock.
    deadline = time.monotonic() + OP_TIMEOUT + 10
    while _ops_of(flooder) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ops_of(flooder), _ops_of(flooder)


def test_the_flooder_recovers(site: Site, users: dict[str, SiteUser]) -> None:
    """Caps are per operation in flight, not a ban: with the lock gone the flooder's jobs answer again."""
    assert _jobs(site, users["flooder"].creds(site.registry)).status_code == 200
