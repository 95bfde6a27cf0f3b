"""Flatten OCI layers into one tar stream, applying whiteouts, and refusing hostile entries.

The layers are read top (newest) to bottom, so that each path is decided once: an upper entry hides
the same path below it, a whiteout `.wh.NAME` hides NAME below it, and `.wh..wh..opq` hides a
directory's lower contents. Nothing is ever extracted on the host: the merged stream goes straight
into tar2sqfs. Hostile entries are errors, not silent skips:
  - a path with a `..` component, or one that would be written through a symlink;
  - a hard link whose target escapes, passes through a symlink, or is not a regular file of the image;
  - a device node outside /dev (those under /dev are dropped: a container's /dev is always made anew).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from nagaya.errors import ImageError

WH_PREFIX = ".wh."
CHUNK = 1 << 20
WH_OPAQUE = ".wh..wh..opq"


class _Prefetched(io.RawIOBase):
    """A layer's uncompressed bytes, decompressed and hashed ahead on a thread of its own (zlib, zstd and
    sha256 release the GIL), so that the merge thread only parses tar headers and copies: with N layers
    and N cores, every layer decompresses at once while the merge works through them top to bottom.
    At most `ahead` chunks wait in memory per layer; `close()` stops the thread."""

    def __init__(self, path: Path, compression: str, ahead: int = 8,
                 wait: Callable[[threading.Event], None] | None = None) -> None:
        import queue

        self.sha = hashlib.sha256()
        self.count = 0
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(ahead)
        self._buf = memoryview(b"")
        self._done = False
        self._stop = threading.Event()
        self._wait = wait
        self._thread = threading.Thread(target=self._fill, args=(path, compression), daemon=True,
                                        name="layer-prefetch")
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, path: Path, compression: str) -> None:
        try:
            if self._wait is not None:      # a pull: the layer may still be downloading
                self._wait(self._stop)
            with decompressed(path, compression) as raw:
                while not self._stop.is_set():
                    chunk = raw.read(CHUNK)
                    if not chunk:
                        break
                    self.sha.update(chunk)
                    self.count += len(chunk)
                    if not self._put(chunk):
                        return
            self._put(None)
        except BaseException as e:          # handed to the reader, raised in the merge thread
            self._put(e)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            if self._done:
                return 0
            item = self._q.get()
            if item is None:
                self._done = True
                return 0
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._buf = memoryview(item)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes (and counts) what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.count += n
        return n


def decompressed(path: Path, compression: str) -> BinaryIO:
    """Open a layer blob as an uncompressed stream."""
    f = open(path, "rb")
    magic = f.read(4)
    f.seek(0)
    if compression == "zstd" or magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f, closefd=True)  # type: ignore[return-value]
    if compression == "gzip" or magic[:2] == b"\x1f\x8b":
        try:
            from isal import igzip as gzip  # ISA-L: ~3x zlib's inflate speed, same results
        except ImportError:
            import gzip  # type: ignore[no-redef]

        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def sniff_compression(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "tar"


def normalize(name: str, what: str) -> str:
    """A member name as a clean relative path ('' for the root), or ImageError if it escapes."""
    parts = []
    for p in name.replace("\\", "/").split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise ImageError(f"hostile image: {what}: entry {name!r} points outside the image root")
        parts.append(p)
    return "/".join(parts)


def _ancestors(path: str) -> Iterator[str]:
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


@dataclass
class MergeStats:
    entries: int = 0
    bytes: int = 0
    dropped_devices: int = 0


class LayerMerger:
    """Merge layers (given bottom first) into `out`, a writable binary stream receiving a tar."""

    def __init__(self, layers: list[tuple[Path, str]], progress: Callable[[int], None] | None = None,
                 wait: Callable[[int, threading.Event], None] | None = None) -> None:
        """`wait(i, stop)`, if given, returns once layer i's file is complete (raising if it never will be;
        giving up when `stop` is set): a pull converts layers while lower ones still download."""
        self.layers = layers
        self.progress = progress
        self.wait = wait
        self.stats = MergeStats()
        self.diff_ids: list[str] = [""] * len(layers)

    def run(self, out: IO[bytes]) -> MergeStats:
        import os

        # Layers are read top first; the next `ahead` ones below decompress meanwhile (one core each).
        ahead = max(1, (os.cpu_count() or 1) - 1)
        started: dict[int, _Prefetched] = {}

        def start_down_to(lowest: int) -> None:
            for i in range(len(self.layers) - 1, max(lowest, 0) - 1, -1):
                if i not in started:
                    started[i] = _Prefetched(*self.layers[i], wait=self._waiter(i))

        try:
            self._merge(out, started, start_down_to, ahead)
        finally:
            for r in started.values():
                r.close()
        return self.stats

    def _waiter(self, i: int) -> Callable[[threading.Event], None] | None:
        wait = self.wait
        return None if wait is None else (lambda stop: wait(i, stop))

    def _merge(self, out: IO[bytes], started: dict[int, _Prefetched], start_down_to: Callable[[int], None],
               ahead: int) -> None:
        emitted: dict[str, str] = {}     # path -> 'd' dir, 'l' symlink, 'f' anything else
        hidden: set[str] = set()         # whited-out paths (for layers below)
        opaque: set[str] = set()         # dirs whose lower content is hidden
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tout:
            for idx in range(len(self.layers) - 1, -1, -1):
                what = f"layer {idx + 1} of {len(self.layers)}"
                new_hidden: set[str] = set()
                new_opaque: set[str] = set()
                start_down_to(idx - ahead)
                with started[idx] as hr:
                    stream = io.BufferedReader(hr, 1 << 20)
                    try:
                        tin = tarfile.open(fileobj=stream, mode="r|", errorlevel=2)
                        for m in tin:
                            self._entry(m, tin, tout, what, emitted, hidden, opaque, new_hidden, new_opaque)
                        # Drain the end-of-archive padding so the diff_id covers the whole tar.
                        while stream.read(1 << 20):
                            pass
                    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
                        if isinstance(e, ImageError):
                            raise
                        raise ImageError(f"{what} is not a valid tar archive ({e})") from None
                    self.diff_ids[idx] = "sha256:" + hr.sha.hexdigest()
                hidden |= new_hidden
                opaque |= new_opaque

    def _entry(self, m: tarfile.TarInfo, tin: tarfile.TarFile, tout: tarfile.TarFile, what: str,
               emitted: dict[str, str], hidden: set[str], opaque: set[str],
               new_hidden: set[str], new_opaque: set[str]) -> None:
        name = normalize(m.name, what)
        if not name:
            return                                          # the root itself
        base = posixpath.basename(name)
        parent = posixpath.dirname(name)
        if base == WH_OPAQUE:
            new_opaque.add(parent)
            return
        if base.startswith(WH_PREFIX):
            target = posixpath.join(parent, base[len(WH_PREFIX):])
            if not target or target.endswith(".."):
                raise ImageError(f"hostile image: {what}: malformed whiteout {m.name!r}")
            new_hidden.add(target)
            return
        # Decide whether an upper layer already decided this path.
        if name in emitted or name in hidden:
            return
        for a in _ancestors(name):
            kind = emitted.get(a)
            if a in hidden or a in opaque:
                return
            if kind == "l":
                raise ImageError(f"hostile image: {what}: entry {m.name!r} would be written through "
                                 f"the symlink {a!r}")
            if kind == "f":
                return                                      # replaced by a non-directory above
        if m.isdev():
            if name.startswith("dev/"):
                self.stats.dropped_devices += 1
                return
            raise ImageError(f"hostile image: {what}: device node {m.name!r} outside /dev")
        orig, m = m, _copy_info(m, name)
        if m.islnk():
            target = normalize(m.linkname, what)
            kind = emitted.get(target)
            for a in _ancestors(target):
                if emitted.get(a) == "l":
                    raise ImageError(f"hostile image: {what}: hard link {m.name!r} passes through a symlink")
            if kind is None:
                raise ImageError(f"hostile image: {what}: hard link {m.name!r} points to {m.linkname!r}, "
                                 "which is not a file of the image")
            if kind != "f":
                raise ImageError(f"hostile image: {what}: hard link {m.name!r} to a non-file")
            m.linkname = target
            tout.addfile(m)
        elif m.isreg():
            src = tin.extractfile(orig)
            tout.addfile(m, src)
            self.stats.bytes += m.size
            if self.progress:
                self.progress(m.size)
        else:
            tout.addfile(m)
        emitted[name] = "d" if m.isdir() else ("l" if m.issym() else "f")
        self.stats.entries += 1


def _copy_info(m: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = m.type
    t.size = m.size if m.isreg() else 0
    t.mode = m.mode & 0o7777
    t.uid, t.gid = m.uid, m.gid
    t.uname, t.gname = m.uname, m.gname
    t.mtime = int(m.mtime)
    t.linkname = m.linkname
    t.devmajor, t.devminor = m.devmajor, m.devminor
    xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.user.")}
    if xattrs:
        t.pax_headers = xattrs
    if m.type == tarfile.AREGTYPE:
        t.type = tarfile.REGTYPE
    return t


def tar_directory(src: Path, out: IO[bytes]) -> None:
    """A deterministic tar of a rootfs directory (sorted names, no atime), so equal trees hash equal."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tout:
        def add(dirpath: Path, rel: str) -> None:
            for entry in sorted(dirpath.iterdir(), key=lambda p: p.name):
                arc = f"{rel}{entry.name}"
                try:
                    info = tout.gettarinfo(str(entry), arcname=arc)
                except OSError as e:
                    raise ImageError(f"cannot read {entry}: {e.strerror}") from None
                if info is None:
                    continue                                # sockets
                info.uname = info.gname = ""
                info.mtime = int(info.mtime)
                if info.isreg():
                    try:
                        with open(entry, "rb") as f:
                            tout.addfile(info, f)
                    except OSError as e:
                        raise ImageError(f"cannot read {entry}: {e.strerror}") from None
                else:
                    tout.addfile(info)
                if info.isdir() and not entry.is_symlink():
                    add(entry, arc + "/")

        add(src, "")
