"""Broken images and hosts without FUSE: a one-line error or a working fallback, never a leftover."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.users import User

pytestmark = pytest.mark.integration


def _import(user: User, rootfs: Path, env: dict[str, str]) -> dict:
    r = user.nagaya("image", "import", str(rootfs), "--name", "bb", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _sqfs(env: dict[str, str], digest: str) -> Path:
    return Path(env["XDG_CACHE_HOME"]) / "nagaya" / "images" / f"{digest[7:]}.sqfs"


def _no_processes(user: User) -> None:
    assert user.processes() == []


@pytest.mark.parametrize("damage", ["truncate", "superblock", "inode-table", "missing"])
def test_corrupt_image_file(alice: User, rootfs: Path, fresh_cache: dict[str, str], damage: str) -> None:
    meta = _import(alice, rootfs, fresh_cache)
    f = _sqfs(fresh_cache, meta["digest"])
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "superblock":
        data[0:4] = b"XXXX"
        f.write_bytes(data)
    elif damage == "inode-table":
        # Garbage over the metadata at the end of the file (inode and directory tables live there).
        for i in range(len(data) - 8192, len(data) - 64):
            data[i] = 0x5A
        f.write_bytes(data)
    else:
        f.unlink()
    r = alice.nagaya("run", "bb", "ls", "/bin", env=fresh_cache)
    assert r.returncode != 0
    assert r.stderr.startswith("nagaya: ") and r.stderr.count("\n") == 1, r.stderr
    assert "re-import" in r.stderr or "corrupt" in r.stderr
    _no_processes(alice)


def test_without_fuse_runs_from_an_unpacked_copy(alice: User, rootfs: Path, fresh_cache: dict[str, str]) -> None:
    meta = _import(alice, rootfs, fresh_cache)
    os.chmod("/dev/fuse", 0o600)
    try:
        r = alice.nagaya("run", "bb", "cat", "/app/data.txt", env=fresh_cache)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "image data\n" and "unpacking" in r.stderr
        unpacked = Path(fresh_cache["XDG_CACHE_HOME"]) / "nagaya" / "images" / f"{meta['digest'][7:]}.dir"
        assert (unpacked / "bin" / "busybox").exists()
        r = alice.nagaya("run", "bb", "sh", "-c", "touch /app/x", env=fresh_cache)
        assert r.returncode == 1 and "Read-only" in r.stderr and "unpacking" not in r.stderr
        assert alice.nagaya("image", "rm", "bb", env=fresh_cache).returncode == 0
        assert not unpacked.exists()
    finally:
        os.chmod("/dev/fuse", 0o666)
    _no_processes(alice)


def test_unknown_image_and_bad_reference(alice: User, fresh_cache: dict[str, str]) -> None:
    r = alice.nagaya("run", "nosuch:tag", "true", env=fresh_cache)
    assert r.returncode == 3 and r.stderr.startswith("nagaya: image nosuch:tag not found")
    r = alice.nagaya("run", "Bad..Name", "true", env=fresh_cache)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = alice.nagaya("run", env=fresh_cache)
    assert r.returncode == 2 and "IMAGE" in r.stderr


def test_nothing_written_outside_the_cache(alice: User, rootfs: Path, fresh_cache: dict[str, str],
                                           workdir: Path) -> None:
    """A run writes only the audit log and the cache's lock/LRU files; /tmp and the cwd stay as they were."""
    _import(alice, rootfs, fresh_cache)
    before_tmp = set(os.listdir("/tmp"))
    before_home = {str(p) for p in alice.home.rglob("*") if ".local" not in str(p) and "cache" not in str(p)}
    assert alice.nagaya("run", "bb", "true", env=fresh_cache, cwd=workdir).returncode == 0
    assert set(os.listdir("/tmp")) == before_tmp
    after_home = {str(p) for p in alice.home.rglob("*") if ".local" not in str(p) and "cache" not in str(p)}
    assert after_home == before_home


def test_runc_needs_subordinate_ids(users: tuple[User, User], rootfs: Path, shared_tmp: Path) -> None:
    """A user without /etc/subuid lines gets a one-line error that says what to ask the admin."""
    u = User.ensure("nagaya-nosub", 500000)
    for f in ("/etc/subuid", "/etc/subgid"):       # useradd may have given a range automatically
        lines = Path(f).read_text().splitlines(keepends=True)
        Path(f).write_text("".join(x for x in lines if not x.startswith(f"{u.name}:")))
    try:
        assert u.nagaya("image", "import", str(rootfs), "--name", "bb").returncode == 0
        r = u.nagaya("run", "--backend", "runc", "bb", "true")
        assert r.returncode == 125 and r.stderr.count("\n") == 1 and "subordinate" in r.stderr
        assert u.nagaya("run", "bb", "true").returncode == 0         # bwrap needs none
    finally:
        shutil.rmtree(u.home / ".cache", ignore_errors=True)
