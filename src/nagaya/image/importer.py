"""`nagaya image import`: rootfs tarballs and directories, OCI layouts and OCI archives -> the cache."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nagaya.errors import ImageError, UsageError
from nagaya.image import oci, squash
from nagaya.image.layers import LayerMerger, normalize, sniff_compression, tar_directory
from nagaya.image.reference import Reference
from nagaya.image.store import ImageMeta, ImageStore, LayerInfo

Progress = Callable[[int], None]
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHUNK = 1 << 20


@dataclass
class Layer:
    """A layer blob sitting in a work directory, verified, ready to be merged and stored."""

    path: Path
    desc: oci.Descriptor

    @property
    def compression(self) -> str:
        return oci.LAYER_TYPES.get(self.desc.media_type, "tar")


def detect_kind(src: Path) -> str:
    if src.is_dir():
        if (src / "oci-layout").is_file() and (src / "index.json").is_file():
            return "oci-layout"
        return "rootfs-dir"
    if not src.is_file():
        raise UsageError(f"{src}: no such file or directory")
    names = _tar_names(src, limit=64)
    if "oci-layout" in names and "index.json" in names:
        return "oci-archive"
    return "rootfs-tar"


def _tar_names(path: Path, limit: int) -> set[str]:
    names: set[str] = set()
    try:
        with _open_any(path) as raw, tarfile.open(fileobj=raw, mode="r|") as t:
            for i, m in enumerate(t):
                names.add(m.name.lstrip("./") or ".")
                if i >= limit:
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ImageError(f"{path} is not a tar archive or image directory ({e})") from None
    return names


@contextlib.contextmanager
def _open_any(path: Path) -> Iterator[IO[bytes]]:
    """Open a possibly compressed tar file (gzip, zstd, xz, bzip2) as an uncompressed stream."""
    f = open(path, "rb")
    try:
        magic = f.read(6)
        f.seek(0)
        if magic[:2] == b"\x1f\x8b":
            yield gzip.GzipFile(fileobj=f)  # type: ignore[misc]
        elif magic[:4] == b"\x28\xb5\x2f\xfd":
            import zstandard

            yield zstandard.ZstdDecompressor().stream_reader(f)  # type: ignore[misc]
        elif magic == b"\xfd7zXZ\x00":
            import lzma

            yield lzma.LZMAFile(f)  # type: ignore[misc]
        elif magic[:3] == b"BZh":
            import bz2

            yield bz2.BZ2File(f)  # type: ignore[misc]
        else:
            yield f
    finally:
        f.close()


def _copy_hashing(src: IO[bytes], dst: IO[bytes], progress: Progress | None = None,
                  limit: int | None = None) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
        if limit is not None and n > limit:
            raise ImageError("blob is larger than its descriptor says")
        if progress:
            progress(len(chunk))
    return "sha256:" + h.hexdigest(), n


class Importer:
    def __init__(self, store: ImageStore, compression: str = "zstd", jobs: int = 0,
                 progress: Progress | None = None) -> None:
        self.store = store
        self.compression = compression
        self.jobs = jobs
        self.progress = progress

    def run(self, src: Path, ref: Reference) -> ImageMeta:
        src = src.expanduser()
        kind = detect_kind(src)
        with self.store.tmpdir("import-") as work:
            if kind == "oci-layout":
                return self._from_layout(src, ref, work, str(src))
            if kind == "oci-archive":
                layout = work / "layout"
                _extract_layout(src, layout)
                return self._from_layout(layout, ref, work, str(src))
            if kind == "rootfs-dir":
                blob = work / "layer"
                with open(blob, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="",
                                                          compresslevel=1) as gz:
                    tar_directory(src, gz)  # type: ignore[arg-type]
                layer = self._layer_from_file(blob, oci.MT_OCI_LAYER_GZIP)
                return self._from_rootfs(layer, ref, work, str(src))
            return self._from_rootfs(self._rootfs_blob(src, work), ref, work, str(src))

    # -- sources ---------------------------------------------------------------------------------
    def _rootfs_blob(self, src: Path, work: Path) -> Layer:
        comp = sniff_compression(src)
        blob = work / "layer"
        if comp in ("gzip", "zstd", "tar"):
            with open(src, "rb") as fin, open(blob, "wb") as fout:
                _copy_hashing(fin, fout)
            mt = {"gzip": oci.MT_OCI_LAYER_GZIP, "zstd": oci.MT_OCI_LAYER_ZSTD}.get(comp, oci.MT_OCI_LAYER)
        else:                                   # xz, bzip2: not OCI layer encodings; store plain
            with _open_any(src) as fin, open(blob, "wb") as fout:
                _copy_hashing(fin, fout)
            mt = oci.MT_OCI_LAYER
        return self._layer_from_file(blob, mt)

    @staticmethod
    def _layer_from_file(path: Path, media_type: str) -> Layer:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return Layer(path, oci.Descriptor(media_type, "sha256:" + h.hexdigest(), path.stat().st_size))

    def _from_rootfs(self, layer: Layer, ref: Reference, work: Path, source: str) -> ImageMeta:
        diff_id = self._known_diff_id(layer.desc.digest)
        merger = None
        sqfs = work / "image.sqfs"
        if not diff_id:
            merger = self._convert([layer], sqfs)
            diff_id = merger.diff_ids[0]
        config = {
            "architecture": oci.oci_arch(),
            "os": "linux",
            "config": {"Env": [DEFAULT_PATH]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "nagaya image import", "comment": "rootfs"}],
        }
        config_bytes = oci.canonical_json(config)
        config_desc = oci.Descriptor(oci.MT_OCI_CONFIG, oci.sha256_digest(config_bytes), len(config_bytes))
        manifest = oci.Manifest(config_desc, (layer.desc,))
        manifest_bytes = oci.canonical_json(manifest.to_json())
        return self._finish(manifest_bytes, manifest, config_bytes, [layer], ref, work, source,
                            sqfs if merger else None, [diff_id])

    def _from_layout(self, layout: Path, ref: Reference, work: Path, source: str) -> ImageMeta:
        def blob(d: oci.Descriptor, what: str, dest: Path | None = None) -> bytes | Path:
            p = layout / "blobs" / "sha256" / d.digest[7:]
            if not p.is_file():
                raise ImageError(f"{source}: {what} blob {d.digest[:19]} is missing")
            if dest is None:
                data = p.read_bytes()
                if len(data) != d.size or oci.sha256_digest(data) != d.digest:
                    raise ImageError(f"{source}: {what} blob {d.digest[:19]} does not match its digest")
                return data
            with open(p, "rb") as fin, open(dest, "wb") as fout:
                digest, n = _copy_hashing(fin, fout, limit=d.size)
            if digest != d.digest or n != d.size:
                raise ImageError(f"{source}: {what} blob {d.digest[:19]} does not match its digest")
            return dest

        index = oci.Index.parse((layout / "index.json").read_bytes(), f"{source}: index.json")
        desc = index.select(ref.tag if ref.tag and len(index.manifests) > 1 else None, oci.oci_arch())
        for _depth in range(4):                 # nested indexes, bounded
            if desc.media_type not in oci.INDEX_TYPES:
                break
            desc = oci.Index.parse(blob(desc, "index"), f"{source}: index").select(None, oci.oci_arch())  # type: ignore[arg-type]
        manifest_bytes = blob(desc, "manifest")
        assert isinstance(manifest_bytes, bytes)
        manifest = oci.Manifest.parse(manifest_bytes, f"{source}: manifest")
        config_bytes = blob(manifest.config, "config")
        assert isinstance(config_bytes, bytes)
        cfg = oci.load_json(config_bytes, f"{source}: image config")
        if cfg.get("architecture") not in (None, oci.oci_arch()):
            raise ImageError(f"{source}: image is for {cfg.get('os')}/{cfg.get('architecture')}, "
                             f"this machine is linux/{oci.oci_arch()}")
        layers = [Layer(work / f"layer{i}", d) for i, d in enumerate(manifest.layers)]
        diff_ids = cfg.get("rootfs", {}).get("diff_ids", [])
        # Copy (and verify) the layers top first, on threads, while the conversion reads the copies made.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(4, len(layers) or 1), thread_name_prefix="import") as pool:
            futures = {i: pool.submit(blob, x.desc, f"layer {i + 1}", x.path)
                       for i, x in reversed(list(enumerate(layers)))}

            def wait(i: int, stop: Any) -> None:
                from concurrent.futures import TimeoutError as FutureTimeout

                while True:
                    try:
                        futures[i].result(timeout=0.2)
                        return
                    except FutureTimeout:
                        if stop.is_set():
                            raise ImageError("import cancelled") from None
            try:
                meta = self._finish(manifest_bytes, manifest, config_bytes, layers, ref, work, source, None,
                                    diff_ids if isinstance(diff_ids, list) else [], wait)
                for f in futures.values():      # an image already cached: its layers are still checked
                    f.result()
                return meta
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                for f in futures.values():      # a layer's own error first (the merge's follows from it)
                    if f.done() and not f.cancelled() and f.exception() is not None:
                        raise f.exception() from None  # type: ignore[misc]
                raise

    # -- conversion ------------------------------------------------------------------------------
    def _known_diff_id(self, layer_digest: str) -> str:
        """The diff_id of a layer some cached image already has (saves a pass over the layer)."""
        images = self.store.root / "images"
        if not images.is_dir():
            return ""
        for p in images.glob("*.json"):
            with contextlib.suppress(Exception):
                meta = ImageMeta.from_json(json.loads(p.read_bytes()))
                for layer in meta.layers:
                    if layer.digest == layer_digest and layer.diff_id:
                        return layer.diff_id
        return ""

    def _convert(self, layers: list[Layer], out: Path) -> LayerMerger:
        return convert(layers, out, self.compression, self.jobs, self.progress)

    def _finish(self, manifest_bytes: bytes, manifest: oci.Manifest, config_bytes: bytes, layers: list[Layer],
                ref: Reference, work: Path, source: str, sqfs: Path | None, diff_ids: list[str],
                wait: Callable[[int, Any], None] | None = None) -> ImageMeta:
        return finish_image(self.store, manifest_bytes, manifest, config_bytes, layers, ref, work, source, sqfs,
                            diff_ids, self.compression, self.jobs, self.progress, wait)


def convert(layers: list[Layer], out: Path, compression: str, jobs: int, progress: Progress | None,
            wait: Callable[[int, Any], None] | None = None) -> LayerMerger:
    merger = LayerMerger([(x.path, x.compression) for x in layers], progress, wait)
    squash.build(merger.run, out, compression, jobs)
    return merger


def finish_image(store: ImageStore, manifest_bytes: bytes, manifest: oci.Manifest, config_bytes: bytes,
                 layers: list[Layer], ref: Reference | None, work: Path, source: str, sqfs: Path | None,
                 diff_ids: list[str], compression: str = "zstd", jobs: int = 0,
                 progress: Progress | None = None, wait: Callable[[int, Any], None] | None = None) -> ImageMeta:
    """Turn verified layers into the image's squashfs (once per manifest digest), store its blobs, commit
    its metadata and tag it. Shared by import and pull. Layers may already sit in the blob store, or (a
    pull, with `wait`) arrive there while the conversion runs."""
    digest = oci.sha256_digest(manifest_bytes)
    with store.lock(f"image-{digest[7:]}"):
        meta = store.meta(digest)
        if meta is None or not store.squashfs_path(digest).exists():
            if sqfs is None:
                sqfs = work / "image.sqfs"
                merger = convert(layers, sqfs, compression, jobs, progress, wait)
                if diff_ids and merger.diff_ids != diff_ids:
                    raise ImageError(f"{source}: layer contents do not match the config's diff_ids")
                diff_ids = merger.diff_ids
            cfg = json.loads(config_bytes)
            for layer in layers:
                store.put_blob_file(layer.path, layer.desc.digest)
            store.put_blob_bytes(config_bytes, manifest.config.digest)
            store.put_blob_bytes(manifest_bytes, digest)
            meta = ImageMeta(
                digest=digest, config_digest=manifest.config.digest, config=cfg,
                layers=[LayerInfo(x.desc.digest, x.desc.size, x.desc.media_type,
                                  diff_ids[i] if i < len(diff_ids) else "") for i, x in enumerate(layers)],
                created=str(cfg.get("created") or ""), source=source,
                manifest_media_type=manifest.media_type)
            store.commit_image(meta, sqfs)
        if ref is not None:
            store.tag(ref, digest)
    return meta


def _extract_layout(archive: Path, dest: Path) -> None:
    """Unpack an OCI archive's layout: regular files and directories only, every name checked."""
    dest.mkdir()
    try:
        with _open_any(archive) as raw, tarfile.open(fileobj=raw, mode="r|") as t:
            for m in t:
                name = normalize(m.name, str(archive))
                if not name:
                    continue
                target = dest / name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif m.isreg():
                    if not (name in ("oci-layout", "index.json") or name.startswith("blobs/")):
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = t.extractfile(m)
                    assert src is not None
                    with open(target, "wb") as f:
                        shutil.copyfileobj(src, f, CHUNK)
                else:
                    raise ImageError(f"{archive}: unexpected entry {m.name!r} in an OCI archive")
    except (tarfile.TarError, EOFError) as e:
        raise ImageError(f"{archive} is not a valid OCI archive ({e})") from None


def write_oci_layout(store: ImageStore, meta: ImageMeta, dest: Path, tag: str | None = None) -> None:
    """Write an image's blobs as an OCI image layout (used by export and push)."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    digests = [meta.digest, meta.config_digest, *[x.digest for x in meta.layers]]
    for d in digests:
        src = store.blob_path(d)
        if not src.exists():
            raise ImageError(f"blob {d[:19]} of image {meta.short} is no longer in the cache")
        target = blobs / d[7:]
        if not target.exists():
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    ann = {"org.opencontainers.image.ref.name": tag} if tag else {}
    size = store.blob_path(meta.digest).stat().st_size
    index = {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": [
        oci.Descriptor(meta.manifest_media_type, meta.digest, size, annotations=ann).to_json()]}
    (dest / "index.json").write_bytes(oci.canonical_json(index))




