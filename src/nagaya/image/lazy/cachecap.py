"""The lazy block caches under the image cache cap: `nagaya cache gc` (and the cap) count the bytes their
sparse `data` files really hold, and drop whole block caches least recently used first. A reader holds a
shared flock on the cache's `use` file while it runs, so a cache in use is never removed under it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LazyCache:
    path: Path
    size: int                   # bytes on disk (a sparse file: only the blocks fetched)
    last_used: float


def hold(directory: Path) -> int:
    """The reader's shared hold on its cache (kept until the process exits)."""
    fd = os.open(directory / "use", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def list_caches(root: Path) -> list[LazyCache]:
    out = []
    base = root / "lazy"
    for d in base.iterdir() if base.is_dir() else []:
        if d.name == "mnt" or d.is_symlink() or not d.is_dir():
            continue
        with contextlib.suppress(OSError):
            st = os.lstat(d / "data")
            used = max(st.st_mtime, os.lstat(d / "have").st_mtime)
            out.append(LazyCache(d, st.st_blocks * 512, used))
    return out


def remove_if_unused(c: LazyCache) -> bool:
    try:
        fd = os.open(c.path / "use", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False                    # a run reads from it now
        shutil.rmtree(c.path, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def shrink(root: Path, excess: int, dry_run: bool = False) -> int:
    """Drop block caches, least recently used first, until `excess` bytes are freed; returns the bytes freed."""
    freed = 0
    for c in sorted(list_caches(root), key=lambda c: c.last_used):
        if freed >= excess:
            break
        if dry_run or remove_if_unused(c):
            freed += c.size
    return freed
