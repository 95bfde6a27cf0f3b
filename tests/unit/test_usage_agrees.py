"""One usage figure: the quota check, the admin page, the API and the CLI count a project's storage the same
way (each distinct manifest once, however many tags point at it), and print one size the same way."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nagaya.units import format_size
from tests.helpers.inproc import cli, login, portal_login, push, server

MiB = 1 << 20
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with server(tmp_path) as c:
        yield c, login(c, "ada")


def _token(c: TestClient, auth: dict[str, str]) -> int:
    return c.get("/token", params={"service": "nagaya-registry", "scope": "repository:lab/app:pull,push"},
                 headers=auth).status_code


def test_two_tags_on_one_digest_count_once_everywhere(site: tuple[TestClient, dict[str, str]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    c, auth = site
    assert c.post("/api/projects", json={"name": "lab"}, headers=auth).status_code == 201
    push(c, "lab/app", "1", D1, 3 * MiB)
    push(c, "lab/app", "latest", D1, 3 * MiB)          # the same image under a second tag
    push(c, "lab/tools", "1", D2, 1 * MiB)
    used = 4 * MiB                                      # 3 MiB once + 1 MiB, not 7 MiB

    # the quota check: 5 MiB of quota leaves room for a push (summing tags would say 7 MiB: full)
    r = c.put("/api/admin/projects/lab/quota", json={"quota_bytes": 5 * MiB}, headers=auth)
    assert r.json() == {"project": "lab", "quota_bytes": 5 * MiB, "used_bytes": used}
    assert _token(c, auth) == 200
    # the API: the quota and the admins' usage list
    assert c.get("/api/admin/projects/lab/quota", headers=auth).json()["used_bytes"] == used
    rows = {x["name"]: x for x in c.get("/api/admin/usage", headers=auth).json()}
    assert rows["lab"]["used"] == used and rows["lab"]["quota"] == 5 * MiB
    sizes = {t["tag"]: t["size"] for t in c.get("/api/repositories/lab/app/tags", headers=auth).json()}
    assert sizes == {"1": 3 * MiB, "latest": 3 * MiB}

    # the CLI prints the same numbers (IEC, as the portal does)
    assert f"lab: {format_size(used)} used, quota {format_size(5 * MiB)}" in \
        cli(c, auth, monkeypatch, "admin", "project", "quota", "lab")
    assert re.search(r"lab\s+group\s+ada\s+4\.0 MiB\s+5\.0 MiB", cli(c, auth, monkeypatch, "admin", "project",
                                                                         "usage"))
    tags = cli(c, auth, monkeypatch, "repo", "tags", "lab/app")
    assert tags.count("3.0 MiB") == 2 and "MB" not in tags.replace("MiB", "")

    # the portal: the admin page's usage and the repository page's sizes
    portal_login(c, "ada")
    page = c.get("/admin/users").text
    row = re.search(r"<td>lab</td>.*?</tr>", page, re.S)
    assert row and "4.0 MiB" in row.group(0) and "5.0 MiB" in row.group(0) and "(80%)" in row.group(0), page
    assert "7.0 MiB" not in page
    assert c.get("/images/lab/app").text.count("3.0 MiB") >= 2

    # at the quota the check refuses, and says the same figure
    c.put("/api/admin/projects/lab/quota", json={"quota_bytes": used}, headers=auth)
    assert _token(c, auth) == 403
    assert "4.0 MiB used of 4.0 MiB" in c.get("/token", params={
        "service": "nagaya-registry", "scope": "repository:lab/app:pull,push"}, headers=auth).text
