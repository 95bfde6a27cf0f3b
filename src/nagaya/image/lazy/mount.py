"""`nagaya run --pull lazy`: find the image's squashfs artifact, start the user's FUSE reader, hand the
runtime the path of one squashfs file. Anything that makes lazy reading impossible (no artifact, a registry
without byte ranges) returns None with a note, and the caller pulls in full."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nagaya.errors import ImageError, UsageError
from nagaya.image import oci
from nagaya.image.lazy.artifact import LazyIndex, find
from nagaya.image.lazy.chunks import ChunkCache, RangesUnsupported
from nagaya.image.store import ImageStore

READY_TIMEOUT = 30.0


@dataclass
class LazyImage:
    digest: str
    config: dict[str, Any]
    index: LazyIndex
    registry: str
    repository: str


def prepare(store: ImageStore, ref_text: str, cfg: Any) -> LazyImage | None:
    from nagaya.image.pull import _resolve, parse_remote, registry_client

    ref = parse_remote(ref_text)
    store.ensure_dirs()
    with registry_client(store, ref, cfg) as reg:
        digest, data = _resolve(store, reg, ref, oci.oci_arch())
        if store.has_image(digest):
            return None                     # already pulled in full: nothing to gain
        index = find(reg, digest)
        if index is None:
            note(f"{ref.name} has no squashfs artifact in the registry; pulling in full")
            return None
        if data is None:
            data, _mt, _d = reg.get_manifest(digest, expect_digest=digest)
        manifest = oci.Manifest.parse(data, f"{ref.name}@{digest[:19]}")
        config = oci.load_json(reg.get_blob_bytes(manifest.config, f"{ref.name}: image config"),
                               f"{ref.name}: image config")
        cache = ChunkCache(cache_dir(store, index, cfg), index, reg)
        try:
            cache.get(0)                    # the superblock; also the probe for byte ranges
        except RangesUnsupported as e:
            note(f"{e}; pulling {ref.name} in full")
            return None
        finally:
            cache.close()
    return LazyImage(digest, config, index, ref.registry, ref.path)


def resolve_digest(store: ImageStore, ref_text: str, cfg: Any) -> str:
    """The image manifest digest a registry reference names now, for this platform, without pulling it."""
    from nagaya.image.pull import _resolve, parse_remote, registry_client

    ref = parse_remote(ref_text)
    store.ensure_dirs()
    with registry_client(store, ref, cfg) as reg:
        return _resolve(store, reg, ref, oci.oci_arch())[0]


def note(msg: str) -> None:
    print(f"nagaya: note: {msg}", file=sys.stderr)


def cache_dir(store: ImageStore, index: LazyIndex, cfg: Any) -> Path:
    """CACHE/lazy/SQFS-HEX, or image.lazy_cache_dir's (on a shared file system: one fetch per block for all
    the nodes of a job). The latter must be the user's own, private directory (safefs rules)."""
    base = getattr(cfg.image, "lazy_cache_dir", "")
    if not base:
        return store.root / "lazy" / index.squashfs_digest[7:]
    from nagaya import safefs
    from nagaya.config import _expand

    path = _expand(base) if "$" in base else base
    os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        real = safefs.private_dir(path)
    except (OSError, safefs.UnsafePath) as e:
        raise ImageError(f"image.lazy_cache_dir {path}: {safefs.describe(e)}") from None
    return Path(real) / index.squashfs_digest[7:]


class Reader:
    """The running FUSE reader; `path` is the squashfs file. stop() unmounts and reaps it."""

    def __init__(self, store: ImageStore, img: LazyImage, cfg: Any) -> None:
        self.mnt = store.root / "lazy" / "mnt" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.mnt.mkdir(parents=True, mode=0o700)
        params = {"index": img.index.to_json(), "mountpoint": str(self.mnt), "registry": img.registry,
                  "repository": img.repository, "insecure": list(cfg.image.insecure_registries),
                  "token_dir": str(store.root / "auth"), "cache_dir": str(cache_dir(store, img.index, cfg))}
        boot = f"import sys; sys.path[:0] = {sys.path!r}; from nagaya.image.lazy.serve import main; main()"
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", boot], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(params).encode() + b"\n")
        self.proc.stdin.flush()
        ready, _w, _x = select.select([self.proc.stdout], [], [], READY_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise ImageError("the lazy image reader did not start (FUSE unusable here?); use --pull full")
        self.path = str(self.mnt / "image.sqfs")

    def stop(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()         # EOF: the reader unmounts itself and exits
        # No fork here: after a run this process may sit in a pid namespace whose init has exited.
        try:
            self.proc.wait(timeout=30)      # it unmounts and writes the run's profile first (slow on a busy node)
        except subprocess.TimeoutExpired:
            self.proc.kill()                # its /dev/fuse closes: the session ends, reads get ENOTCONN
            self.proc.wait()


def mode(cfg: Any, flag: str) -> str:
    m = flag or getattr(cfg.image, "pull", "full") or "full"
    if m not in ("full", "lazy"):
        raise UsageError(f"--pull {m!r}: choose full or lazy")
    return m


def publish_for(store: ImageStore, ref_text: str, cfg: Any, quiet: bool = True) -> dict[str, Any]:
    """`nagaya image lazy-publish REF`: for an image pushed by another tool (no squashfs artifact yet), pull
    and convert it once here and publish its squashfs (needs push rights to the repository)."""
    from nagaya.image.lazy.artifact import publish, sqfs_tag
    from nagaya.image.pull import parse_remote, pull_image, registry_client

    ref = parse_remote(ref_text)
    res = pull_image(store, ref_text, cfg, quiet)
    meta = res.meta
    data = store.read_blob(meta.digest)
    with registry_client(store, ref, cfg, ("pull", "push")) as reg:
        already = find(reg, meta.digest) is not None
        if not already:
            publish(reg, meta.digest, len(data), meta.manifest_media_type, store.squashfs_path(meta.digest))
    return {"ref": str(ref), "digest": meta.digest, "tag": sqfs_tag(meta.digest), "published": not already}
