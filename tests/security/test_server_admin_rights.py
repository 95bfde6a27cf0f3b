"""Rights are re-checked per request: an admin who leaves the admin group loses admin rights within the
identity cache's 30 s on every route (portal session, API, token service), not 12 h later when the session
ends. In-process with a moved clock (every route, exactly at the cache's edge), then on a real site with
a real group change (one wait of at most ~30 s)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nagaya.server.app import create_app
from nagaya.server.authn import Identity
from nagaya.server.base import IDENTITY_TTL
from nagaya.server.pki import ensure_signing_files
from nagaya.server.settings import ServerSettings
from tests.integration.site.conftest import Site, SiteUser, module_people
from tests.security.helpers import portal

pytestmark = pytest.mark.integration

GROUPS: dict[str, set[str]] = {"boss": {"admins"}, "ann": set()}


class GroupAuth:
    """Users whose groups the test changes, as an admin does with gpasswd."""

    def authenticate(self, username: str, password: str) -> Identity | None:
        return self.user(username) if password == f"pw-{username}" else None

    def user(self, name: str) -> Identity | None:
        return Identity(name, 5000, frozenset(GROUPS[name])) if name in GROUPS else None

    def group_id(self, name: str) -> int | bool | None:
        return False


@pytest.fixture
def app(tmp_path: Path) -> Iterator[object]:
    files = ensure_signing_files(tmp_path / "certs")
    settings = ServerSettings(database=f"sqlite:///{tmp_path}/db.sqlite", signing_key=str(files.key),
                              signing_cert=str(files.cert), ca_cert=str(files.ca_cert), registry="127.0.0.1:9",
                              admin_groups=["admins"])
    a = create_app(settings, GroupAuth())
    a.state.site.db.migrate()
    yield a
    a.state.site.db.dispose()


def _catalog(c: TestClient, auth: tuple[str, str]) -> list[str]:
    r = c.get("/token", params={"service": "nagaya-registry", "scope": "registry:catalog:*"}, auth=auth)
    assert r.status_code == 200, r.text
    payload = r.json()["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return [a for e in claims["access"] for a in e["actions"]]


def test_leaving_the_admin_group_ends_admin_rights_on_every_route(app: object) -> None:
    GROUPS["boss"] = {"admins"}
    site = app.state.site                                  # type: ignore[attr-defined]
    now = [1000.0]
    site.clock = lambda: now[0]
    with TestClient(app) as c:                             # type: ignore[arg-type]
        tok = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
        assert tok
        assert c.post("/login", data={"username": "boss", "password": "pw-boss", "csrf": tok.group(1)},
                      follow_redirects=False).status_code == 303
        pat = c.post("/api/login", auth=("boss", "pw-boss")).json()["token"]
        assert c.get("/admin/users").status_code == 200
        assert c.get("/api/admin/audit", auth=("boss", pat)).status_code == 200
        assert _catalog(c, ("boss", pat)) == ["*"]

        GROUPS["boss"] = set()                             # the site's admins remove boss from the group
        now[0] += IDENTITY_TTL - 1                         # still cached: at most IDENTITY_TTL old
        assert c.get("/admin/users").status_code == 200
        now[0] += 2                                        # the cache's edge passed
        assert c.get("/admin/users").status_code == 403
        assert c.get("/admin/audit.csv").status_code == 403
        assert "/admin/users" not in c.get("/dashboard").text           # no admin menu either
        assert c.get("/api/admin/audit", auth=("boss", pat)).status_code == 403
        assert _catalog(c, ("boss", pat)) == []
        assert c.get("/dashboard").status_code == 200                   # still a user: only the rights went

        GROUPS["boss"] = {"admins"}                        # and back, just as fast
        now[0] += IDENTITY_TTL + 1
        assert c.get("/admin/users").status_code == 200


@pytest.fixture(scope="module")
def users(site: Site) -> dict[str, SiteUser]:
    return module_people(site, "ar", ("admin",))


def test_real_group_change_reaches_the_portal_and_api_within_the_ttl(site: Site, users: dict[str, SiteUser]) -> None:
    admin = users["admin"]
    c, r = portal(site, admin.name, admin.password)
    assert r.status_code == 303 and c.get("/admin/users").status_code == 200
    creds = admin.creds(site.registry)
    assert site.api("GET", "/api/admin/audit", auth=creds).status_code == 200
    subprocess.run(["gpasswd", "-d", admin.name, "nagaya-admins"], check=True, capture_output=True)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < IDENTITY_TTL + 5:
            portal_ok = c.get("/admin/users").status_code == 200
            api_ok = site.api("GET", "/api/admin/audit", auth=creds).status_code == 200
            if not portal_ok and not api_ok:
                break
            time.sleep(1)
        took = time.monotonic() - t0
        assert c.get("/admin/users").status_code == 403, f"portal admin rights still there after {took:.0f} s"
        assert site.api("GET", "/api/admin/audit", auth=creds).status_code == 403
        assert c.get("/dashboard").status_code == 200
    finally:
        subprocess.run(["gpasswd", "-a", admin.name, "nagaya-admins"], check=True, capture_output=True)
