"""The verified block cache of one lazily read squashfs: a sparse `data` file of the squashfs's size and a
`have` map (one byte per chunk). A chunk is fetched with one HTTP Range request, checked against its sha256
from the chunk list, written into `data`, and only then marked in `have`; a chunk read back from the cache is
checked again once per process, so a torn write (crash between the two) is refetched, never served."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from pathlib import Path

import httpx

from nagaya.errors import ImageError, NagayaError, RegistryError
from nagaya.image.lazy.artifact import LazyIndex
from nagaya.image.registry import Registry


class RangesUnsupported(RegistryError):
    pass


def fetch_range(reg: Registry, digest: str, start: int, length: int) -> bytes:
    """Bytes [start, start+length) of a blob, with the user's token; redirects to storage are followed
    without it (as full pulls do)."""
    from urllib.parse import urljoin

    url = f"/v2/{reg.repository}/blobs/{digest}"
    hdr = {"Range": f"bytes={start}-{start + length - 1}"}
    for _hop in range(5):
        try:
            r = reg._send("GET", url, headers=hdr) if not url.startswith("http") else \
                reg.http.send(reg.http.build_request("GET", url, headers=hdr))
        except httpx.TransportError as e:
            raise RegistryError(f"{reg.where}: read of {digest[:19]} failed ({type(e).__name__})") from None
        if r.status_code in (301, 302, 303, 307, 308) and "location" in r.headers:
            url = urljoin(str(r.url), r.headers["location"])
            continue
        if r.status_code == 200:
            raise RangesUnsupported(f"{reg.registry} does not serve byte ranges")
        if r.status_code != 206:
            raise reg._fail(r, f"{reg.where}@{digest[:19]}")
        data = r.content
        if len(data) != length:
            raise RegistryError(f"{reg.where}@{digest[:19]}: short range ({len(data)} of {length} bytes)")
        return data
    raise RegistryError(f"{reg.where}: too many redirects")


class ChunkCache:
    def __init__(self, directory: Path, index: LazyIndex, reg: Registry | None) -> None:
        self.dir = directory
        self.index = index
        self.reg = reg
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_fd = os.open(directory / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if os.fstat(self.data_fd).st_size != index.size:
            os.ftruncate(self.data_fd, index.size)
        self.have_fd = os.open(directory / "have", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if os.fstat(self.have_fd).st_size != index.count:
            os.ftruncate(self.have_fd, index.count)
        self.verified: set[int] = set()
        self.locks = [threading.Lock() for _ in range(64)]
        self.fetched_bytes = 0
        self.order: list[int] = []          # first-touch order this process: the access profile
        self.order_lock = threading.Lock()

    def close(self) -> None:
        os.close(self.data_fd)
        os.close(self.have_fd)

    def cached(self, i: int) -> bool:
        return os.pread(self.have_fd, 1, i) == b"\x01"

    def cached_count(self) -> int:
        return os.pread(self.have_fd, self.index.count, 0).count(b"\x01")

    def _span(self, i: int) -> tuple[int, int]:
        start = i * self.index.chunk
        return start, min(self.index.chunk, self.index.size - start)

    def get(self, i: int) -> bytes:
        """Chunk i, verified. Raises NagayaError when it can be neither read back nor fetched."""
        start, length = self._span(i)
        with self.locks[i % len(self.locks)]:
            if i not in self.verified:
                with self.order_lock:
                    self.order.append(i)
            if self.cached(i):
                data = os.pread(self.data_fd, length, start)
                if i in self.verified or hashlib.sha256(data).hexdigest() == self.index.sums[i]:
                    self.verified.add(i)
                    return data
            if self.reg is None:
                raise RegistryError(f"chunk {i} is not cached and no registry is reachable")
            # One fetch per chunk for every process sharing this cache (the nodes of a job, when it is on
            # the shared file system): a record lock on the chunk's byte of `have`. The kernel (or NFS's
            # lock manager) drops it when its holder dies, and the mark is set only after the bytes are in.
            fcntl.lockf(self.have_fd, fcntl.LOCK_EX, 1, i)
            try:
                if self.cached(i):
                    data = os.pread(self.data_fd, length, start)
                    if hashlib.sha256(data).hexdigest() == self.index.sums[i]:
                        self.verified.add(i)
                        return data
                data = fetch_range(self.reg, self.index.squashfs_digest, start, length)
                if hashlib.sha256(data).hexdigest() != self.index.sums[i]:
                    raise ImageError(f"{self.index.image_digest[:19]}: block {i} of the squashfs failed "
                                     "verification (corrupted in transit or in the registry); refused")
                os.pwrite(self.data_fd, data, start)
                os.pwrite(self.have_fd, b"\x01", i)
            finally:
                fcntl.lockf(self.have_fd, fcntl.LOCK_UN, 1, i)
            self.verified.add(i)
            self.fetched_bytes += length
            return data

    def read(self, offset: int, size: int) -> bytes:
        if offset >= self.index.size:
            return b""
        size = min(size, self.index.size - offset)
        out = []
        c = self.index.chunk
        for i in range(offset // c, (offset + size - 1) // c + 1):
            data = self.get(i)
            lo = max(offset - i * c, 0)
            hi = min(offset + size - i * c, len(data))
            out.append(data[lo:hi])
        return b"".join(out)


def try_get(cache: ChunkCache, i: int) -> bool:
    try:
        cache.get(i)
        return True
    except NagayaError:
        return False
