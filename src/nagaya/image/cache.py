"""`nagaya cache ls|gc`: what the cache holds, and LRU garbage collection that never pulls an image
out from under a running container (delete_image refuses while a shared use-lock is held)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nagaya.errors import NagayaError, UsageError
from nagaya.image.reference import parse
from nagaya.image.store import ImageMeta, ImageStore

TMP_GRACE = 3600            # tmp/ entries and fresh blobs younger than this may belong to a running pull


@dataclass
class CachedImage:
    meta: ImageMeta
    tags: list[str]
    last_used: float
    size: int                                   # squashfs + the unpacked copy, if one was made
    in_use: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.meta.digest, "tags": self.tags, "size": self.size,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
                "in_use": self.in_use, "source": self.meta.source}


@dataclass
class GcReport:
    removed_images: list[dict[str, Any]] = field(default_factory=list)
    kept_in_use: list[str] = field(default_factory=list)
    removed_blobs: int = 0
    removed_tmp: int = 0
    freed: int = 0
    size_before: int = 0
    size_after: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"removed_images": self.removed_images, "kept_in_use": self.kept_in_use,
                "removed_blobs": self.removed_blobs, "removed_tmp": self.removed_tmp, "freed": self.freed,
                "size_before": self.size_before, "size_after": self.size_after, "dry_run": self.dry_run}


def parse_age(text: str) -> float:
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    mult = units.get(t[-1:])
    num = t[:-1] if mult else t
    try:
        return float(num) * (mult or 86400)
    except ValueError:
        raise UsageError(f"invalid age {text!r} (e.g. 12h, 30d, 2w)") from None


def _in_use(store: ImageStore, digest: str) -> bool:
    """A running container holds a shared flock on locks/use-HEX of its user's cache, or, for an image
    of a shared cache (which its users cannot write to), on the squashfs file itself."""
    import fcntl

    for p in (store.root / "locks" / f"use-{digest[7:]}", store.root / "images" / f"{digest[7:]}.sqfs"):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def list_cached(store: ImageStore) -> list[CachedImage]:
    tags: dict[str, list[str]] = {}
    for n, t, d in store.tags():
        tags.setdefault(d, []).append(f"{n}:{t}")
    out = []
    images = store.root / "images"
    for p in sorted(images.glob("*.json")) if images.is_dir() else []:
        try:
            meta = ImageMeta.from_json(json.loads(p.read_bytes()))
            st = p.stat()
        except (OSError, ValueError, TypeError):
            continue
        sq = images / f"{p.stem}.sqfs"
        size = sq.stat().st_size if sq.exists() else 0
        unpacked = images / f"{p.stem}.dir"
        if unpacked.is_dir():               # the unpacked copy (no FUSE, or runtime.unpack) counts in the cap too
            size += cache_dir_size(unpacked)
        out.append(CachedImage(meta, sorted(tags.get(meta.digest, [])), st.st_mtime, size,
                               _in_use(store, meta.digest)))
    return sorted(out, key=lambda c: c.last_used, reverse=True)


def _blob_sizes(store: ImageStore) -> dict[str, tuple[int, float]]:
    out = {}
    d = store.root / "blobs" / "sha256"
    if d.is_dir():
        for p in d.iterdir():
            with contextlib.suppress(OSError):
                st = p.stat()
                out["sha256:" + p.name] = (st.st_size, st.st_mtime)
    return out


def _refs(meta: ImageMeta) -> set[str]:
    return {meta.digest, meta.config_digest, *[x.digest for x in meta.layers]}


def gc(store: ImageStore, max_size: int | None = None, older_than: float | None = None,
       dry_run: bool = False) -> GcReport:
    """Remove least-recently-used images until the cache fits `max_size` and none is older than
    `older_than` seconds; then unreferenced blobs and stale tmp/ entries."""
    rep = GcReport(dry_run=dry_run)
    now = time.time()
    images = list_cached(store)
    blobs = _blob_sizes(store)
    rep.size_before = sum(i.size for i in images) + sum(s for s, _m in blobs.values())
    from nagaya.image.lazy import cachecap  # lazily read blocks count too, and go first (refetched cheaply)

    lazy_bytes = sum(c.size for c in cachecap.list_caches(store.root))
    rep.size_before += lazy_bytes
    total = rep.size_before
    if max_size is not None and total > max_size and lazy_bytes:
        freed = cachecap.shrink(store.root, total - max_size, dry_run)
        total -= freed
        rep.freed += freed
    keep = {i.meta.digest: i for i in images}
    refcount: dict[str, int] = {}
    for i in images:
        for d in _refs(i.meta):
            refcount[d] = refcount.get(d, 0) + 1

    def exclusive_bytes(img: CachedImage) -> int:
        return img.size + sum(blobs.get(d, (0, 0))[0] for d in _refs(img.meta) if refcount.get(d) == 1)

    for img in sorted(images, key=lambda c: c.last_used):        # oldest use first
        too_old = older_than is not None and now - img.last_used > older_than
        too_big = max_size is not None and total > max_size
        if not (too_old or too_big):
            continue
        if img.in_use:
            rep.kept_in_use.append(img.meta.digest)
            continue
        freed = exclusive_bytes(img)
        if not dry_run:
            try:
                _remove_image(store, img)
            except NagayaError:                 # became in use since we looked
                rep.kept_in_use.append(img.meta.digest)
                continue
        rep.removed_images.append({"digest": img.meta.digest, "tags": img.tags, "size": img.size})
        total -= freed
        rep.freed += freed
        del keep[img.meta.digest]
        for d in _refs(img.meta):
            refcount[d] -= 1

    # Blobs no remaining image refers to: layers of removed images (already counted as freed), and
    # orphans (cached indexes, debris of failed pulls) -- unless fresh: a running pull may own them.
    before = set().union(*(_refs(i.meta) for i in images)) if images else set()
    live = set().union(*(_refs(i.meta) for i in keep.values())) if keep else set()
    for d, (size, mtime) in blobs.items():
        if d in live or (d not in before and now - mtime < TMP_GRACE):
            continue
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                store.blob_path(d).unlink()
        rep.removed_blobs += 1
        if d not in before:
            rep.freed += size
            total -= size

    tmp = store.root / "tmp"
    for p in tmp.iterdir() if tmp.is_dir() else []:
        with contextlib.suppress(OSError):
            if now - p.lstat().st_mtime < TMP_GRACE:
                continue
            if not dry_run:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
            rep.removed_tmp += 1
    rep.size_after = max(0, total)
    return rep


def _remove_image(store: ImageStore, img: CachedImage) -> None:
    import fcntl

    # Hold the squashfs exclusively while deleting: a container starting from a shared cache now either
    # got its shared lock first (and we stop here) or finds the image gone, never a file vanishing under it.
    sq = store.root / "images" / f"{img.meta.digest[7:]}.sqfs"
    try:
        fd = os.open(sq, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"image {img.meta.digest[:19]} is in use by a running container") from None
        if not store.delete_image(img.meta.digest):     # raises while a container holds the use-lock
            return
    finally:
        if fd >= 0:
            os.close(fd)
    for t in img.tags:
        with contextlib.suppress(NagayaError):
            store.untag(parse(t))


def cache_dir_size(root: Path) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                n += os.lstat(os.path.join(dirpath, f)).st_size
    return n
