"""Shared parts of the adversarial tests that attack root and other users' paths: the service account as an
attacker, module-private victim/attacker accounts, root's files to aim at. Test modules import the fixtures
they use from here.

The kernel's link protections (`fs.protected_symlinks/hardlinks/regular/fifos`) are switched off while these
tests run, as they are on the machines nagaya is built on: the code must hold without them."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.users import User
from tests.integration.site.conftest import Site, SiteUser, module_people

PROTECTIONS = ("protected_symlinks", "protected_hardlinks", "protected_regular", "protected_fifos")


@pytest.fixture(scope="module", autouse=True)
def no_kernel_link_protection() -> Iterator[None]:
    saved: dict[str, str] = {}
    for name in PROTECTIONS:
        p = Path("/proc/sys/fs") / name
        try:
            saved[name] = p.read_text().strip()
            p.write_text("0\n")
        except OSError:
            continue
    yield
    for name, value in saved.items():
        try:
            (Path("/proc/sys/fs") / name).write_text(value + "\n")
        except OSError:
            pass


@pytest.fixture(scope="module")
def service(site: Site) -> User:
    """The `nagaya` service account, as an attacker: it owns the state dir and everything the server writes."""
    pw = pwd.getpwnam("nagaya")
    return User("nagaya", pw.pw_uid, pw.pw_gid, site.state_dir)


@pytest.fixture(scope="module")
def actors(request: pytest.FixtureRequest, site: Site, site_system: None) -> dict[str, SiteUser]:
    """victim, attacker and an admin of this test module (`nys-MODULE-...`), logged in to the site."""
    prefix = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "")[:8]
    return module_people(site, prefix, ("victim", "attacker", "admin"))


def root_file(tmp: Path, name: str, text: str = "root's secret\n") -> Path:
    """A file only root may write: what an attack must never change, chown or delete."""
    p = tmp / name
    p.write_text(text)
    os.chmod(p, 0o600)
    return p


def fingerprint(p: Path) -> tuple[int, int, int, bytes]:
    st = p.lstat()
    return st.st_uid, st.st_gid, st.st_mode, p.read_bytes()


def sh(who: User, script: str, **kw) -> subprocess.CompletedProcess:
    return who.run(["sh", "-c", script], **kw)
