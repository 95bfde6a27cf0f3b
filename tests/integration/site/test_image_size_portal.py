"""The bloat picture on the portal's image page: the same report as `nagaya image inspect --size`, computed from
the layers the registry serves to the viewer: someone without pull rights gets a 404 and no bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.site.conftest import Site, SiteUser, indexed, module_people, push
from tests.security.helpers import portal

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def users(site: Site) -> dict[str, SiteUser]:
    return module_people(site, "bloat", ("owner", "other"))


def test_size_picture(site: Site, users: dict[str, SiteUser], image_archive: Path) -> None:
    owner, other = users["owner"], users["other"]
    repo = f"{owner.name}/sized"
    assert push(owner, image_archive, f"{site.registry}/{repo}:1", owner.creds(site.registry)).returncode == 0
    indexed(site, owner, repo, "1")                             # the image's page lists the index's tags
    c, _ = portal(site, owner.name, owner.password)
    page = c.get(f"/images/{repo}")
    assert page.status_code == 200 and f'hx-get="/image-size/{repo}?ref=sha256:' in page.text
    r = c.get(f"/image-size/{repo}", params={"ref": "1"})
    assert r.status_code == 200, r.text
    assert "Where the bytes go" in r.text and "<svg" in r.text and "/bin/busybox" in r.text and "<html" in r.text
    frag = c.get(f"/image-size/{repo}", params={"ref": "1"}, headers={"HX-Request": "true"})
    assert frag.status_code == 200 and "<html" not in frag.text and "A rebuild would save" in frag.text
    o, _ = portal(site, other.name, other.password)
    denied = o.get(f"/image-size/{repo}", params={"ref": "1"})
    assert denied.status_code == 404 and "busybox" not in denied.text
    assert c.get(f"/image-size/{repo}", params={"ref": "1\r\nX: y"}).status_code == 400
