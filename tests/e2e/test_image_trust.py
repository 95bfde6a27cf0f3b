"""The image page's trust section in headless Chromium: a pushed image of Debian packages at known versions is
scanned on push against the fixture database (OSV + Debian tracker formats); its page shows the signature
state, the severity picture and exactly the expected findings, offers the SPDX SBOM, and the dashboard says
"rebuild: N fixes available"."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SHOTS, Portal, api_login, wait_indexed
from tests.helpers import images, vulnfixture
from tests.integration.site.conftest import NAGAYA, Site, ensure_user, push, run_root, site_down, site_up


@pytest.fixture(scope="module")
def scan_site(e2e_system: None, e2e_dir: Path) -> Iterator[dict[str, Any]]:
    work = e2e_dir / f"scan-{uuid.uuid4().hex[:6]}"
    etc = work / "etc"
    etc.mkdir(parents=True)
    conf = etc / "nagaya.toml"
    conf.write_text(f'[image]\nvulndb = "{etc / "vulndb.sqlite"}"\nkeys_dir = "{etc / "keys"}"\n')
    env = {**os.environ, "NAGAYA_SITE_CONFIG": str(conf)}
    r = run_root([NAGAYA, "admin", "vulndb", "update", "--from", str(vulnfixture.write_db(work / "src"))], env=env)
    assert r.returncode == 0, r.stderr
    layout = images.oci_layout(work / "layout", vulnfixture.layers(), {"Cmd": ["/bin/busybox", "true"]})
    archive = images.oci_archive(layout, work / "img.tar")
    run_root(["chmod", "-R", "a+rX", str(work)])
    site = site_up(work / "state", {"NAGAYA_SITE_CONFIG": str(conf)})
    try:
        u = ensure_user("nye-scan", f"pw-scan-{os.getpid()}")
        creds = api_login(site, u)
        ref = f"{site.registry}/{u.name}/debianish:1"
        r = push(u, archive, ref, creds)
        assert r.returncode == 0, r.stderr
        wait_indexed(site, creds, f"{u.name}/debianish")
        yield {"site": site, "user": u, "creds": creds, "ref": ref, "etc": etc}
    finally:
        site_down(site.state_dir)


def _scanned(site: Site, creds: tuple[str, str], repo: str) -> dict[str, Any]:
    tags = site.api("GET", f"/api/repositories/{repo}/tags", auth=creds).json()
    digest = tags[0]["digest"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = site.api("GET", f"/api/scans/{repo}", auth=creds, params={"digest": digest})
        if r.status_code != 404:
            assert r.status_code == 200, r.text
            return r.json()
        time.sleep(0.5)
    raise AssertionError("the pushed image was never scanned")


def test_image_page_shows_findings(browser: Any, scan_site: dict[str, Any]) -> None:
    site, u, creds = scan_site["site"], scan_site["user"], scan_site["creds"]
    repo = f"{u.name}/debianish"
    rep = _scanned(site, creds, repo)
    assert vulnfixture.findings_set(rep) == vulnfixture.EXPECTED
    p = Portal(browser, site)
    try:
        p.login(u)
        assert p.page.locator(".rebuild").first.inner_text() == "rebuild: 4 fixes available"     # the dashboard
        p.page.goto(f"/images/{repo}")
        trust = p.page.locator(".image-trust")
        assert "Signature: unsigned" in trust.locator(".signature").inner_text()
        rows = trust.locator("table.findings tbody tr")
        got = set()
        for i in range(rows.count()):
            sev, ident, pkg, inst, fixed = (c.strip() for c in rows.nth(i).locator("td").all_inner_texts())
            got.add((ident, pkg, inst, "" if fixed == "—" else fixed, sev))
        assert got == vulnfixture.EXPECTED
        assert trust.locator("svg.severity-bar rect").count() == 3            # high, medium, negligible
        assert "2 high" in trust.locator(".scan-summary").inner_text()
        p.shot("image-trust")
        # signed with a key the site holds for the project: the page names the key
        _sign(scan_site)
        p.page.goto(f"/images/{repo}")
        sig = p.page.locator(f'.image-trust[data-digest="{rep["digest"]}"] .signature').inner_text()
        assert "Signature: signed" in sig and "signed by main.pub" in sig, sig
        trust = p.page.locator(f'.image-trust[data-digest="{rep["digest"]}"]')
        with p.page.expect_download() as dl:
            trust.locator("a", has_text="SBOM").click()
        doc = json.loads(Path(dl.value.path()).read_text())
        assert doc["spdxVersion"] == "SPDX-2.3" and len(doc["packages"]) == 6
        assert not p.errors, p.errors
    finally:
        p.close()
    assert SHOTS.exists()


def _sign(ctx: dict[str, Any]) -> None:
    import shutil

    u, site, etc = ctx["user"], ctx["site"], ctx["etc"]
    pw = {"NAGAYA_KEY_PASSPHRASE": "e2e passphrase"}
    u.login(site.server)
    r = u.nagaya("key", "create", "-o", "main", "--json", env=pw)
    assert r.returncode == 0, r.stderr
    r = u.nagaya("sign", ctx["ref"], "--key", "main", env=pw)
    assert r.returncode == 0, r.stderr
    d = etc / "keys" / "projects" / u.name
    d.mkdir(parents=True, exist_ok=True)
    for x in (etc / "keys", etc / "keys" / "projects", d):
        x.chmod(0o755)
    shutil.copy(u.u.home / ".config" / "nagaya" / "keys" / "main.pub", d / "main.pub")
    (d / "main.pub").chmod(0o644)
