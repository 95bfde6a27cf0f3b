"""Where an image's bytes go, computed from its layers: `nagaya image inspect --size` and the portal's picture.

Layers are read bottom first, as a container engine applies them. A file written by a lower layer and then
replaced (same path above) or deleted (a whiteout `.wh.NAME`, or an opaque directory `.wh..wh..opq`) is
not visible in the container, yet its bytes are still shipped with every pull: those are "hidden".
Identical contents (sha256) in more than one layer are "duplicates". Package managers' caches left in
the final tree (apt lists and archives, pip, __pycache__, conda pkgs, npm, ...) are "caches". A rebuild
that avoids all three saves `rebuild_saves` bytes (uncompressed sizes, each byte counted once).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any

from nagaya.errors import ImageError
from nagaya.image.layers import WH_OPAQUE, WH_PREFIX, normalize

TOP = 15
CACHES: list[tuple[str, re.Pattern[str]]] = [(k, re.compile(p)) for k, p in (
    ("apt lists", r"^var/lib/apt/lists/(?!lock$|partial$)."),
    ("apt archives", r"^var/cache/apt/(archives/.*\.deb$|.*\.bin$)"),
    ("pip cache", r"(^|/)\.cache/pip/"),
    ("__pycache__", r"(^|/)__pycache__/"),
    ("conda pkgs", r"(^|/)(ana|mini|micro)?(conda|forge|mamba)[^/]*/pkgs/"),
    ("npm cache", r"(^|/)\.npm/"),
    ("yarn cache", r"(^|/)\.cache/yarn/|^usr/local/share/\.cache/yarn/"),
    ("apk cache", r"^var/cache/apk/."),
    ("dnf/yum cache", r"^var/cache/(dnf|yum)/."),
)]
LayerOpener = Callable[[], AbstractContextManager[IO[bytes]]]


@dataclass
class _File:
    path: str
    size: int
    layer: int
    sha: str


@dataclass
class _Acc:
    visible: dict[str, _File] = field(default_factory=dict)      # path -> the file the container sees
    hidden: list[tuple[_File, int, str]] = field(default_factory=list)   # (file, layer that hid it, how)
    shipped: list[_File] = field(default_factory=list)
    dirs: set[str] = field(default_factory=set)          # directories seen so far


def cache_kind(path: str) -> str:
    for kind, rx in CACHES:
        if rx.search(path):
            return kind
    return ""


def _hide(acc: _Acc, prefix: str, layer: int, how: str, below_only: bool = True) -> None:
    """Hide `prefix` and everything under it that lower layers wrote."""
    pre = prefix + "/"
    for p in [p for p in acc.visible if p == prefix or p.startswith(pre)]:
        f = acc.visible[p]
        if below_only and f.layer >= layer:
            continue
        acc.hidden.append((acc.visible.pop(p), layer, how))


def _read_layer(acc: _Acc, idx: int, stream: IO[bytes], what: str) -> tuple[int, int]:
    files = nbytes = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tin:
            for m in tin:
                name = normalize(m.name, what)
                if not name:
                    continue
                base = name.rsplit("/", 1)[-1]
                parent = name.rsplit("/", 1)[0] if "/" in name else ""
                if base == WH_OPAQUE:
                    if parent:
                        _hide(acc, parent, idx, "deleted")
                    continue
                if base.startswith(WH_PREFIX):
                    _hide(acc, (parent + "/" if parent else "") + base[len(WH_PREFIX):], idx, "deleted")
                    continue
                old = acc.visible.get(name)
                if old is not None:
                    acc.hidden.append((acc.visible.pop(name), idx, "replaced"))
                if m.isdir():
                    acc.dirs.add(name)
                elif name in acc.dirs:
                    acc.dirs.discard(name)
                    _hide(acc, name, idx, "replaced")          # a file over a lower directory hides its content
                if not m.isreg():
                    continue
                h = hashlib.sha256()
                src = tin.extractfile(m)
                assert src is not None
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                d = parent
                while d and d not in acc.dirs:
                    acc.dirs.add(d)
                    d = d.rsplit("/", 1)[0] if "/" in d else ""
                f = _File(name, m.size, idx, h.hexdigest())
                acc.visible[name] = f
                acc.shipped.append(f)
                files += 1
                nbytes += m.size
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{what} is not a valid tar archive ({e})") from None
    return files, nbytes


def analyze(layers: list[tuple[str, int, LayerOpener]], top: int = TOP) -> dict[str, Any]:
    """`layers`: (digest, compressed size, opener of its uncompressed tar stream), bottom first."""
    acc = _Acc()
    per_layer = []
    for idx, (digest, size, opener) in enumerate(layers):
        with opener() as stream:
            files, nbytes = _read_layer(acc, idx, stream, f"layer {idx + 1} of {len(layers)}")
        per_layer.append({"index": idx + 1, "digest": digest, "size": size, "files": files, "bytes": nbytes})

    def row(f: _File) -> dict[str, Any]:
        return {"path": "/" + f.path, "size": f.size, "layer": f.layer + 1}

    visible = list(acc.visible.values())
    dirs: dict[str, list[int]] = {}
    for f in visible:
        d = f.path
        while "/" in d:
            d = d.rsplit("/", 1)[0]
            e = dirs.setdefault(d, [0, 0])
            e[0] += f.size
            e[1] += 1
    hidden_bytes = sum(f.size for f, _by, _how in acc.hidden)
    # Duplicates: the same contents in more than one layer. Copies that are hidden are counted there;
    # visible copies beyond the first are what a rebuild (one layer writing it once) saves here.
    groups: dict[str, list[_File]] = {}
    for f in acc.shipped:
        if f.size:
            groups.setdefault(f.sha, []).append(f)
    visible_ids = {id(f) for f in visible}
    dups = []
    for sha, fs in groups.items():
        if len({f.layer for f in fs}) < 2:
            continue
        nvis = sum(1 for f in fs if id(f) in visible_ids)
        dups.append({"digest": "sha256:" + sha, "size": fs[0].size, "copies": len(fs),
                     "saves": max(0, nvis - 1) * fs[0].size, "shipped": (len(fs) - 1) * fs[0].size,
                     "paths": [row(f) for f in fs[:8]]})
    dups.sort(key=lambda d: d["shipped"], reverse=True)
    caches: dict[str, dict[str, Any]] = {}
    for f in visible:
        k = cache_kind(f.path)
        if k:
            c = caches.setdefault(k, {"kind": k, "bytes": 0, "files": 0, "largest": []})
            c["bytes"] += f.size
            c["files"] += 1
            c["largest"].append(f)
    cache_bytes = sum(c["bytes"] for c in caches.values())
    for c in caches.values():
        c["largest"] = [row(f) for f in sorted(c["largest"], key=lambda f: f.size, reverse=True)[:5]]
    dup_bytes = sum(d["saves"] for d in dups)
    # a duplicated cache file's extra copies are already counted with the caches
    dup_in_cache = sum(d["saves"] for d in dups if all(cache_kind(p["path"][1:]) for p in d["paths"]))
    return {
        "layers": per_layer,
        "shipped_bytes": sum(x["bytes"] for x in per_layer),
        "visible_bytes": sum(f.size for f in visible),
        "visible_files": len(visible),
        "largest_files": [row(f) for f in sorted(visible, key=lambda f: f.size, reverse=True)[:top]],
        "largest_dirs": [{"path": "/" + d, "size": s, "files": n}
                         for d, (s, n) in sorted(dirs.items(), key=lambda kv: kv[1][0], reverse=True)[:top]],
        "hidden": {"bytes": hidden_bytes, "files": len(acc.hidden),
                   "largest": [{**row(f), "by_layer": by + 1, "how": how}
                               for f, by, how in sorted(acc.hidden, key=lambda t: t[0].size, reverse=True)[:top]]},
        "duplicates": {"bytes": dup_bytes, "shipped_bytes": sum(d["shipped"] for d in dups),
                       "groups": len(dups), "largest": dups[:top]},
        "caches": {"bytes": cache_bytes, "kinds": sorted(caches.values(), key=lambda c: c["bytes"], reverse=True)},
        "rebuild_saves": hidden_bytes + cache_bytes + dup_bytes - dup_in_cache,
    }


# -- layer sources ---------------------------------------------------------------------------------------

class _IterReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (an HTTP response body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self.buf:
            try:
                self.buf = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def uncompressed(raw: IO[bytes]) -> IO[bytes]:
    """A layer's bytes (gzip, zstd or plain tar, sniffed) as an uncompressed stream."""
    buf = io.BufferedReader(raw, 1 << 20) if not isinstance(raw, io.BufferedReader) else raw  # type: ignore[arg-type]
    magic = buf.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        import gzip

        return gzip.GzipFile(fileobj=buf, mode="rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buf)  # type: ignore[return-value]
    return buf


def from_chunks(chunks: Iterator[bytes]) -> IO[bytes]:
    return uncompressed(_IterReader(chunks))  # type: ignore[arg-type]


def for_cached_image(store: Any, meta: Any, top: int = TOP) -> dict[str, Any]:
    """The report for an image in the local cache (its layer blobs must be there)."""
    import contextlib

    missing = [x.digest for x in meta.layers if not store.has_blob(x.digest)]
    if missing or not meta.layers:
        raise ImageError(f"image {meta.short}: its layers are not in the cache (an image imported from a single "
                         "file has only its squashfs); pull or import it from an OCI source to see its sizes")

    def opener(digest: str) -> LayerOpener:
        @contextlib.contextmanager
        def op() -> Iterator[IO[bytes]]:
            with open(store.blob_path(digest), "rb") as f:
                yield uncompressed(f)  # type: ignore[arg-type]
        return op

    rep = analyze([(x.digest, x.size, opener(x.digest)) for x in meta.layers], top)
    return {"digest": meta.digest, **rep}
