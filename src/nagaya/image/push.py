"""`nagaya push`: upload a cached image's blobs (those the registry lacks) and its manifest."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from nagaya.errors import ImageError, PermissionDenied, UsageError
from nagaya.image import oci
from nagaya.image.pull import _progress, parse_remote, registry_client
from nagaya.image.store import ImageMeta, ImageStore


@dataclass
class PushResult:
    ref: str
    meta: ImageMeta
    uploaded: int = 0
    mounted: int = 0
    skipped: int = 0
    bytes_uploaded: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.meta.digest, "blobs_uploaded": self.uploaded,
                "blobs_mounted": self.mounted, "blobs_skipped": self.skipped,
                "bytes_uploaded": self.bytes_uploaded, "seconds": round(self.seconds, 3)}


def _source_repo(meta: ImageMeta, registry: str) -> str | None:
    """The repository an image was pulled from on this registry (a cross-repository mount source)."""
    prefix = registry + "/"
    if meta.source.startswith(prefix) and "@" in meta.source:
        return meta.source[len(prefix):].split("@", 1)[0]
    return None


def push(store: ImageStore, local: str, ref_text: str, cfg: Any, quiet: bool = False,
         immutable: bool = False) -> PushResult:
    """`immutable`: the site forbids moving this tag; refuse before uploading anything if it exists."""
    t0 = time.monotonic()
    meta = store.resolve(local)
    ref = parse_remote(ref_text)
    if ref.digest:
        raise UsageError("push to a tag (HOST/PROJECT/NAME:TAG), not a digest")
    manifest_bytes = store.read_blob(meta.digest) if store.has_blob(meta.digest) else b""
    if oci.sha256_digest(manifest_bytes) != meta.digest:
        raise ImageError(f"image {meta.short}: its manifest is missing or damaged in the cache; re-import it")
    descs = [(meta.config_digest, 0)] + [(x.digest, x.size) for x in meta.layers]
    for d, _size in descs:
        if not store.has_blob(d):
            raise ImageError(f"image {meta.short}: blob {d[:19]} is no longer in the cache; re-import or re-pull it")
    blobs = list({d: store.blob_path(d).stat().st_size for d, _s in descs}.items())
    src = _source_repo(meta, ref.registry)
    mount_from = src if src and src != ref.path else None
    extra = (f"repository:{mount_from}:pull",) if mount_from else ()
    res = PushResult(f"{ref.name}:{ref.tag_or_latest}", meta)
    with registry_client(store, ref, cfg, ("pull", "push"), extra) as reg:
        if immutable and (cur := reg.head_manifest(ref.tag_or_latest)) not in (None, meta.digest):
            raise PermissionDenied(f"{res.ref} is an immutable tag (now {str(cur)[:19]}); push a new tag instead")
        missing = []
        for d, size in blobs:                # HEADs are cheap and first: they also fetch the token
            if reg.has_blob(d, push=True):
                res.skipped += 1
            else:
                missing.append((d, size))
        total = sum(s for _d, s in missing)
        with _progress(f"pushing {res.ref}", quiet, total) as advance:
            def one(d: str, size: int) -> None:
                if mount_from and reg.mount_blob(d, mount_from):
                    res.mounted += 1
                    if advance:
                        advance(size)
                    return
                reg.upload_blob(store.blob_path(d), d, size, advance)
                res.uploaded += 1
                res.bytes_uploaded += size

            if missing:
                jobs = max(1, min(int(cfg.image.pull_jobs), len(missing)))
                with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="push") as pool:
                    futures = [pool.submit(one, d, s) for d, s in missing]
                    done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
                    for f in done:
                        if f.exception() is not None:
                            pool.shutdown(wait=True, cancel_futures=True)
                            raise f.exception()  # type: ignore[misc]
        reg.put_manifest(ref.tag_or_latest, manifest_bytes, meta.manifest_media_type)
        if getattr(cfg.image, "lazy_publish", False) and store.squashfs_path(meta.digest).exists():
            from nagaya.image.lazy.artifact import publish

            publish(reg, meta.digest, len(manifest_bytes), meta.manifest_media_type,   # for `run --pull lazy`
                    store.squashfs_path(meta.digest))
    res.seconds = time.monotonic() - t0
    return res
