"""Session, cookie, CSRF and rate-limit rules of the portal, in-process (no browser, no site): the parts a
browser test cannot reach quickly (expiry, HTTPS cookie flags, cross-site posts)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nagaya.server.app import create_app
from nagaya.server.authn import Identity
from nagaya.server.pki import ensure_signing_files
from nagaya.server.settings import ServerSettings
from nagaya.server.web import LoginLimiter, Sessions

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


def test_sessions_expire() -> None:
    idle = Sessions(idle=0.2, absolute=60)
    a = idle.create("ann", frozenset(), False)
    assert idle.get(a.sid) is a
    time.sleep(0.3)
    assert idle.get(a.sid) is None                     # unused for longer than the idle timeout
    absolute = Sessions(idle=60, absolute=0.4)
    b = absolute.create("ann", frozenset(), False)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        absolute.get(b.sid)                            # kept busy...
        time.sleep(0.05)
    assert absolute.get(b.sid) is None                 # ...still ends at the absolute limit
    assert idle.get("") is None and idle.get("nonsense") is None


def test_rate_limit_is_per_user_and_address() -> None:
    lim = LoginLimiter(limit=3, window=60)
    for _ in range(3):
        assert lim.blocked("ann", "10.0.0.1") == 0
        lim.failed("ann", "10.0.0.1")
    assert lim.blocked("ann", "10.0.0.1") > 0
    assert lim.blocked("ann", "10.0.0.2") == 0         # another address
    assert lim.blocked("ben", "10.0.0.1") == 0         # another user
    lim.succeeded("ann", "10.0.0.1")
    assert lim.blocked("ann", "10.0.0.1") == 0         # a good password clears the count
    short = LoginLimiter(limit=1, window=0.2)
    short.failed("ann", "10.0.0.1")
    time.sleep(0.3)
    assert short.blocked("ann", "10.0.0.1") == 0       # the window passed
