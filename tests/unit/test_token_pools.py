"""The token service's thread pools: a password on /token goes through PAM or LDAP, which can take seconds
(pam_unix delays every wrong password by about 2 s), so it runs outside the small pool that serves token
requests. Here a password back end that blocks until the test lets it go proves that passwords stuck in it
hold up no robot's token request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nagaya.server.app import create_app
from nagaya.server.authn import Identity
from nagaya.server.offload import THREADS
from nagaya.server.pki import ensure_signing_files
from nagaya.server.settings import ServerSettings

STUCK = THREADS * 2                  # more passwords in flight than the small pool has threads


class SlowAuth:
    """`ann` logs in at once with her password; any other password waits in `authenticate` until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)

    def authenticate(self, username: str, password: str) -> Identity | None:
        if password == "pw-ann":
            return self.user(username)
        self.waiting.release()
        self.release.wait(60)
        return None

    def user(self, name: str) -> Identity | None:
        return Identity(name, 5000, frozenset()) if name == "ann" else None

    def group_id(self, name: str) -> int | bool | None:
        return False


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[TestClient, SlowAuth]]:
    files = ensure_signing_files(tmp_path / "certs")
    settings = ServerSettings(database=f"sqlite:///{tmp_path}/db.sqlite", signing_key=str(files.key),
                              signing_cert=str(files.cert), ca_cert=str(files.ca_cert), registry="127.0.0.1:9")
    auth = SlowAuth()
    app = create_app(settings, auth)
    app.state.site.db.migrate()
    with TestClient(app) as c:
        yield c, auth
    auth.release.set()
    app.state.site.db.dispose()


def test_passwords_stuck_in_pam_hold_up_no_robot(slow: tuple[TestClient, SlowAuth]) -> None:
    c, auth = slow
    pat = c.post("/api/login", auth=("ann", "pw-ann"), json={"token_name": "t"}).json()["token"]
    robot = c.post("/api/projects/ann/tokens", json={"name": "ci", "scope": "push"},
                   headers={"Authorization": f"Bearer {pat}"}).json()
    url = "/token?service=nagaya-registry&scope=repository:ann/app:pull,push"
    with ThreadPoolExecutor(max_workers=STUCK) as pool:
        # one name each: a single user's attempts in flight stop at the login limit (ratelimit.MAX_FAILURES)
        stuck = [pool.submit(c.get, url, auth=(f"guesser{i}", "wrong")) for i in range(STUCK)]
        for _ in range(STUCK):
            assert auth.waiting.acquire(timeout=60), "the password checks did not start"
        # every password is inside the back end now; the robot must still get its token
        ok = c.get(url, auth=(robot["username"], robot["secret"]))
        assert ok.status_code == 200 and ok.json()["token"]
        done = [f for f in stuck if f.done()]
        assert not done, [(f.exception() or f.result().text) for f in done]
        auth.release.set()
        assert {f.result().status_code for f in stuck} == {401}
