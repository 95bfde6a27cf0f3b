"""B17: the server's scan on push reads layers any user pushed, as the service account. Links and special
files named like package databases are never followed or opened (a symlink or hard link to the host's dpkg
status, /etc/shadow as a dist-info METADATA, a FIFO as status.d): the report lists nothing of the host, the
server stays up, and the victim's next push is scanned as usual."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import images
from tests.integration.site.conftest import push
from tests.integration.site.test_scan import env  # noqa: F401 - the module's own site with the fixture database

pytestmark = pytest.mark.integration


def _report(site, creds, repo: str, digest: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = site.api("GET", f"/api/scans/{repo}", auth=creds, params={"digest": digest})
        if r.status_code != 404:
            return {"status": r.status_code, **(r.json() if r.headers.get("content-type", "").startswith(
                "application/json") else {})}
        time.sleep(0.5)
    raise AssertionError("never scanned")


def test_links_and_fifos_in_pushed_layers_are_not_followed(env: dict) -> None:  # noqa: F811
    site, alice = env["site"], env["users"]["alice"]
    work = env["archive"].parent / f"hostile-{uuid.uuid4().hex[:6]}"
    sp = "usr/lib/python3/dist-packages"
    layer = images.tar_bytes([
        images.entry("etc/", "dir"),
        images.entry("etc/os-release", "symlink", link="/etc/os-release"),
        images.entry("var/", "dir"), images.entry("var/lib/", "dir"), images.entry("var/lib/dpkg/", "dir"),
        images.entry("var/lib/dpkg/status", "symlink", link="/proc/self/root/var/lib/dpkg/status"),
        images.entry("var/lib/dpkg/status.d/", "dir"),
        images.entry("var/lib/dpkg/status.d/fifo", "fifo"),
        images.entry("var/lib/dpkg/status.d/hard", "hardlink", link="/var/lib/dpkg/status"),
        images.entry("usr/", "dir"), images.entry("usr/lib/", "dir"), images.entry("usr/lib/python3/", "dir"),
        images.entry(f"{sp}/", "dir"), images.entry(f"{sp}/evil-1.dist-info/", "dir"),
        images.entry(f"{sp}/evil-1.dist-info/METADATA", "symlink", link="/etc/shadow"),
    ])
    layout = images.oci_layout(work / "layout", [layer], {"Cmd": ["/bin/true"]})
    archive = images.oci_archive(layout, work / "hostile.tar")
    import subprocess

    subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
    creds = alice.creds(site.registry)
    repo = f"{alice.name}/hostile"
    r = push(alice, archive, f"{site.registry}/{repo}:1", creds)
    assert r.returncode == 0, r.stderr
    digest = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                             f"oci-archive:{archive}"], capture_output=True, text=True).stdout.strip()
    rep = _report(site, creds, repo, digest)
    # scanned (or refused), and nothing of the host in it
    assert rep["status"] in (200, 400), rep
    if rep["status"] == 200:
        assert rep["packages"] == 0 and rep["findings"] == [] and rep["distro"] == "", rep
    assert Path("/var/lib/dpkg/status").exists()
    # the server is unharmed: the victim's next image is scanned as usual
    ok_repo = f"{alice.name}/after-hostile"
    r = push(alice, env["archive"], f"{site.registry}/{ok_repo}:1", creds)
    assert r.returncode == 0, r.stderr
    d2 = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                         f"oci-archive:{env['archive']}"], capture_output=True, text=True).stdout.strip()
    assert _report(site, creds, ok_repo, d2)["packages"] == 5
