"""The per-user (or per-node) image cache: content-addressed blobs, one squashfs per manifest digest.

Layout under the cache directory:
    blobs/sha256/<hex>            layers, configs and manifests, verified by digest
    images/<hex>.sqfs             the runnable image, one per manifest digest
    images/<hex>.json             its metadata (ImageMeta)
    images/<hex>.dir/             unpacked fallback for hosts without usable FUSE (made on demand)
    refs/<name>/<tag>             a tag: a file holding the manifest digest
    tmp/                          work files; renamed into place only when complete
    locks/                        flock files, so that concurrent writers do work once
Every write is temp + rename, so readers never see a partial entry. This module is on the run path:
keep its imports light.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from nagaya.errors import ImageNotFound, UsageError
from nagaya.image.reference import Reference, is_digest, parse
from nagaya.record import Factory, Record

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any


class LayerInfo(Record):
    digest: str
    size: int
    media_type: str
    diff_id: str = ""


class ImageMeta(Record):
    digest: str                         # manifest digest: the image's identity
    config_digest: str
    config: dict[str, Any]              # the OCI image config document
    layers: list[LayerInfo]
    squashfs_size: int = 0
    created: str = ""                   # from the image config, when it says
    imported: str = ""                  # when this cache got it
    source: str = ""
    manifest_media_type: str = "application/vnd.oci.image.manifest.v1+json"
    extra: dict[str, Any] = Factory(dict)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def short(self) -> str:
        return self.hex[:12]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ImageMeta:
        obj = dict(obj)
        obj["layers"] = [LayerInfo(**x) for x in obj.get("layers", [])]
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        d = self.to_dict()
        d["layers"] = [x.to_dict() for x in self.layers]
        return d


class TaggedImage(Record):
    _frozen = True

    name: str
    tag: str
    meta: ImageMeta


def _hex(digest: str) -> str:
    if not is_digest(digest):
        raise UsageError(f"invalid digest {digest!r}")
    return digest[7:]


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class ImageStore:
    def __init__(self, root: Path, shared: list[Path] | None = None) -> None:
        self.root = root
        self.shared = shared or []          # read-only site caches with the same layout

    # -- paths -------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / _hex(digest)

    def squashfs_path(self, digest: str) -> Path:
        h = _hex(digest)
        for s in self.shared:
            p = s / "images" / f"{h}.sqfs"
            if p.exists():
                return p
        return self.root / "images" / f"{h}.sqfs"

    def unpacked_path(self, digest: str) -> Path:
        return self.root / "images" / f"{_hex(digest)}.dir"

    def meta_path(self, digest: str) -> Path:
        return self.root / "images" / f"{_hex(digest)}.json"

    def _ref_path(self, name: str, tag: str) -> Path:
        return self.root / "refs" / name / tag

    def ensure_dirs(self) -> None:
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._check_owner()
        for d in ("blobs/sha256", "images", "refs", "tmp", "locks"):
            (self.root / d).mkdir(parents=True, exist_ok=True, mode=0o755)

    def _check_owner(self) -> None:
        """A cache in a shared place (/var/tmp/nagaya-${USER} on a node) could have been made by someone
        else first, to feed us their images: it must be ours, a real directory, and writable by us alone."""
        from nagaya.image.cachedirs import own_cache

        own_cache(str(self.root))

    @contextlib.contextmanager
    def tmpdir(self, prefix: str = "work-") -> Iterator[Path]:
        import shutil
        import tempfile

        self.ensure_dirs()
        d = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix=prefix))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, key: str, shared: bool = False) -> Iterator[None]:
        """An flock on locks/<key>: exclusive for writers, shared for users of an entry."""
        self.ensure_dirs()
        fd = os.open(self.root / "locks" / key.replace("/", "_").replace(":", "_"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- blobs -------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def put_blob_file(self, tmp: Path, digest: str) -> Path:
        """Move a verified temp file into the blob store (a no-op if the blob is already there)."""
        dest = self.blob_path(digest)
        if tmp == dest:                     # already in place (pulled layers are stored as they arrive)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            tmp.unlink(missing_ok=True)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        return dest

    def put_blob_bytes(self, data: bytes, digest: str) -> Path:
        dest = self.blob_path(digest)
        if not dest.exists():
            atomic_write(dest, data)
        return dest

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    # -- images ------------------------------------------------------------------------------
    def meta(self, digest: str) -> ImageMeta | None:
        h = _hex(digest)
        for base in [self.root, *self.shared]:
            try:
                return ImageMeta.from_json(json.loads((base / "images" / f"{h}.json").read_bytes()))
            except FileNotFoundError:
                continue
        return None

    def has_image(self, digest: str) -> bool:
        return self.meta(digest) is not None and self.squashfs_path(digest).exists()

    def commit_image(self, meta: ImageMeta, squashfs_tmp: Path) -> None:
        """Publish an image: squashfs first, metadata last (metadata is what makes it visible)."""
        self.ensure_dirs()
        dest = self.root / "images" / f"{meta.hex}.sqfs"
        os.chmod(squashfs_tmp, 0o644)
        os.replace(squashfs_tmp, dest)
        meta.squashfs_size = dest.stat().st_size
        meta.imported = meta.imported or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write(self.meta_path(meta.digest), json.dumps(meta.to_json(), indent=1).encode())

    def touch(self, digest: str) -> None:
        """Mark an image used now (the cache's LRU order)."""
        with contextlib.suppress(OSError):
            os.utime(self.meta_path(digest))

    # -- tags --------------------------------------------------------------------------------
    def tag(self, ref: Reference, digest: str) -> None:
        atomic_write(self._ref_path(ref.name, ref.tag_or_latest), (digest + "\n").encode())

    def untag(self, ref: Reference) -> bool:
        p = self._ref_path(ref.name, ref.tag_or_latest)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            d = p.parent
            while d != self.root / "refs":
                d.rmdir()
                d = d.parent
        return True

    def lookup_tag(self, name: str, tag: str) -> str | None:
        for base in [self.root, *self.shared]:
            try:
                digest = (base / "refs" / name / tag).read_text().strip()
            except (FileNotFoundError, NotADirectoryError):
                continue
            if is_digest(digest):
                return digest
        return None

    def tags(self) -> Iterator[tuple[str, str, str]]:
        """(name, tag, digest) for every tag in this cache."""
        refs = self.root / "refs"
        if not refs.is_dir():
            return
        for dirpath, _dirs, files in os.walk(refs):
            for f in files:
                if f.startswith("."):
                    continue
                name = os.path.relpath(dirpath, refs)
                digest = self.lookup_tag(name, f)
                if digest:
                    yield name, f, digest

    def list_images(self) -> list[TaggedImage]:
        out = []
        seen = set()
        for name, tag, digest in self.tags():
            m = self.meta(digest)
            if m:
                out.append(TaggedImage(name, tag, m))
                seen.add(digest)
        images = self.root / "images"
        if images.is_dir():
            for p in images.glob("*.json"):
                d = "sha256:" + p.stem
                if d not in seen and (m := self.meta(d)):
                    out.append(TaggedImage("<none>", "<none>", m))
        return sorted(out, key=lambda t: (t.name, t.tag))

    def resolve(self, text: str) -> ImageMeta:
        """Find a local image by NAME[:TAG], NAME@DIGEST, a full digest or a unique digest prefix."""
        if text.startswith("sha256:") or (len(text) >= 6 and all(c in "0123456789abcdef" for c in text)):
            h = text.removeprefix("sha256:")
            if len(h) == 64 and (m := self.meta("sha256:" + h)):
                return m
            matches = {d for _n, _t, d in self.tags() if d[7:].startswith(h)}
            images = self.root / "images"
            if images.is_dir():
                matches |= {"sha256:" + p.stem for p in images.glob(f"{h}*.json")}
            if len(matches) == 1:
                m = self.meta(matches.pop())
                if m:
                    return m
            if len(matches) > 1:
                raise UsageError(f"digest prefix {text!r} is ambiguous")
            if text.startswith("sha256:"):
                raise ImageNotFound(f"image {text} not found")
        ref = parse(text)
        if ref.digest:
            m = self.meta(ref.digest)
            if m is None:
                raise ImageNotFound(f"image {text} not found in the local cache")
            return m
        digest = self.lookup_tag(ref.name, ref.tag_or_latest)
        if digest is None or (m := self.meta(digest)) is None:
            raise ImageNotFound(f"image {ref.name}:{ref.tag_or_latest} not found "
                                "(see `nagaya images`; import one with `nagaya image import`)")
        return m

    def remove(self, text: str, force: bool = False) -> list[str]:
        """Remove a tag; when no tag points at the image any more, remove the image itself."""
        removed: list[str] = []
        try:
            ref = parse(text)
            by_tag = not ref.digest and self.lookup_tag(ref.name, ref.tag_or_latest) is not None
        except UsageError:
            by_tag = False
        if by_tag:
            digest = self.lookup_tag(ref.name, ref.tag_or_latest)
            assert digest
            self.untag(ref)
            removed.append(f"untagged {ref.name}:{ref.tag_or_latest}")
        else:
            digest = self.resolve(text).digest
            if not force:
                users = [f"{n}:{t}" for n, t, d in self.tags() if d == digest]
                if users:
                    raise UsageError(f"image {digest[:19]} is tagged as {', '.join(users)}; "
                                     "remove those tags or use --force")
            for n, t, d in list(self.tags()):
                if d == digest:
                    self.untag(Reference("", n, t) if "/" not in n else _ref_from_name(n, t))
                    removed.append(f"untagged {n}:{t}")
        if any(d == digest for _n, _t, d in self.tags()):
            return removed
        if self.delete_image(digest):
            removed.append(f"deleted {digest}")
        return removed

    def delete_image(self, digest: str) -> bool:
        """Delete an image's squashfs and metadata unless a container is using it (shared lock)."""
        h = _hex(digest)
        fd = os.open(self.root / "locks" / f"use-{h}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"image {digest[:19]} is in use by a running container") from None
            found = False
            for p in (self.meta_path(digest), self.root / "images" / f"{h}.sqfs"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    found = True
            u = self.unpacked_path(digest)
            if u.exists():
                _rmtree_writable(u)
                found = True
            return found
        finally:
            os.close(fd)


def _ref_from_name(name: str, tag: str) -> Reference:
    r = parse(f"{name}:{tag}")
    return r


def _rmtree_writable(path: Path) -> None:
    """rmtree that first makes read-only directories writable (unpacked images keep their modes)."""
    import shutil

    def onerror(func: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(OSError):
            func(p)

    shutil.rmtree(path, onerror=onerror)


def open_store(cfg: Any) -> ImageStore:
    """The user's cache and the site's shared ones, each checked to be trusted (image/cachedirs.py)."""
    from nagaya.image.cachedirs import own_cache, shared_caches

    own_cache(cfg.cache_root)
    return ImageStore(cfg.cache_dir, [Path(p) for p in shared_caches(cfg.image.shared_cache_dirs)])
