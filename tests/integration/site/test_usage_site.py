"""One usage figure on a real site (`nagaya site up`, real registry, skopeo pushes as an unprivileged user):
an image pushed under three tags in two repositories of a project counts once, and the quota check (the token
service), the API, the CLI (`nagaya admin project quota|usage`, `nagaya repo tags`) and the portal (the admin
page, the project page's storage bar, the repository page) all give that same figure, formatted alike."""

from __future__ import annotations

import html
import json
import re
import uuid
from pathlib import Path

import pytest

from nagaya.units import format_size
from tests.integration.site.conftest import Site, SiteUser, module_people, push
from tests.integration.site.test_lifecycle import indexed, ok
from tests.security.helpers import portal

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def us(site: Site, site_system: None) -> dict[str, SiteUser]:
    return module_people(site, "use", ("owner", "admin"))


def test_one_image_one_figure_everywhere(site: Site, us: dict[str, SiteUser], image_archive: Path) -> None:
    owner, admin = us["owner"], us["admin"]
    project = f"use-{uuid.uuid4().hex[:6]}"
    ok(owner.nagaya("project", "create", project))
    creds = owner.creds(site.registry)
    refs = [(f"{project}/app", "1"), (f"{project}/app", "latest"), (f"{project}/tools", "1")]
    for repo, tag in refs:                          # one image, three tags, two repositories
        ok(push(owner, image_archive, f"{site.registry}/{repo}:{tag}", creds))
    rows = [indexed(site, admin, repo, tag) for repo, tag in refs]
    assert len({r["digest"] for r in rows}) == 1
    size = rows[0]["size"]
    assert size > 0 and {r["size"] for r in rows} == {size}
    shown = format_size(size)
    assert format_size(3 * size) != shown

    # the API: the project's quota answer and the admins' usage list
    quota = 2 * size                                # room for one more image, not for three tags' sum
    q = json.loads(ok(admin.nagaya("admin", "project", "quota", project, str(quota), "--json")).stdout)
    assert q == {"project": project, "quota_bytes": quota, "used_bytes": size}
    r = site.api("GET", f"/api/admin/projects/{project}/quota", auth=owner.creds(site.registry))
    assert r.status_code == 200 and r.json()["used_bytes"] == size        # members read it too
    usage = {x["name"]: x for x in site.api("GET", "/api/admin/usage", auth=admin.creds(site.registry)).json()}
    assert usage[project]["used"] == size and usage[project]["quota"] == quota

    # the quota check lets a push through (summing the tags would say the project is full)
    assert isinstance(site.granted(f"{project}/app", "pull,push", creds), set)
    assert "push" in site.granted(f"{project}/app", "pull,push", creds)

    # the CLI: the same bytes in JSON, the same IEC figure in text
    rows_cli = {x["name"]: x for x in json.loads(ok(admin.nagaya("admin", "project", "usage", "--json")).stdout)}
    assert rows_cli[project]["used"] == size
    assert f"{project}: {shown} used, quota {format_size(quota)}" in \
        ok(owner.nagaya("admin", "project", "quota", project)).stdout
    assert re.search(rf"{re.escape(project)}\s+group\s+{owner.name}\s+{re.escape(shown)}\s+"
                     rf"{re.escape(format_size(quota))}", ok(admin.nagaya("admin", "project", "usage")).stdout)
    tags = json.loads(ok(owner.nagaya("repo", "tags", f"{project}/app", "--json")).stdout)
    assert {t["tag"]: t["size"] for t in tags} == {"1": size, "latest": size}
    assert ok(owner.nagaya("repo", "tags", f"{project}/app")).stdout.count(shown) >= 2

    # the portal: the admin page, the project page's bar (a member's view), the repository page
    a, _ = portal(site, admin.name, admin.password)
    page = html.unescape(a.get("/admin/users").text)
    row = re.search(rf"<td>{re.escape(project)}</td>.*?</tr>", page, re.S)
    assert row and shown in row.group(0) and format_size(quota) in row.group(0) and "(50%)" in row.group(0)
    assert format_size(3 * size) not in row.group(0)
    o, _ = portal(site, owner.name, owner.password)
    proj = html.unescape(o.get(f"/projects/{project}").text)
    assert f"{shown} used of {format_size(quota)} (50.0%)" in proj, proj[:3000]
    assert html.unescape(o.get(f"/images/{project}/app").text).count(shown) >= 2

    # at the quota the check refuses, and names the same figure
    ok(admin.nagaya("admin", "project", "quota", project, str(size)))
    r = site.token(f"repository:{project}/app:pull,push", creds)
    assert r.status_code == 403 and f"{shown} used of {shown}" in r.text, r.text
    assert "over quota" in html.unescape(o.get(f"/projects/{project}").text)
