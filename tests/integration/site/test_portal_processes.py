"""A site whose server runs as several processes (`server.workers = 2`): a browser's requests land on either
process, so a login, a logout and the login rate limit must hold in both, and a robot token that is revoked,
rotated or expired must stop working at once whichever process answers. Every request here goes on a
fresh connection, which the kernel hands to either process."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.site.conftest import Site, SiteUser, ensure_user, site_down, site_up

pytestmark = pytest.mark.integration

TRIES = 12          # fresh connections per check: the two processes share them out between them


@pytest.fixture(scope="module")
def two_process_site(site_system: None, base_dir: Path) -> Iterator[Site]:
    s = site_up(base_dir / "workers-state", env={"NAGAYA_SERVER_WORKERS": "2"})
    yield s
    site_down(s.state_dir)


@pytest.fixture(scope="module")
def ann(site_system: None) -> SiteUser:
    return ensure_user("nyw-ann", f"pw-ann-{os.getpid()}")


def _server_processes(state_dir: Path) -> list[tuple[int, int]]:
    """(pid, uid) of every process in the server's process group but its supervisor."""
    from nagaya.server.site import read_status

    leader = read_status(state_dir).pids["server"]
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == leader:
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[2]) == leader and b"spawn_main" in cmd:
            out.append((int(p.name), (p / "status").stat().st_uid))
    return out


def _get(url: str, **kw: object) -> httpx.Response:
    with httpx.Client(timeout=30) as c:                # one request, one new connection
        return c.get(url, **kw)                        # type: ignore[arg-type]


def _login(site: Site, user: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=site.server, timeout=30) as c:
        tok = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
        assert tok
        return c.post("/login", data={"username": user, "password": password, "csrf": tok.group(1)})


def test_two_server_processes_run_as_the_service_account(two_process_site: Site) -> None:
    import pwd

    procs = _server_processes(two_process_site.state_dir)
    assert len(procs) == 2, procs
    assert {uid for _, uid in procs} == {pwd.getpwnam("nagaya").pw_uid}


def test_session_login_and_logout_hold_in_every_process(two_process_site: Site, ann: SiteUser) -> None:
    site = two_process_site
    r = _login(site, ann.name, ann.password)
    assert r.status_code == 303, r.text
    cookie = {"Cookie": f"nagaya_session={r.cookies['nagaya_session']}"}
    for _ in range(TRIES):
        page = _get(f"{site.server}/dashboard", headers=cookie)
        assert page.status_code == 200 and f"Hello, {ann.name}" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf
    with httpx.Client(timeout=30) as c:
        out = c.post(f"{site.server}/logout", data={"csrf": csrf.group(1)}, headers=cookie)
    assert out.status_code == 303
    for _ in range(TRIES):                              # ended everywhere at once, not per process
        assert _get(f"{site.server}/dashboard", headers=cookie).status_code == 303


def test_login_rate_limit_counts_across_processes(two_process_site: Site) -> None:
    site = two_process_site
    bob = ensure_user("nyw-bob", f"pw-bob-{os.getpid()}")
    for _ in range(5):                                  # MAX_FAILURES, on fresh connections
        assert _login(site, bob.name, "wrong").status_code == 401
    assert _login(site, bob.name, bob.password).status_code == 429


def test_password_guessing_is_limited_on_every_route(two_process_site: Site) -> None:
    """The registry's /token and POST /api/login take passwords too: their failures count with the portal's."""
    site = two_process_site
    carol = ensure_user("nyw-carol", f"pw-carol-{os.getpid()}")
    dave = ensure_user("nyw-dave", f"pw-dave-{os.getpid()}")
    scope = f"repository:{carol.name}/app:pull"
    for _ in range(3):
        assert site.token(scope, (carol.name, "wrong")).status_code == 401
    for _ in range(2):
        assert site.api("POST", "/api/login", auth=(carol.name, "wrong")).status_code == 401
    r = site.token(scope, (carol.name, carol.password))        # even the right password, for now
    assert r.status_code == 429 and r.json()["errors"][0]["code"] == "TOOMANYREQUESTS", r.text
    assert site.api("POST", "/api/login", auth=(carol.name, carol.password)).status_code == 429
    assert _login(site, carol.name, carol.password).status_code == 429
    assert site.api("POST", "/api/login", auth=(dave.name, dave.password)).status_code == 200   # others unaffected


def _robot(site: Site, auth: tuple[str, str], name: str, **body: object) -> dict[str, str]:
    r = site.api("POST", f"/api/projects/{auth[0]}/tokens", auth=auth, json={"name": name, "scope": "push", **body})
    assert r.status_code == 201, r.text
    return r.json()


def _token_status(site: Site, user: str, secret: str, project: str) -> set[int]:
    return {site.token(f"repository:{project}/app:pull,push", (user, secret)).status_code for _ in range(TRIES)}


def test_revoked_rotated_and_expired_robot_tokens_stop_at_once(two_process_site: Site, ann: SiteUser) -> None:
    site = two_process_site
    pat = site.api("POST", "/api/login", auth=(ann.name, ann.password), json={"token_name": "t"})
    assert pat.status_code == 200, pat.text
    auth = (ann.name, pat.json()["token"])

    ci = _robot(site, auth, "ci")
    assert _token_status(site, ci["username"], ci["secret"], ann.name) == {200}
    revoked = site.api("DELETE", f"/api/projects/{ann.name}/tokens/ci", auth=auth)
    assert revoked.status_code == 200
    assert _token_status(site, ci["username"], ci["secret"], ann.name) == {401}

    rot = _robot(site, auth, "rot")
    assert _token_status(site, rot["username"], rot["secret"], ann.name) == {200}
    with httpx.Client(base_url=site.server, timeout=30) as c:      # rotation: the portal's form, as ann
        r = _login(site, ann.name, ann.password)
        c.cookies.set("nagaya_session", r.cookies["nagaya_session"])
        csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/tokens").text)
        assert csrf
        page = c.post(f"/tokens/{ann.name}/rot/rotate", data={"csrf": csrf.group(1)})
        assert page.status_code == 200, page.text
    new = re.search(r"nyr_[A-Za-z0-9_-]{20,}", page.text)
    assert new and new.group(0) != rot["secret"]
    assert _token_status(site, rot["username"], rot["secret"], ann.name) == {401}
    assert _token_status(site, rot["username"], new.group(0), ann.name) == {200}

    brief = _robot(site, auth, "brief", expires_in=2)
    deadline = time.monotonic() + 30
    while _token_status(site, brief["username"], brief["secret"], ann.name) != {401}:    # polled, no sleep
        assert time.monotonic() < deadline, "an expired robot token still works"
    assert _token_status(site, brief["username"], brief["secret"], ann.name) == {401}


def test_last_used_is_recorded_without_a_write_per_request(two_process_site: Site, ann: SiteUser) -> None:
    site = two_process_site
    pat = site.api("POST", "/api/login", auth=(ann.name, ann.password), json={"token_name": "t2"})
    auth = (ann.name, pat.json()["token"])
    used = _robot(site, auth, "used")

    def last_used() -> str | None:
        rows = site.api("GET", f"/api/tokens?project={ann.name}", auth=auth).json()
        return next(t["last_used"] for t in rows if t["name"] == "used")
    assert last_used() is None
    assert _token_status(site, used["username"], used["secret"], ann.name) == {200}
    first = last_used()
    assert first is not None                            # the first use is recorded at once...
    assert _token_status(site, used["username"], used["secret"], ann.name) == {200}
    assert last_used() == first                         # ...then at most once a minute, not on every request

