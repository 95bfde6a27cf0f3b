"""Session, cookie, CSRF and rate-limit rules of the portal, in-process (no browser, no site): the parts a
browser test cannot reach quickly (expiry, HTTPS cookie flags, cross-site posts)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from nagaya.server.app import create_app
from nagaya.server.authn import Identity
from nagaya.server.pki import ensure_signing_files
from nagaya.server.portal.sessions import Sessions
from nagaya.server.ratelimit import LoginLimiter
from nagaya.server.settings import ServerSettings
from nagaya.sitedb import SiteDatabase
from nagaya.sitedb.models import PortalSession

pytestmark = pytest.mark.e2e


USERS = {"ann": "pw-ann", "ben": "pw-ben"}


class FakeAuth:
    """Two users with fixed passwords: PAM is the site tests' business."""

    def authenticate(self, username: str, password: str) -> Identity | None:
        return self.user(username) if USERS.get(username) == password else None

    def user(self, name: str) -> Identity | None:
        return Identity(name, 5000, frozenset()) if name in USERS else None

    def group_id(self, name: str) -> int | bool | None:
        return False


@pytest.fixture
def app(tmp_path: Path) -> Iterator[object]:
    files = ensure_signing_files(tmp_path / "certs")
    settings = ServerSettings(database=f"sqlite:///{tmp_path}/db.sqlite", signing_key=str(files.key),
                              signing_cert=str(files.cert), ca_cert=str(files.ca_cert), registry="127.0.0.1:9")
    a = create_app(settings, FakeAuth())
    a.state.site.db.migrate()
    yield a
    a.state.site.db.dispose()


def login(c: TestClient, user: str, password: str) -> int:
    tok = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
    assert tok
    return c.post("/login", data={"username": user, "password": password, "csrf": tok.group(1)},
                  follow_redirects=False).status_code


def csrf_of(c: TestClient) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', c.get("/dashboard").text)
    assert m
    return m.group(1)


def test_cookie_flags_http_and_https(app: object) -> None:
    with TestClient(app) as c:                                             # type: ignore[arg-type]
        assert login(c, "ann", "pw-ann") == 303
    with TestClient(app, base_url="https://portal.example") as c:          # type: ignore[arg-type]
        tok = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
        assert tok
        r = c.post("/login", data={"username": "ann", "password": "pw-ann", "csrf": tok.group(1)},
                   follow_redirects=False)
        cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("nagaya_session="))
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" in cookie
        page = c.get("/dashboard")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"


def test_csrf_and_origin(app: object) -> None:
    with TestClient(app) as c:                                             # type: ignore[arg-type]
        assert login(c, "ann", "pw-ann") == 303
        token = csrf_of(c)
        assert c.post("/projects", data={"name": "p1"}).status_code == 403                    # no token
        assert c.post("/projects", data={"name": "p1", "csrf": "x" * 43}).status_code == 403  # wrong token
        r = c.post("/projects", data={"name": "p1", "csrf": token}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403                                                           # cross-site
        assert c.post("/projects", data={"name": "p1", "csrf": token}).status_code == 200     # (followed 303)
        # another session's token is no good either
        with TestClient(app) as other:                                     # type: ignore[arg-type]
            assert login(other, "ben", "pw-ben") == 303
            assert other.post("/projects", data={"name": "p2", "csrf": token}).status_code == 403


def test_logout_needs_csrf_and_ends_the_session(app: object) -> None:
    with TestClient(app) as c:                                             # type: ignore[arg-type]
        assert login(c, "ann", "pw-ann") == 303
        assert c.post("/logout", data={}).status_code == 403
        assert c.post("/logout", data={"csrf": csrf_of(c)}, follow_redirects=False).status_code == 303
        assert c.get("/dashboard", follow_redirects=False).status_code == 303


class Clock:
    """A clock the test moves: expiry and rate-limit windows without sleeping."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SiteDatabase]:
    d = SiteDatabase(f"sqlite:///{tmp_path}/sessions.sqlite")
    d.migrate()
    yield d
    d.dispose()


def test_sessions_expire(db: SiteDatabase) -> None:
    clock = Clock()
    idle = Sessions(db, idle=600, absolute=3600, clock=clock)
    a = idle.create("ann", frozenset({"lab"}), False)
    got = idle.get(a.sid)
    assert got is not None and (got.user, got.groups, got.csrf) == ("ann", frozenset({"lab"}), a.csrf)
    clock.t += 601
    assert idle.get(a.sid) is None                     # unused for longer than the idle timeout
    b = idle.create("ann", frozenset(), False)
    for _ in range(7):                                 # kept busy (3500 s)...
        clock.t += 500
        assert idle.get(b.sid) is not None
    clock.t += 500
    assert idle.get(b.sid) is None                     # ...still ends at the absolute limit
    assert idle.get("") is None and idle.get("nonsense") is None and idle.get("x" * 5000) is None


def test_session_ids_are_stored_hashed_and_seen_is_written_sparingly(db: SiteDatabase) -> None:
    clock = Clock()
    sessions = Sessions(db, idle=7200, absolute=43200, clock=clock)
    s = sessions.create("ann", frozenset(), False)
    with db.engine.connect() as c:
        keys = list(c.scalars(select(PortalSession.id_hash)))
    assert keys == [s.key] and s.sid not in keys       # a copy of the table opens no session

    def seen() -> float:
        with db.engine.connect() as c:
            return float(c.scalar(select(PortalSession.seen)))
    start = seen()
    clock.t += Sessions.SEEN_RESOLUTION / 2
    assert sessions.get(s.sid) is not None and seen() == start           # no write on every page view
    clock.t += Sessions.SEEN_RESOLUTION
    assert sessions.get(s.sid) is not None and seen() == clock.t         # at most a resolution behind


def test_rate_limit_is_per_user_and_address(db: SiteDatabase) -> None:
    clock = Clock()
    lim = LoginLimiter(db, limit=3, window=60, clock=clock)
    for _ in range(3):
        assert lim.blocked("ann", "10.0.0.1") == 0
        lim.failed("ann", "10.0.0.1")
        clock.t += 1
    assert lim.blocked("ann", "10.0.0.1") == 60 - 3    # until the first failure leaves the window
    assert lim.blocked("ann", "10.0.0.2") == 0         # another address
    assert lim.blocked("ben", "10.0.0.1") == 0         # another user
    lim.succeeded("ann", "10.0.0.1")
    assert lim.blocked("ann", "10.0.0.1") == 0         # a good password clears the count
    lim.failed("ben", "10.0.0.1")
    short = LoginLimiter(db, limit=1, window=0.2, clock=clock)
    assert short.blocked("ben", "10.0.0.1") > 0
    clock.t += 0.3
    assert short.blocked("ben", "10.0.0.1") == 0       # the window passed


def test_server_processes_share_sessions_and_rate_limits(tmp_path: Path) -> None:
    """Two apps on one database are two server processes (`server.workers`): a login, its messages, a logout
    and failed passwords count in both at once, whichever process the browser's request reaches."""
    files = ensure_signing_files(tmp_path / "certs")
    settings = ServerSettings(database=f"sqlite:///{tmp_path}/db.sqlite", signing_key=str(files.key),
                              signing_cert=str(files.cert), ca_cert=str(files.ca_cert), registry="127.0.0.1:9")
    one, two = create_app(settings, FakeAuth()), create_app(settings, FakeAuth())
    one.state.site.db.migrate()
    try:
        with TestClient(one) as a, TestClient(two) as b:
            assert login(a, "ann", "pw-ann") == 303
            b.cookies.set("nagaya_session", a.cookies["nagaya_session"])
            assert "Hello, ann" in b.get("/dashboard").text                  # logged in on both
            r = b.post("/projects", data={"name": "shared-p", "csrf": csrf_of(a)}, follow_redirects=False)
            assert r.status_code == 303                                      # same session, same CSRF token
            assert "Project shared-p created" in a.get(r.headers["location"]).text   # the message follows
            assert "Project shared-p created" not in b.get(r.headers["location"]).text   # ...once
            assert b.post("/logout", data={"csrf": csrf_of(a)}, follow_redirects=False).status_code == 303
            assert a.get("/dashboard", follow_redirects=False).status_code == 303    # ended in both at once
            for c in (a, b, a, b, a):                                        # MAX_FAILURES, spread over both
                assert login(c, "ben", "wrong") == 401
            assert login(a, "ben", "pw-ben") == 429 and login(b, "ben", "pw-ben") == 429
    finally:
        one.state.site.db.dispose()
        two.state.site.db.dispose()
