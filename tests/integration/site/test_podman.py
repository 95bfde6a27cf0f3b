"""podman, the standard rootless client, logs in, pushes and pulls through nagaya's token service with the
same permissions as nagaya's own CLI and skopeo."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.site.conftest import Site, SiteUser, require

pytestmark = pytest.mark.integration


def podman(who: SiteUser, args: list[str], **kw):
    run_dir = Path(f"/tmp/nagaya-podman-{who.u.uid}")
    run_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(run_dir, who.u.uid, who.u.gid)
    env = {"XDG_RUNTIME_DIR": str(run_dir), "REGISTRY_AUTH_FILE": str(run_dir / "auth.json")}
    return who.run(["podman", "--log-level=error", *args], env=env, timeout=180, **kw)


def test_podman_login_push_pull(site: Site, logged_in: dict[str, SiteUser], image_archive: Path) -> None:
    require(shutil.which("podman") is not None, "podman is not installed")
    owner, outsider = logged_in["owner"], logged_in["outsider"]
    ref = f"{site.registry}/{owner.name}/podbb:1"
    for who in (owner, outsider):
        r = podman(who, ["login", "--tls-verify=false", "-u", who.name, "--password-stdin", site.registry],
                   input=who.password + "\n")
        assert r.returncode == 0, r.stderr
    r = podman(owner, ["pull", "-q", f"oci-archive:{image_archive}"])
    assert r.returncode == 0, r.stderr
    image_id = r.stdout.strip().splitlines()[-1]
    r = podman(owner, ["push", "--tls-verify=false", image_id, f"docker://{ref}"])
    assert r.returncode == 0, r.stderr
    # The push went through nagaya: its index (fed by registry notifications) lists the tag.
    r = owner.nagaya("repo", "tags", f"{owner.name}/podbb", "--json")
    assert r.returncode == 0 and '"1"' in r.stdout, r.stdout + r.stderr
    r = podman(owner, ["pull", "-q", "--tls-verify=false", ref])
    assert r.returncode == 0, r.stderr
    # A non-member can neither pull nor push into the owner's personal project.
    r = podman(outsider, ["pull", "-q", "--tls-verify=false", ref])
    assert r.returncode != 0
    r = podman(outsider, ["push", "--tls-verify=false", image_id, f"docker://{site.registry}/{owner.name}/evil:1"])
    assert r.returncode != 0
    # And a wrong password is refused at login.
    r = podman(outsider, ["login", "--tls-verify=false", "-u", outsider.name, "--password-stdin", site.registry],
               input="wrong\n")
    assert r.returncode != 0
    for who in (owner, outsider):
        podman(who, ["system", "reset", "--force"])
        # Rootless podman keeps a pause process (catatonit) per user; leave nothing behind.
        who.run(["pkill", "-u", who.name, "-x", "catatonit"])
