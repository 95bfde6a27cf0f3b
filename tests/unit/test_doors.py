"""Each operation written once and reachable from every door: member add, token rotation and image delete
from the API, the CLI and the portal give the same results and the same errors (one error->status map)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from nagaya.errors import AuthError, Conflict, NotFound, PermissionDenied, TooManyAttempts, UsageError
from nagaya.server.jobs import JobsBusy, JobsUnavailable
from nagaya.server.registry_client import SiteRegistry
from nagaya.server.status import http_status
from tests.helpers.inproc import basic, cli, login, portal_csrf, portal_login, push, server

D1 = "sha256:" + "1" * 64


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with server(tmp_path) as c:
        ada = login(c, "ada")
        login(c, "bob")                                 # known to the site
        assert c.post("/api/projects", json={"name": "lab"}, headers=ada).status_code == 201
        yield c, ada


def test_one_status_per_error() -> None:
    assert [http_status(e("x")) for e in (TooManyAttempts, JobsBusy, AuthError, PermissionDenied, NotFound,
                                          Conflict, UsageError, JobsUnavailable)] == \
        [429, 429, 401, 403, 404, 409, 400, 503]


def test_member_add_same_rules_from_api_and_portal(site: tuple[TestClient, dict[str, str]]) -> None:
    c, ada = site
    r = c.post("/api/projects/lab/members", json={"name": "zed", "role": "guest"}, headers=ada)
    assert r.status_code == 404 and r.json()["detail"] == "no such user: zed"
    r = c.post("/api/projects/lab/members", json={"name": "bob", "role": "guest"}, headers=ada)
    assert r.status_code == 200 and r.json()["role"] == "guest"
    portal_login(c, "ada")
    csrf = portal_csrf(c, "/projects/lab")
    r = c.post("/projects/lab/members", data={"member": "zed", "role": "guest", "csrf": csrf})
    assert r.status_code == 404 and "no such user: zed" in r.text
    r = c.post("/projects/lab/members", data={"member": "bob", "role": "developer", "csrf": csrf},
               follow_redirects=False)
    assert r.status_code == 303
    roles = {m["name"]: m["role"] for m in c.get("/api/projects/lab/members", headers=ada).json()}
    assert roles == {"ada": "owner", "bob": "developer"}


def _registry_token(c: TestClient, username: str, secret: str) -> int:
    return c.get("/token", params={"service": "nagaya-registry", "scope": "repository:lab/app:pull"},
                 headers=basic(username, secret)).status_code


def test_token_rotation_from_api_and_cli(site: tuple[TestClient, dict[str, str]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    c, ada = site
    new = c.post("/api/projects/lab/tokens", json={"name": "ci", "scope": "pull"}, headers=ada).json()
    user, old = new["username"], new["secret"]
    assert _registry_token(c, user, old) == 200
    rotated = c.post("/api/projects/lab/tokens/ci/rotate", headers=ada)
    assert rotated.status_code == 200 and rotated.json()["username"] == user
    assert _registry_token(c, user, old) == 401 and _registry_token(c, user, rotated.json()["secret"]) == 200
    out = cli(c, ada, monkeypatch, "token", "rotate", user)
    secret = next(line.split()[1] for line in out.splitlines() if line.startswith("secret"))
    assert _registry_token(c, user, rotated.json()["secret"]) == 401 and _registry_token(c, user, secret) == 200
    bob = login(c, "bob")
    assert c.post("/api/projects/lab/tokens/ci/rotate", headers=bob).status_code == 404    # not a member
    assert c.post("/api/projects/lab/tokens/nope/rotate", headers=ada).status_code == 404


def test_image_delete_from_api_cli_and_portal(site: tuple[TestClient, dict[str, str]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    c, ada = site
    calls: list[tuple[str, str, str]] = []

    def registry(reg: SiteRegistry, method: str, url: str, **kw: Any) -> httpx.Response:
        calls.append((method, url.removeprefix("/v2/"), reg.subject))
        return httpx.Response(202)

    monkeypatch.setattr(SiteRegistry, "_send", registry)
    c.post("/api/projects/lab/members", json={"name": "bob", "role": "developer"}, headers=ada)
    bob = login(c, "bob")
    for tag in ("1", "2"):
        push(c, "lab/app", tag, D1, 10)
    push(c, "lab/app", "3", "sha256:" + "3" * 64, 10)
    push(c, "lab/app", "4", "sha256:" + "4" * 64, 10)
    url = f"/api/repositories/lab/app/manifests/{D1}"
    r = c.delete(url, headers=bob)                           # developers push, but do not delete
    assert r.status_code == 403 and "does not allow deleting" in r.json()["detail"]
    assert c.delete("/api/repositories/lab/app/manifests/sha256:bad", headers=ada).status_code == 400
    assert c.delete(url, headers=ada).json() == {"repository": "lab/app", "digest": D1, "tags": 2}
    assert calls == [("DELETE", f"lab/app/manifests/{D1}", "ada")]
    assert sorted(t["tag"] for t in c.get("/api/repositories/lab/app/tags", headers=ada).json()) == ["3", "4"]
    # the CLI: by tag (the manifest it points at) or by digest
    assert "lab/app@sha256:3333" in cli(c, ada, monkeypatch, "repo", "rm", "lab/app:3")
    assert "does not allow deleting" in cli(c, bob, monkeypatch, "repo", "rm", "lab/app:4",
                                            code=PermissionDenied("").exit_code)
    # the portal: the same operation
    portal_login(c, "ada")
    csrf = portal_csrf(c, "/images/lab/app")
    r = c.post("/images/delete", data={"repository": "lab/app", "digest": "sha256:" + "4" * 64, "csrf": csrf},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/images"
    assert c.get("/api/repositories/lab/app/tags", headers=ada).status_code == 404 or \
        c.get("/api/repositories/lab/app/tags", headers=ada).json() == []
