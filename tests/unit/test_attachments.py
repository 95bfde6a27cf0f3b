"""Attachment tags (sha256-HEX.sig|sbom|sqfs|att) are listed under the image they belong to, the same way by
the JSON API, the CLI (`nagaya repo tags`) and the portal's repository page, which all say how much of the
stored bytes they are."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from nagaya.image import attachments
from nagaya.units import format_size
from tests.helpers.inproc import cli, login, portal_login, push, server

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
GONE = "sha256:" + "9" * 64                    # an image no tag names any more
SIG, SBOM, SQFS = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
ORPHAN = "sha256:" + "d" * 64


def _tag(digest: str, kind: str) -> str:
    return digest.replace(":", "-", 1) + "." + kind


def test_parse_and_split() -> None:
    assert attachments.parse(_tag(D1, "sig")) == (D1, "sig")
    assert attachments.parse(_tag(D1, "att")) == (D1, "att")
    for ordinary in ("latest", "sha256-abc.sig", _tag(D1, "sig") + "x", _tag(D1, "tar"), "v1.sig"):
        assert attachments.parse(ordinary) is None, ordinary
    rows = [SimpleNamespace(tag=t, digest=d, size=s) for t, d, s in
            [("1", D1, 10), (_tag(D1, "sbom"), SBOM, 5), (_tag(D1, "sig"), SIG, 3), ("2", D1, 10),
             (_tag(GONE, "sqfs"), ORPHAN, 100)]]
    listing = attachments.split(rows)
    assert [t.tag for t in listing.images] == ["1", "2"]
    assert [a.label for a in listing.of(D1)] == ["signed", "SBOM"]          # always in the same order
    assert [t.tag for t in listing.orphans] == [_tag(GONE, "sqfs")]
    assert listing.usage() == (3, 108)
    assert attachments.json_usage([{"digest": SIG, "size": 3, "attachments": [{"digest": SIG, "size": 3}]},
                                   {"digest": ORPHAN, "size": 100, "attachment_of": GONE}]) == (2, 103)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with server(tmp_path) as c:
        ada = login(c, "ada")
        assert c.post("/api/projects", json={"name": "lab"}, headers=ada).status_code == 201
        push(c, "lab/app", "1", D1, 1000)
        push(c, "lab/app", "2", D2, 2000)
        push(c, "lab/app", _tag(D1, "sig"), SIG, 300)
        push(c, "lab/app", _tag(D1, "sbom"), SBOM, 4000)
        push(c, "lab/app", _tag(D1, "sqfs"), SQFS, 50000)
        push(c, "lab/app", _tag(GONE, "sig"), ORPHAN, 300)
        yield c, ada


def test_api_cli_and_portal_agree(site: tuple[TestClient, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    c, ada = site
    rows = c.get("/api/repositories/lab/app/tags", headers=ada).json()
    assert [(t["tag"], t.get("attachment_of")) for t in rows] == [("1", None), ("2", None), (_tag(GONE, "sig"), GONE)]
    assert [(a["kind"], a["label"], a["digest"]) for a in rows[0]["attachments"]] == \
        [("sig", "signed", SIG), ("sbom", "SBOM", SBOM), ("sqfs", "lazy-ready", SQFS)]
    assert rows[1]["attachments"] == []
    everything = c.get("/api/repositories/lab/app/tags", params={"all": "true"}, headers=ada).json()
    assert len(everything) == 6 and {t["attachment_of"] for t in everything if "attachment_of" in t} == {D1, GONE}
    count, size = attachments.json_usage(rows)
    assert (count, size) == (4, 300 + 4000 + 50000 + 300)

    # the CLI prints the API's answer: the same rows as JSON, badges and the same total as text
    assert json.loads(cli(c, ada, monkeypatch, "repo", "tags", "lab/app", "--json")) == rows
    assert json.loads(cli(c, ada, monkeypatch, "repo", "tags", "lab/app", "--all", "--json")) == everything
    from nagaya.cli.common import console

    monkeypatch.setattr(console, "width", 200)                # one table row per line
    text = cli(c, ada, monkeypatch, "repo", "tags", "lab/app")
    line = next(x for x in text.splitlines() if x.split() and x.split()[0] == "1")
    assert "signed, SBOM, lazy-ready" in line
    assert not any(x.split() and x.split()[0] == _tag(D1, "sig") for x in text.splitlines())
    assert f"attachments: {count}, {format_size(size)}" in text
    assert any(x.split() and x.split()[0] == _tag(GONE, "sig") and "sig of" in x for x in text.splitlines())

    # repository lists count image tags; attachments apart
    repos = c.get("/api/repositories", headers=ada).json()
    repo = next(x for x in repos if x["name"] == "lab/app")
    assert (repo["tags"], repo["attachments"]) == (2, 4)
    assert json.loads(cli(c, ada, monkeypatch, "repo", "ls", "--json")) == repos

    # the portal: badges under the image, no section of its own for an attachment, the same total
    portal_login(c, "ada")
    assert re.search(r'href="/images/lab/app">lab/app</a></td><td>2</td>', c.get("/images").text)
    page = c.get("/images/lab/app").text
    headings = re.findall(r"<h2>(.*?)</h2>", page, re.S)
    assert [h.split("<", 1)[0].strip() for h in headings] == ["1", "2", "Attachments of untagged images"]
    assert re.findall(r'class="badge attachment attachment-(\w+)"[^>]*>([^<]+)<', headings[0]) == \
        [("sig", "signed"), ("sbom", "SBOM"), ("sqfs", "lazy-ready")]
    assert "attachment" not in headings[1]
    assert f"{count}, {format_size(size)} of the stored bytes" in page
    # the quota still counts them: they are stored bytes
    used = c.get("/api/admin/projects/lab/quota", headers=ada)
    assert used.status_code == 200 and used.json()["used_bytes"] == 1000 + 2000 + size


def test_project_usage_says_how_much_is_attachments(site: tuple[TestClient, dict[str, str]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The quota still counts attachments (stored bytes); the API, the CLI and the portal say how much."""
    c, ada = site
    att = 300 + 4000 + 50000 + 300
    used = c.get("/api/admin/projects/lab/quota", headers=ada).json()["used_bytes"]
    assert used == 1000 + 2000 + att
    row = next(x for x in c.get("/api/admin/usage", headers=ada).json() if x["name"] == "lab")
    assert (row["used"], row["attachments"]) == (used, att)
    from nagaya.cli.common import console

    monkeypatch.setattr(console, "width", 200)
    line = next(x for x in cli(c, ada, monkeypatch, "admin", "project", "usage").splitlines()
                if x.split() and x.split()[0] == "lab")
    assert line.split()[3:5] == format_size(used).split() and line.split()[-2:] == format_size(att).split()
    portal_login(c, "ada")
    assert f"{format_size(att)} of it attachments" in c.get("/projects/lab").text
    admin = c.get("/admin/users").text
    assert f"<td>{format_size(used)}</td><td>{format_size(att)}</td>" in admin
