"""An image as one file, straight from the registry: an OCI archive (the OCI image layout in a tar) streamed
blob by blob, so the server holds no copy and runs nothing of the image. `nagaya image import FILE`,
`skopeo copy oci-archive:FILE ...` and `podman load -i FILE` read it.

The tar is written by hand (ustar headers from `tarfile.TarInfo`): every size is known from the manifest
up front, so the answer carries a Content-Length and no temporary file is needed."""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from typing import Any

from nagaya.errors import UsageError
from nagaya.image import oci
from nagaya.image.registry import Registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SINGLE = (OCI_MANIFEST, DOCKER_MANIFEST)
BLOCK = 512


def _header(name: str, size: int, mtime: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.type = size, mtime, 0o755 if kind == tarfile.DIRTYPE else 0o644, kind
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def _pad(size: int) -> int:
    return (BLOCK - size % BLOCK) % BLOCK


class Archive:
    """Plan of the archive for one single-platform image manifest; `stream()` yields its bytes."""

    def __init__(self, registry: Registry, manifest: bytes, media_type: str, digest: str, tag: str) -> None:
        if media_type not in SINGLE:
            raise UsageError("this image is a multi-platform index; download it with `nagaya pull` instead")
        m: dict[str, Any] = json.loads(manifest)
        self.registry = registry
        self.manifest, self.digest = manifest, digest
        self.blobs: list[tuple[str, int]] = [(m["config"]["digest"], int(m["config"]["size"]))]
        for layer in m.get("layers", []):
            d = (layer["digest"], int(layer["size"]))
            if d not in self.blobs:
                self.blobs.append(d)
        for d, _ in self.blobs:
            if not d.startswith("sha256:") or len(d) != 71 or not all(c in "0123456789abcdef" for c in d[7:]):
                raise UsageError(f"the manifest names a blob {d[:80]!r} that is not a sha256 digest")
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{"mediaType": media_type, "digest": digest, "size": len(manifest),
                                "annotations": {"org.opencontainers.image.ref.name": tag}}]}
        self.small = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
                      "index.json": json.dumps(index).encode()}
        self.mtime = int(time.time())

    @property
    def length(self) -> int:
        files = [len(v) for v in self.small.values()] + [len(self.manifest)] + [s for _, s in self.blobs]
        dirs = 2                                                   # blobs/ and blobs/sha256/
        return sum(BLOCK + n + _pad(n) for n in files) + dirs * BLOCK + 2 * BLOCK

    def stream(self) -> Iterator[bytes]:
        for name, data in self.small.items():
            yield _header(name, len(data), self.mtime) + data + b"\0" * _pad(len(data))
        yield _header("blobs/", 0, self.mtime, tarfile.DIRTYPE) + _header("blobs/sha256/", 0, self.mtime,
                                                                           tarfile.DIRTYPE)
        m = self.manifest
        yield _header(f"blobs/sha256/{self.digest[7:]}", len(m), self.mtime) + m + b"\0" * _pad(len(m))
        for digest, size in self.blobs:
            yield _header(f"blobs/sha256/{digest[7:]}", size, self.mtime)
            # size-bounded and checked against the digest at the end; a 401 (a long download outlives one
            # token) fetches a fresh token. An error here is too late for a status: the stream ends short,
            # so the client sees a broken download.
            yield from self.registry.iter_blob(oci.Descriptor("application/octet-stream", digest, size), "blob")
            yield b"\0" * _pad(size)
        yield b"\0" * (2 * BLOCK)
