"""runtime.unpack: a many-CPU job runs from an unpacked copy in the user's cache instead of squashfuse
(one request at a time), made once and counted in the cache's size; `never` keeps squashfuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers.users import User

pytestmark = pytest.mark.integration

# The FUSE server (nagaya-squashfs, or squashfuse_ll) runs in the container's pid namespace (the backend starts
# it), so the container sees it.
# 1 when the image is a FUSE mount (the run's own or its keeper's clone), 0 when it is the unpacked copy
FUSE_LOWER = "grep -c ' - fuse.squashfuse ' /proc/self/mountinfo | grep -qv '^0$' && echo 1 || echo 0"


def _import(user: User, rootfs: Path, env: dict[str, str]) -> dict:
    r = user.nagaya("image", "import", str(rootfs), "--name", "bb", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_many_cpus_run_from_an_unpacked_copy(alice: User, rootfs: Path, fresh_cache: dict[str, str]) -> None:
    meta = _import(alice, rootfs, fresh_cache)
    unpacked = Path(fresh_cache["XDG_CACHE_HOME"]) / "nagaya" / "images" / f"{meta['digest'][7:]}.dir"
    cpus = len(os.sched_getaffinity(0))
    # auto, below the threshold: squashfuse, no copy
    few = {**fresh_cache, "NAGAYA_RUNTIME_UNPACK_THREADS": str(cpus + 1)}
    r = alice.nagaya("run", "bb", "sh", "-c", f"cat /app/data.txt; {FUSE_LOWER}", env=few)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "image data\n1\n" and not unpacked.exists()
    size_before = json.loads(alice.nagaya("cache", "ls", "--json", env=fresh_cache).stdout)
    # auto, at the threshold: the copy is made once, with a note, and used from then on
    many = {**fresh_cache, "NAGAYA_RUNTIME_UNPACK_THREADS": str(cpus)}
    r = alice.nagaya("run", "bb", "sh", "-c", f"cat /app/data.txt; {FUSE_LOWER}", env=many)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "image data\n0\n" and "unpacking the image once" in r.stderr
    assert (unpacked / "bin" / "busybox").exists()
    r = alice.nagaya("run", "bb", "sh", "-c", "touch /app/x", env=many)
    assert r.returncode == 1 and "Read-only" in r.stderr and "unpacking" not in r.stderr
    # always / never
    r = alice.nagaya("run", "bb", "sh", "-c", FUSE_LOWER, env={**fresh_cache, "NAGAYA_RUNTIME_UNPACK": "always"})
    assert r.returncode == 0 and r.stdout == "0\n", r.stderr
    r = alice.nagaya("run", "bb", "sh", "-c", FUSE_LOWER,
                     env={**fresh_cache, "NAGAYA_RUNTIME_UNPACK": "never", "NAGAYA_RUNTIME_UNPACK_THREADS": "1"})
    assert r.returncode == 0 and r.stdout == "1\n", r.stderr
    # the copy counts in the cache's size (and so in cache_max_size), and goes with the image
    size_after = json.loads(alice.nagaya("cache", "ls", "--json", env=fresh_cache).stdout)
    def total(ls: object) -> int:
        images = ls["images"] if isinstance(ls, dict) else ls
        return sum(i["size"] for i in images)
    assert total(size_after) > total(size_before)
    assert alice.nagaya("image", "rm", "bb", env=fresh_cache).returncode == 0
    assert not unpacked.exists()
    assert alice.processes() == []


def test_bad_unpack_setting_is_one_line(alice: User, rootfs: Path, fresh_cache: dict[str, str]) -> None:
    _import(alice, rootfs, fresh_cache)
    r = alice.nagaya("run", "bb", "true", env={**fresh_cache, "NAGAYA_RUNTIME_UNPACK": "sometimes"})
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "runtime.unpack" in r.stderr, r.stderr
