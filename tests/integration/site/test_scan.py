"""Vulnerability scanning against a real site, as unprivileged users: an image made of Debian packages at known
versions (a real dpkg status, Python dist-info, an upper layer's whiteout) and a database fixture in the real
OSV and Debian tracker formats give exactly the expected findings, in the CLI and on push (the server scans
the pushed layers, keeps the report per digest and attaches an SPDX SBOM in the registry); the site's
`[image] vuln_block` stops a run and a submit with a one-line refusal naming the rule and the worst CVE, and
the admin's per-CVE exception lets it run."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import images, vulnfixture
from tests.integration.site.conftest import NAGAYA, Site, SiteUser, module_people, run_root, site_down, site_up

pytestmark = pytest.mark.integration


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-2000:]}\n{r.stdout[-1000:]}"
    return r


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def site_config(etc: Path, name: str, image_lines: str = "") -> Path:
    """A root-owned site config naming the fixture database (and the rules under test)."""
    p = etc / name
    p.write_text(f'[runtime]\nbackend = "bwrap"\nstaging_dir = "/var/lib/nagaya/mnt"\n\n[image]\n'
                 f'vulndb = "{etc / "vulndb.sqlite"}"\n{image_lines}')
    p.chmod(0o644)
    return p


@pytest.fixture(scope="module")
def env(base_dir: Path, site_system: None):
    work = base_dir / f"scan-{uuid.uuid4().hex[:6]}"
    etc = work / "etc"
    etc.mkdir(parents=True)
    for d in (work, etc):
        d.chmod(0o755)
    src = vulnfixture.write_db(work / "db-src")
    conf = site_config(etc, "nagaya.toml")
    cenv = {"NAGAYA_SITE_CONFIG": str(conf)}
    import os

    r = run_root([NAGAYA, "admin", "vulndb", "update", "--from", str(src), "--json"], env={**os.environ, **cenv})
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["advisories"] == 13 and st["updated"] and str(src) in st["source"]
    assert (etc / "vulndb.sqlite").stat().st_mode & 0o777 == 0o644
    site = site_up(work / "state", cenv)
    layout = images.oci_layout(work / "layout", vulnfixture.layers(), {"Cmd": ["/bin/busybox", "true"]})
    archive = images.oci_archive(layout, work / "debianish.tar")
    subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
    try:
        yield {"site": site, "etc": etc, "env": cenv, "archive": archive,
               "users": module_people(site, "vs", ("alice",))}
    finally:
        site_down(site.state_dir)


def _import(u: SiteUser, archive: Path) -> str:
    name = f"deb-{uuid.uuid4().hex[:6]}:1"
    ok(u.nagaya("image", "import", str(archive), "--name", name))
    return name


def test_scan_cli(env: dict) -> None:
    alice: SiteUser = env["users"]["alice"]
    name = _import(alice, env["archive"])
    rep = json.loads(ok(alice.nagaya("image", "scan", name, "--json", env=env["env"])).stdout)
    assert vulnfixture.findings_set(rep) == vulnfixture.EXPECTED
    assert rep["distro"] == "Debian:12" and rep["packages"] == 5 and rep["fixable"] == 4
    assert rep["counts"]["high"] == 2 and rep["vulndb"]["updated"]
    text = ok(alice.nagaya("image", "scan", name, env=env["env"])).stdout
    assert "CVE-2023-0003" in text and "rebuild: 4 fixes available" in text
    # `nagaya images` shows what a rebuild would fix (from the scan kept in her cache)
    rows = json.loads(ok(alice.nagaya("images", "--json", env=env["env"])).stdout)
    assert any(r["fixes"] == 4 for r in rows if f"{r['name']}:{r['tag']}" == name)
    out = alice.u.home / f"sbom-{uuid.uuid4().hex[:6]}.json"
    ok(alice.nagaya("image", "sbom", name, "-o", str(out), env=env["env"]))
    doc = json.loads(out.read_text())
    assert doc["spdxVersion"] == "SPDX-2.3" and {p["name"] for p in doc["packages"][1:]} == \
        {"libssl3", "bash", "libfoo1", "zlib1g", "requests"}
    # no database: one line
    refused(alice.nagaya("image", "scan", name, env={"NAGAYA_SITE_CONFIG": str(_nodb(env["etc"]))}),
            "no vulnerability database")


def _nodb(etc: Path) -> Path:
    p = etc / "nodb.toml"
    p.write_text(f'[image]\nvulndb = "{etc / "missing.sqlite"}"\n')
    p.chmod(0o644)
    return p


def test_block_policy_run_submit_override(env: dict) -> None:
    alice: SiteUser = env["users"]["alice"]
    name = _import(alice, env["archive"])
    block = {"NAGAYA_SITE_CONFIG": str(site_config(env["etc"], "block.toml",
                                                   'vuln_block = [\n  { scope = "*", severity = "high" },\n]\n'))}
    line = refused(alice.nagaya("run", name, "/bin/busybox", "true", env=block),
                   "refused by the site's vulnerability policy", "rule 1", "at or above high",
                   "CVE-2023-0001 (high) in libssl3 3.0.11-1~deb12u1", "fixed in 3.0.11-1~deb12u2", "1 more")
    assert "\n" not in line
    refused(alice.nagaya("submit", "--backend", "local", "--image", name, "--", "/bin/busybox", "true", env=block),
            "refused by the site's vulnerability policy", "CVE-2023-0001")
    # a stricter threshold passes; a rule's per-CVE exceptions and the site-wide allow list let it run
    crit = {"NAGAYA_SITE_CONFIG": str(site_config(env["etc"], "crit.toml",
                                                  'vuln_block = [{ scope = "*", severity = "critical" }]\n'))}
    ok(alice.nagaya("run", name, "/bin/busybox", "true", env=crit))
    one = {"NAGAYA_SITE_CONFIG": str(site_config(env["etc"], "one.toml", 'vuln_block = [{ scope = "*", severity = '
                                                 '"high", except = ["CVE-2023-0001"] }]\n'))}
    refused(alice.nagaya("run", name, "/bin/busybox", "true", env=one), "CVE-2023-0003 (high)")
    both = {"NAGAYA_SITE_CONFIG": str(site_config(env["etc"], "both.toml", 'vuln_block = [{ scope = "*", severity = '
                                                  '"high", except = ["CVE-2023-0001"] }]\n'
                                                  'vuln_allow = ["CVE-2023-0003"]\n'))}
    ok(alice.nagaya("run", name, "/bin/busybox", "true", env=both))
    ok(alice.nagaya("run", name, "/bin/busybox", "true", env=both))                     # the cached verdict
    r = ok(alice.nagaya("submit", "--backend", "local", "--json", "--image", name, "--", "/bin/busybox", "true",
                        env=both))
    assert json.loads(r.stdout)["digest"].startswith("sha256:")
    # the cached verdict of the lenient config does not carry over to the strict one
    refused(alice.nagaya("run", name, "/bin/busybox", "true", env=block), "CVE-2023-0001")
    # a user's own config cannot loosen it
    refused(alice.nagaya("run", name, "/bin/busybox", "true", env={**block, "NAGAYA_IMAGE_VULN_BLOCK": "",
                                                                    "NAGAYA_IMAGE_VULN_ALLOW": "CVE-2023-0001"}),
            "CVE-2023-0001")


def test_scan_on_push(env: dict) -> None:
    site: Site = env["site"]
    alice: SiteUser = env["users"]["alice"]
    name = _import(alice, env["archive"])
    ref = f"{site.registry}/{alice.name}/debianish:1"
    digest = json.loads(ok(alice.nagaya("push", name, ref, "--json")).stdout)["digest"]
    auth = alice.creds(site.registry)
    deadline = time.monotonic() + 120
    while True:
        r = site.api("GET", f"/api/scans/{alice.name}/debianish", auth=auth, params={"digest": digest})
        if r.status_code != 404 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["digest"] == digest and vulnfixture.findings_set(rep) == vulnfixture.EXPECTED
    sbom = site.api("GET", f"/api/scans/{alice.name}/debianish", auth=auth, params={"digest": digest, "sbom": 1})
    assert sbom.json()["spdxVersion"] == "SPDX-2.3"
    # the SBOM is in the registry beside the image, referring to it
    from nagaya.image.reference import parse
    from nagaya.scan.attach import sbom_tag

    tag = sbom_tag(digest)
    man = httpx.get(f"http://{site.registry}/v2/{alice.name}/debianish/manifests/{tag}", timeout=30,
                    headers=_bearer(site, alice, auth, "pull"))
    assert man.status_code == 200, man.text
    m = man.json()
    assert m["subject"]["digest"] == digest and m["layers"][0]["mediaType"] == "application/spdx+json"
    assert parse(ref).name
    # the user's own `image sbom --attach` (after a pull) puts hers in the same place, and it reads back
    fresh = {"XDG_CACHE_HOME": str(alice.u.mkdir(alice.u.home / f"cache-{uuid.uuid4().hex[:6]}"))}
    ok(alice.nagaya("pull", ref, env=fresh))
    out = alice.u.home / f"att-{uuid.uuid4().hex[:6]}.json"
    r = ok(alice.nagaya("image", "sbom", ref, "-o", str(out), "--attach", env={**env["env"], **fresh}))
    assert tag in r.stdout
    m2 = httpx.get(f"http://{site.registry}/v2/{alice.name}/debianish/manifests/{tag}", timeout=30,
                   headers=_bearer(site, alice, auth, "pull")).json()
    blob = httpx.get(f"http://{site.registry}/v2/{alice.name}/debianish/blobs/{m2['layers'][0]['digest']}",
                     timeout=30, headers=_bearer(site, alice, auth, "pull"), follow_redirects=True)
    assert json.loads(blob.content)["packages"][0]["versionInfo"] == digest
    # the database gains an advisory with a fix: the stored report is matched again (no rescan of the layers)
    import os

    extra = env["etc"].parent / "extra"
    extra.mkdir(exist_ok=True)
    (extra / "new.json").write_text(json.dumps(vulnfixture.osv(
        "DEBIAN-CVE-2024-0100", "Debian:12", "bash", [{"introduced": "0"}, {"fixed": "5.2.15-3"}],
        upstream=["CVE-2024-0100"], affected_extra={"ecosystem_specific": {"urgency": "low"}})))
    r = run_root([NAGAYA, "admin", "vulndb", "update", "--from", str(env["etc"].parent / "db-src"),
                  "--from", str(extra)], env={**os.environ, **env["env"]})
    assert r.returncode == 0, r.stderr
    rep2 = site.api("GET", f"/api/scans/{alice.name}/debianish", auth=auth, params={"digest": digest}).json()
    assert vulnfixture.findings_set(rep2) == vulnfixture.EXPECTED | {
        ("CVE-2024-0100", "bash", "5.2.15-2+b2", "5.2.15-3", "low")}
    assert rep2["fixable"] == 5 and "inventory" not in rep2
    # someone without pull rights sees nothing
    assert site.api("GET", f"/api/scans/{alice.name}/debianish", params={"digest": digest}).status_code in (401, 404)


def _bearer(site: Site, u: SiteUser, auth: tuple[str, str], actions: str) -> dict[str, str]:
    tok = site.token(f"repository:{u.name}/debianish:{actions}", auth).json()["token"]
    return {"Authorization": f"Bearer {tok}", "Accept": "application/vnd.oci.image.manifest.v1+json"}
