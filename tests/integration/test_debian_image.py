"""A real distribution image: Debian 12 minbase made with debootstrap (from Debian's own archive, the one
package source this machine has), imported and run as an unprivileged user on both backends."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.users import User

pytestmark = pytest.mark.integration
CACHE = Path("/var/cache/nagaya-test/bookworm-minbase.tar.gz")   # kept between runs on one machine


@pytest.fixture(scope="module")
def debian_tarball(system: None) -> Path:
    require(shutil.which("debootstrap") is not None, "debootstrap is not installed")
    if not CACHE.exists():
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        root = CACHE.parent / "bookworm"
        shutil.rmtree(root, ignore_errors=True)
        r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root)], capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        tmp = CACHE.with_suffix(".tmp")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-czf", str(tmp), "."], check=True)
        os.replace(tmp, CACHE)
        shutil.rmtree(root, ignore_errors=True)
    CACHE.chmod(0o644)
    CACHE.parent.chmod(0o755)
    return CACHE


@pytest.mark.parametrize("backend", ["bwrap", "runc"])
def test_debian_minbase(alice: User, debian_tarball: Path, fresh_cache: dict[str, str], backend: str) -> None:
    r = alice.nagaya("image", "import", str(debian_tarball), "--name", "debian:12", env=fresh_cache, timeout=600)
    assert r.returncode == 0, r.stderr
    script = "cat /etc/debian_version; id -un; ls -ld /usr/bin/passwd | cut -c1-4; " \
             "dpkg -l bash | tail -1 | cut -c1-2;" \
             " echo $HOME; test -w / || echo ro"
    r = alice.nagaya("run", "--backend", backend, "debian:12", "bash", "-c", script, env=fresh_cache)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0].startswith("12.") and lines[1] == alice.name
    assert lines[2] == "-rws"                # setuid bit kept in the image, ignored at run time (nosuid)
    assert lines[3] == "ii" and lines[4] == str(alice.home) and lines[5] == "ro"
    # su is setuid root in the image; with nosuid and no new privileges it cannot become root.
    r = alice.nagaya("run", "--backend", backend, "debian:12", "su", "-c", "id", env=fresh_cache, input="x\n")
    assert r.returncode != 0
