"""The compiled starter replays a plan file without Python: a plan is code for it. Another account must never
get its plan replayed in a victim's run: one in a directory someone else can write, owned by someone else,
reached through a symlink or a hard link, or writable by others is refused, and the victim's run goes on
(the Python path, which writes a fresh plan of the victim's own). A starter installed setuid refuses to run."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nagaya.runtime.fastplan import plan_name
from tests.conftest import require
from tests.helpers.users import User

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("session_images")]
STARTER = "/usr/local/bin/nagaya"
FAST = "nagaya-starter: fast path"
PROBE = ("sh", "-c", "echo ran; env | grep -c '^PWNED=' || true")


@pytest.fixture(autouse=True)
def starter_installed() -> None:
    with open(STARTER, "rb") as f:
        require(f.read(4) == b"\x7fELF", f"{STARTER} is not the compiled starter (bash deploy/install.sh with cc)")


@pytest.fixture
def image(alice: User, rootfs: Path) -> Iterator[str]:
    """An image of alice's own for these tests (nobody else's test rewrites its plan meanwhile)."""
    assert alice.nagaya("image", "import", str(rootfs), "--name", "starter-sec").returncode == 0
    yield "starter-sec"
    alice.nagaya("image", "rm", "starter-sec")


@pytest.fixture
def place() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-sec-starter-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(user: User, image: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return user.nagaya("run", image, *PROBE, env={"NAGAYA_STARTER": "debug", **(env or {})})


def plan_path(user: User, image: str, cache: Path | None = None) -> Path:
    return (cache or user.home / ".cache") / "nagaya" / "starter" / plan_name(image, os.uname().nodename)


def forged(real: Path) -> str:
    """The victim's real plan with one line added: the payload shows as PWNED=1 in the container."""
    return real.read_text().replace("\nend\n", "\nimgenv\tPWNED=1\nend\n")


def primed(alice: User, image: str) -> Path:
    r = alice.nagaya("run", image, "true", env={"NAGAYA_STARTER": "off", "NAGAYA_STARTER_PLAN": "want"})
    assert r.returncode == 0, r.stderr
    p = plan_path(alice, image)
    assert p.is_file()
    return p


def assert_refused_and_ran(r: subprocess.CompletedProcess) -> None:
    assert FAST not in r.stderr and "nagaya-starter: python path" in r.stderr, r.stderr
    assert r.returncode == 0 and r.stdout.split() == ["ran", "0"], (r.stdout, r.stderr)


def test_the_payload_works_when_the_plan_is_trusted(alice: User, image: str) -> None:
    """The control: the victim's own private plan is replayed as written, so the refusals below are what
    keeps the payload out."""
    p = primed(alice, image)
    p.write_text(forged(p))
    r = run(alice, image)
    assert FAST in r.stderr and r.stdout.split() == ["ran", "1"], r.stderr


def test_plan_in_a_directory_another_user_owns(alice: User, bob: User, image: str, place: Path) -> None:
    text = forged(primed(alice, image))
    cache = place / "cache"
    for d in (cache, cache / "nagaya", cache / "nagaya" / "starter"):
        bob.mkdir(d)
    bad = plan_path(alice, image, cache)
    bob.run(["sh", "-c", f"umask 077; cat > {bad}"], input=text, check=True)
    r = run(alice, image, {"XDG_CACHE_HOME": str(cache)})
    assert FAST not in r.stderr and "no private plan directory" in r.stderr, r.stderr
    assert "PWNED" not in r.stdout
    assert bad.read_text() == text and bad.stat().st_uid == bob.uid     # and the Python path wrote nothing there


def test_plan_directory_others_can_write(alice: User, bob: User, image: str) -> None:
    real = primed(alice, image)
    text = forged(real)
    d = real.parent
    try:
        d.chmod(0o777)                      # the victim's mistake: now anyone can swap the plan
        real.unlink()
        real.write_text(text)               # what bob can now put there (root writes it: bob cannot reach
        os.chown(real, bob.uid, bob.gid)    # alice's 0700 cache to do it himself)
        real.chmod(0o644)
        r = run(alice, image)
        assert "no private plan directory" in r.stderr
        assert_refused_and_ran(r)
        real.unlink()                       # a plan of alice's own there is refused as well
        real.write_text(text)
        os.chown(real, alice.uid, alice.gid)
        real.chmod(0o600)
        assert_refused_and_ran(run(alice, image))
    finally:
        d.chmod(0o700)


def test_plan_owned_by_another_user(alice: User, bob: User, image: str) -> None:
    real = primed(alice, image)
    real.write_text(forged(real))
    os.chown(real, bob.uid, bob.gid)        # a file of bob's at the plan's name, readable by alice
    real.chmod(0o644)
    r = run(alice, image)
    assert "not the user's own" in r.stderr
    assert_refused_and_ran(r)
    st = real.stat()                        # the Python run replaced it with one of alice's
    assert st.st_uid == alice.uid and "PWNED" not in real.read_text()
    assert FAST in run(alice, image).stderr


def test_symlinked_plan(alice: User, bob: User, image: str, place: Path) -> None:
    real = primed(alice, image)
    target = place / "bobs.plan"
    target.write_text(forged(real))
    os.chown(target, alice.uid, alice.gid)  # even a file of the victim's own, if reached through a link
    target.chmod(0o600)
    real.unlink()
    real.symlink_to(target)
    os.lchown(real, bob.uid, bob.gid)
    r = run(alice, image)
    assert_refused_and_ran(r)
    assert not real.is_symlink() and "PWNED" not in real.read_text()     # replaced, not written through
    assert "PWNED" in target.read_text()


def test_hard_linked_plan(alice: User, image: str, place: Path) -> None:
    real = primed(alice, image)
    real.write_text(forged(real))
    os.link(real, place / "second-name")
    r = run(alice, image)
    assert "not the user's own private regular file" in r.stderr
    assert_refused_and_ran(r)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_plan_others_can_write(alice: User, image: str, mode: int) -> None:
    real = primed(alice, image)
    real.write_text(forged(real))
    real.chmod(mode)
    r = run(alice, image)
    assert "not the user's own private regular file" in r.stderr
    assert_refused_and_ran(r)


def test_fifo_at_the_plan_name_does_not_hang(alice: User, image: str) -> None:
    real = primed(alice, image)
    real.unlink()
    os.mkfifo(real, 0o600)
    os.chown(real, alice.uid, alice.gid)
    r = run(alice, image)
    assert_refused_and_ran(r)
    assert stat.S_ISREG(real.lstat().st_mode)


def test_setuid_starter_refuses_to_run(alice: User, image: str, place: Path) -> None:
    copy = place / "nagaya"
    shutil.copy(STARTER, copy)
    os.chmod(copy, 0o4755)
    r = alice.run([str(copy), "run", image, "sh", "-c", "echo ran"])
    assert r.returncode == 125 and "must not be installed setuid" in r.stderr
    assert "ran" not in r.stdout
