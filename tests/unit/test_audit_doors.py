"""One audit query behind every door: `nagaya admin audit --json`, `GET /api/admin/audit` and the admin page's
JSON export give the same events for the same filters (one row shape), and only site admins get any."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nagaya.errors import PermissionDenied
from tests.helpers.inproc import cli, login, portal_login, push

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str]]]:
    from tests.helpers.inproc import server

    with server(tmp_path) as c:
        yield c, login(c, "ada"), login(c, "bob")


def test_cli_api_and_page_read_the_same_rows(site: tuple[TestClient, dict[str, str], dict[str, str]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    c, ada, bob = site
    assert c.post("/api/projects", json={"name": "lab"}, headers=ada).status_code == 201
    push(c, "lab/app", "1", D1, 10)
    push(c, "lab/tools", "1", D2, 20)
    assert c.post("/api/audit", json={"action": "run", "image": "lab/app:1"}, headers=bob).status_code == 201

    api = c.get("/api/admin/audit", params={"repository": "lab/app"}, headers=ada).json()
    assert [(r["action"], r["repository"]) for r in api] == [("registry.push", "lab/app"), ("cli.run", "lab/app")]
    assert json.loads(cli(c, ada, monkeypatch, "admin", "audit", "--repository", "lab/app", "--json")) == api
    portal_login(c, "ada")
    page = c.get("/admin/audit.json", params={"repository": "lab/app"}).json()
    # the page lists newest first and stamps whole seconds; the events and their fields are the same
    assert [(r["action"], r["actor"], r["digest"], r["details"]) for r in page[::-1]] == \
        [(r["action"], r["actor"], r["digest"], r["details"]) for r in api]
    assert [r["time"][:19] for r in page[::-1]] == [r["time"][:19] for r in api]

    # an action prefix, and the exact action of the short /api/audit list
    assert {r["action"] for r in c.get("/api/admin/audit", params={"action": "cli."}, headers=ada).json()} \
        == {"cli.run"}
    assert c.get("/api/audit", params={"action": "registry.push"}, headers=ada).json()[0]["repository"] \
        == "lab/tools"
    assert c.get("/api/audit", params={"action": "registry."}, headers=ada).json() == []
    # only admins
    assert c.get("/api/admin/audit", headers=bob).status_code == 403
    assert c.get("/api/audit", headers=bob).status_code == 403
    out = cli(c, bob, monkeypatch, "admin", "audit", "--json", code=PermissionDenied.exit_code)
    assert out.strip() == "nagaya: only site admins read the audit table"
