"""`nagaya pull`: resolve a tag to its manifest digest (every time), fetch what is missing, convert once.

Cost model: an unchanged tag is one manifest GET (the token is cached on disk); layers already in the
blob store are never fetched again; the squashfs is built once per manifest digest. Concurrency: one
flock per manifest digest (`pull-<hex>`) makes N processes pulling the same image do the work once;
one per blob (`blob-<hex>`) stops two different images that share a layer from fetching it twice.
Crashes: blobs are written under tmp/ and renamed into blobs/ only once their digest and size match;
an image becomes visible only when its metadata file is renamed into place, after its squashfs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nagaya.errors import ImageError, UsageError
from nagaya.image import oci
from nagaya.image.importer import Layer, finish_image
from nagaya.image.reference import Reference, parse
from nagaya.image.registry import Registry
from nagaya.image.store import ImageMeta, ImageStore

MAX_INDEX_DEPTH = 4
Progress = Callable[[int], None]


@dataclass
class PullResult:
    ref: str
    meta: ImageMeta
    cached: bool = False                 # the image was already converted: no blob was fetched
    layers: int = 0
    layers_fetched: int = 0
    bytes_fetched: int = 0
    requests: int = 0                    # requests to the registry (the token service not counted)
    seconds: float = 0.0
    platform: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.meta.digest, "size": self.meta.squashfs_size,
                "cached": self.cached, "layers": self.layers, "layers_fetched": self.layers_fetched,
                "bytes_fetched": self.bytes_fetched, "registry_requests": self.requests,
                "seconds": round(self.seconds, 3), "platform": self.platform}


def registry_client(store: ImageStore, ref: Reference, cfg: Any, actions: tuple[str, ...] = ("pull",),
                    extra_scopes: tuple[str, ...] = ()) -> Registry:
    return Registry(ref.registry, ref.path, actions, insecure=list(cfg.image.insecure_registries),
                    token_dir=store.root / "auth", extra_scopes=extra_scopes)


def parse_remote(text: str) -> Reference:
    ref = parse(text)
    if not ref.registry:
        raise UsageError(f"{text!r} names no registry; use HOST[:PORT]/PROJECT/NAME[:TAG] "
                         "(see `nagaya site status`)")
    return ref


def pull(store: ImageStore, ref_text: str, cfg: Any, quiet: bool = False) -> ImageMeta:
    """What `nagaya run` calls for registry references: the image for the tag as it is now."""
    return pull_image(store, ref_text, cfg, quiet).meta


def pull_image(store: ImageStore, ref_text: str, cfg: Any, quiet: bool = False) -> PullResult:
    t0 = time.monotonic()
    ref = parse_remote(ref_text)
    store.ensure_dirs()
    arch = oci.oci_arch()
    tag_ref = Reference(ref.registry, ref.path, ref.tag_or_latest) if ref.tag or not ref.digest else None
    with registry_client(store, ref, cfg) as reg:
        digest, data = _resolve(store, reg, ref, arch)
        res = PullResult(str(ref), ImageMeta(digest, "", {}, []), platform=f"linux/{arch}")
        meta = store.meta(digest) if store.has_image(digest) else None
        if meta is None:
            with store.lock(f"pull-{digest[7:]}"):
                meta = store.meta(digest) if store.has_image(digest) else None    # another process did it
                if meta is None:
                    meta = _fetch_and_convert(store, reg, ref, digest, data, arch, cfg, quiet, res)
                else:
                    res.cached = True
        else:
            res.cached = True
        if tag_ref is not None:
            store.tag(tag_ref, digest)
        res.meta = meta
        res.layers = len(meta.layers)
        res.requests = reg.requests
    res.seconds = time.monotonic() - t0
    return res


def _resolve(store: ImageStore, reg: Registry, ref: Reference, arch: str) -> tuple[str, bytes | None]:
    """The digest of the image manifest for this platform, and its bytes when we already have them.
    Index documents are kept in the blob store, so an unchanged multi-platform tag is one request too."""
    if ref.digest:
        digest, data = ref.digest, None
    else:
        data, _mt, digest = reg.get_manifest(ref.tag_or_latest)
    for _depth in range(MAX_INDEX_DEPTH + 1):
        if store.has_image(digest):
            return digest, None
        if data is None:
            if store.has_blob(digest):
                data = store.read_blob(digest)
                if oci.sha256_digest(data) != digest:       # never trust a damaged cache file
                    data = None
            if data is None:
                data, _mt, _d = reg.get_manifest(digest, expect_digest=digest)
        obj = oci.load_json(data, f"{reg.where}@{digest[:19]}")
        if obj.get("mediaType") in oci.INDEX_TYPES or "manifests" in obj:
            index = oci.Index.parse(data, f"{reg.where}@{digest[:19]} (index)")
            store.put_blob_bytes(data, digest)
            try:
                desc = index.select(None, arch)
            except ImageError as e:
                raise ImageError(f"{ref}: {e}") from None
            digest, data = desc.digest, None
            continue
        return digest, data
    raise ImageError(f"{ref}: image indexes nested more than {MAX_INDEX_DEPTH} deep")


def _fetch_and_convert(store: ImageStore, reg: Registry, ref: Reference, digest: str, data: bytes | None,
                       arch: str, cfg: Any, quiet: bool, res: PullResult) -> ImageMeta:
    if data is None:
        data, _mt, _d = reg.get_manifest(digest, expect_digest=digest)
    what = f"{ref.name}@{digest[:19]}"
    manifest = oci.Manifest.parse(data, f"{what}: manifest")
    if manifest.config.size > oci.MAX_JSON_BYTES:
        raise ImageError(f"{what}: image config is too large ({manifest.config.size} bytes)")
    if store.has_blob(manifest.config.digest):
        config_bytes = store.read_blob(manifest.config.digest)
    else:
        config_bytes = reg.get_blob_bytes(manifest.config, f"{what}: image config")
    config = oci.load_json(config_bytes, f"{what}: image config")
    if config.get("architecture") not in (None, arch) or config.get("os") not in (None, "linux"):
        raise ImageError(f"{ref}: image is for {config.get('os')}/{config.get('architecture')}, "
                         f"this machine is linux/{arch}")
    # Top layer first: the merge reads layers top down, so it starts as soon as the top one is in, and
    # converts each while the ones below still download (the download no longer precedes the conversion).
    missing = list({d.digest: d for d in reversed(manifest.layers) if not store.has_blob(d.digest)}.values())
    total = sum(d.size for d in missing)
    layers = [Layer(store.blob_path(d.digest), d) for d in manifest.layers]
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    fetched: set[str] = set()
    jobs = max(1, int(cfg.image.pull_jobs))
    with _progress(f"pulling {ref}", quiet, total) as advance, store.tmpdir("pull-") as work, \
            ThreadPoolExecutor(max_workers=max(1, min(jobs, len(missing))), thread_name_prefix="pull") as pool:
        position = {d.digest: n for n, d in enumerate(manifest.layers)}
        futures = {d.digest: pool.submit(_fetch_one, store, reg, d, position[d.digest], advance, what, fetched)
                   for d in missing}

        def wait(i: int, stop: threading.Event) -> None:
            f = futures.get(manifest.layers[i].digest)
            while f is not None:
                try:
                    f.result(timeout=0.2)
                    return
                except FutureTimeout:
                    if stop.is_set():
                        raise ImageError("pull cancelled") from None
        try:
            meta = finish_image(store, data, manifest, config_bytes, layers, None, work, f"{ref.name}@{digest}",
                                None, diff_ids if isinstance(diff_ids, list) else [], cfg.image.compression,
                                cfg.image.jobs, None, wait if missing else None)
        except BaseException:
            # The first failure is what the user sees: a download's error rather than the merge's
            # "layer is missing" that followed from it.
            pool.shutdown(wait=True, cancel_futures=True)
            for f in futures.values():
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception() from None  # type: ignore[misc]
            raise
    res.layers_fetched = len(fetched)
    res.bytes_fetched = sum(d.size for d in missing if d.digest in fetched)
    return meta


def _fetch_one(store: ImageStore, reg: Registry, d: oci.Descriptor, i: int, advance: Progress | None, what: str,
               fetched: set[str]) -> None:
    with store.lock(f"blob-{d.digest[7:]}"):
        if store.has_blob(d.digest):
            return
        fd, tmp = tempfile.mkstemp(dir=store.root / "tmp", prefix=f"blob-{d.digest[7:19]}-")
        try:
            with os.fdopen(fd, "wb") as f:
                reg.fetch_blob(d, f, f"{what}: layer {i + 1}", advance)
            store.put_blob_file(Path(tmp), d.digest)
            fetched.add(d.digest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _download(store: ImageStore, reg: Registry, descs: list[oci.Descriptor], jobs: int,
              advance: Progress | None, what: str) -> set[str]:
    """Fetch blobs in parallel, all before returning; each verified one is renamed into blobs/ at once (a later
    pull keeps it). The first failure cancels the rest and is raised."""
    if not descs:
        return set()
    fetched: set[str] = set()
    with ThreadPoolExecutor(max_workers=min(jobs, len(descs)), thread_name_prefix="pull") as pool:
        futures = [pool.submit(_fetch_one, store, reg, d, i, advance, what, fetched) for i, d in enumerate(descs)]
        done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                raise f.exception()  # type: ignore[misc]
    return fetched


@contextlib.contextmanager
def _progress(description: str, quiet: bool, total: int | None) -> Iterator[Progress | None]:
    if quiet:
        yield None
        return
    from nagaya.cli.common import byte_progress  # rich: only when a bar is shown

    with byte_progress(description, True, total) as advance:
        yield advance
