"""Shared fixtures: component checks (under CI=true a missing component fails, never skips), unprivileged
test users, and test images built here from Debian's busybox-static."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import images
from tests.helpers.users import User

CI = os.environ.get("CI") == "true"

# A suite started in the background by a shell without job control (`cmd &`) or under nohup inherits SIGINT,
# SIGQUIT (or SIGHUP) ignored, and so would every app the tests start: a shell cannot trap a signal ignored on
# entry, and the signal tests would wait for a trap that never runs. The defaults, as from a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
for _sig in (signal.SIGQUIT, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_DFL)
COMPONENTS = ("bwrap", "runc", "squashfuse_ll", "tar2sqfs", "unsquashfs", "busybox", "newuidmap", "setpriv",
              "nagaya", "tmux")
# the images' FUSE server (deploy/install.sh); NAGAYA_TEST_SQUASHFS: a build of it to test instead
NAGAYA_SQUASHFS = os.environ.get("NAGAYA_TEST_SQUASHFS") or "/usr/local/libexec/nagaya/nagaya-squashfs"


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if CI:
        pytest.fail(f"required component missing in CI: {what}")
    pytest.skip(what)


@pytest.fixture(scope="session")
def system() -> Iterator[None]:
    require(os.geteuid() == 0, "integration tests run as root: they create unprivileged test users")
    for exe in COMPONENTS:
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    require(os.access(NAGAYA_SQUASHFS, os.X_OK), f"{NAGAYA_SQUASHFS} is not installed (bash deploy/install.sh)")
    # These machines ship /dev/fuse as 0600; normal systems have 0666 (DESIGN.md).
    os.chmod("/dev/fuse", 0o666)
    yield
    # The test users' image keepers share this session (runtime.keeper: a keeper per user and session) and
    # would idle on for runtime.keep_mounted after the suite: end them with it, as a logout would.
    subprocess.run(["pkill", "-TERM", "-x", "nagaya-keeper"], check=False)


@pytest.fixture(scope="session")
def users(system: None) -> tuple[User, User]:
    return User.ensure("nagaya-t1", 300000), User.ensure("nagaya-t2", 400000)


@pytest.fixture(scope="session")
def alice(users: tuple[User, User]) -> User:
    return users[0]


@pytest.fixture(scope="session")
def bob(users: tuple[User, User]) -> User:
    return users[1]


@pytest.fixture(scope="session")
def shared_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def rootfs(system: None, shared_tmp: Path) -> Path:
    """A busybox rootfs with the test apps, readable by everyone."""
    return images.busybox_rootfs(shared_tmp / "rootfs")


@pytest.fixture(scope="session")
def app_layout(rootfs: Path, shared_tmp: Path) -> Path:
    """An OCI layout: busybox base + a layer with ENTRYPOINT/CMD/ENV/WORKDIR/labels and a setuid file."""
    upper = images.tar_bytes([
        images.entry("app/", "dir"),
        images.entry("app/busybox-suid", "file", (rootfs / "bin" / "busybox").read_bytes(), mode=0o4755),
        images.entry("app/data.txt", "file", b"upper data\n"),
    ])
    cfg = {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "FROM_IMAGE=image", "SHARED=image"],
           "Entrypoint": ["/app/ep.sh"], "Cmd": ["default"], "WorkingDir": "/app",
           "Labels": {"org.example.team": "hpc"}}
    return images.oci_layout(shared_tmp / "app-layout", [images.dir_tar(rootfs), upper], cfg)


@pytest.fixture(scope="session")
def session_images(alice: User, bob: User, rootfs: Path, app_layout: Path) -> None:
    """`bb` and `app` imported into each test user's default cache once."""
    for u in (alice, bob):
        r = u.nagaya("image", "import", str(rootfs), "--name", "bb")
        assert r.returncode == 0, r.stderr
        r = u.nagaya("image", "import", str(app_layout), "--name", "app:1")
        assert r.returncode == 0, r.stderr


@pytest.fixture
def workdir(alice: User) -> Iterator[Path]:
    """A fresh directory owned by the test user, inside their home."""
    d = Path(tempfile.mkdtemp(prefix="w-", dir=alice.home))
    os.chown(d, alice.uid, alice.gid)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture
def fresh_cache(alice: User, workdir: Path) -> dict[str, str]:
    """Environment for a fresh, empty image cache."""
    c = alice.mkdir(workdir / "cache")
    return {"XDG_CACHE_HOME": str(c)}
