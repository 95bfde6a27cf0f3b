"""The site server in-process (FastAPI TestClient over a fresh SQLite database) with a fake login backend,
registry pushes reported through the notification webhook, and the CLI (Typer) talking to that app."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from nagaya.server.app import create_app
from nagaya.server.authn import Identity
from nagaya.server.pki import ensure_signing_files
from nagaya.server.settings import ServerSettings

SECRET = "notify-secret"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
UIDS = {"ada": 5001, "bob": 5002}


class Users:
    """`ada` (a site admin) and `bob`; the password is the name reversed."""

    def authenticate(self, username: str, password: str) -> Identity | None:
        return self.user(username) if password == username[::-1] else None

    def user(self, name: str) -> Identity | None:
        return Identity(name, UIDS[name], frozenset()) if name in UIDS else None

    def group_id(self, name: str) -> int | bool | None:
        return False


def basic(user: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


@contextmanager
def server(tmp_path: Path) -> Iterator[TestClient]:
    files = ensure_signing_files(tmp_path / "certs")
    settings = ServerSettings(database=f"sqlite:///{tmp_path}/site.db", signing_key=str(files.key),
                              signing_cert=str(files.cert), ca_cert=str(files.ca_cert), registry="",
                              notify_secret=SECRET, admin_users=["ada"])
    app = create_app(settings, Users())
    app.state.site.db.migrate()
    with TestClient(app) as c:
        yield c
    app.state.site.db.dispose()


def login(c: TestClient, user: str) -> dict[str, str]:
    """A personal access token of `user`, as Basic credentials."""
    r = c.post("/api/login", headers=basic(user, user[::-1]))
    assert r.status_code == 200, r.text
    return basic(user, r.json()["token"])


def push(c: TestClient, repository: str, tag: str, digest: str, size: int) -> None:
    # the index keeps 64 characters of an event id: a hash, so attachment tags (sha256-HEX.sig) differ
    ev = {"id": hashlib.sha256(f"{repository}:{tag}:{digest}".encode()).hexdigest(), "action": "push",
          "actor": {"name": "ada"},
          "target": {"repository": repository, "tag": tag, "digest": digest, "mediaType": MANIFEST, "size": size}}
    r = c.post("/api/registry/events", json={"events": [ev]}, headers={"Authorization": f"Bearer {SECRET}"})
    assert r.status_code == 200 and r.json() == {"applied": 1}, r.text


def portal_login(c: TestClient, user: str) -> None:
    c.cookies.clear()
    form = c.get("/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf
    r = c.post("/login", data={"username": user, "password": user[::-1], "csrf": csrf.group(1)},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard", r.text


def portal_csrf(c: TestClient, page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', c.get(page).text)
    assert m, page
    return m.group(1)


def cli(c: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch, *args: str,
        code: int = 0) -> str:
    """`nagaya ARGS` with its API calls going to the in-process app as the owner of `auth`."""
    from nagaya.cli import admin_cmds, project_cmds, token_cmds
    from nagaya.cli.app import app
    from nagaya.client.api import Api

    def api_client(_registry: Any = None) -> Api:
        api = Api("http://testserver")
        api.http = c                                   # TestClient is an httpx.Client
        c.headers.update(auth)
        return api

    for mod in (admin_cmds, project_cmds, token_cmds):
        monkeypatch.setattr(mod, "api_client", api_client)
    try:
        out = CliRunner().invoke(app, list(args))
    finally:
        c.headers.pop("Authorization", None)
    assert out.exit_code == code, out.output
    return out.output
