"""The squashfs artifact of an image: for manifest digest sha256:HEX, the tag `sha256-HEX.sqfs` of the same
repository (the scheme the signatures use, so the same access rules apply) holds an OCI manifest whose
`subject` is the image manifest and whose layers are [chunk list (JSON), squashfs]. The chunk list holds the
sha256 of every CHUNK bytes of the squashfs; its own digest is in the artifact manifest, so every block a
node reads is checked against a digest chain that starts at the artifact manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nagaya.errors import ImageError, ImageNotFound
from nagaya.image import oci
from nagaya.image.registry import Registry

CHUNK = 1 << 20
ARTIFACT_TYPE = "application/vnd.nagaya.squashfs.v1"
MT_CHUNKS = "application/vnd.nagaya.squashfs.chunks.v1+json"
MT_SQUASHFS = "application/vnd.nagaya.squashfs.v1"
MT_CONFIG = "application/vnd.nagaya.squashfs.config.v1+json"


def sqfs_tag(digest: str) -> str:
    return digest.replace(":", "-", 1) + ".sqfs"


@dataclass
class LazyIndex:
    """What a node needs to read an image's squashfs lazily, all verified."""

    image_digest: str
    squashfs_digest: str
    size: int
    chunk: int
    sums: list[str]                     # hex sha256 of each chunk

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image_digest, "squashfs": self.squashfs_digest, "size": self.size,
                "chunk": self.chunk, "sums": self.sums}

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> LazyIndex:
        return cls(str(o["image"]), str(o["squashfs"]), int(o["size"]), int(o["chunk"]), [str(s) for s in o["sums"]])

    @property
    def count(self) -> int:
        return len(self.sums)


def chunk_sums(path: Path, chunk: int = CHUNK) -> tuple[list[str], str, int]:
    """Per-chunk sha256s, the whole file's digest and its size, in one read."""
    sums: list[str] = []
    whole = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sums.append(hashlib.sha256(block).hexdigest())
            whole.update(block)
            size += len(block)
    return sums, "sha256:" + whole.hexdigest(), size


def publish(reg: Registry, image_digest: str, manifest_size: int, manifest_type: str, squashfs: Path,
            chunk: int = CHUNK) -> str:
    """Upload the squashfs and its chunk list, tag the artifact; returns the tag. Idempotent: a second
    publisher finds the blobs there and rewrites the same manifest bytes."""
    sums, sq_digest, size = chunk_sums(squashfs, chunk)
    chunks = json.dumps({"chunk": chunk, "size": size, "squashfs": sq_digest, "sha256": sums},
                        separators=(",", ":")).encode()
    if not reg.has_blob(sq_digest, push=True):
        reg.upload_blob(squashfs, sq_digest, size)
    config = b"{}"
    manifest = {"schemaVersion": 2, "mediaType": oci.MT_OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
                "config": {"mediaType": MT_CONFIG, "size": len(config), "digest": reg.upload_bytes(config)},
                "layers": [{"mediaType": MT_CHUNKS, "size": len(chunks), "digest": reg.upload_bytes(chunks)},
                           {"mediaType": MT_SQUASHFS, "size": size, "digest": sq_digest}],
                "subject": {"mediaType": manifest_type, "size": manifest_size, "digest": image_digest}}
    tag = sqfs_tag(image_digest)
    reg.put_manifest(tag, json.dumps(manifest, separators=(",", ":")).encode(), oci.MT_OCI_MANIFEST)
    return tag


def find(reg: Registry, image_digest: str) -> LazyIndex | None:
    """The artifact for this image, or None when nobody published one. Everything is checked: the
    subject is this image, the chunk list matches its digest and covers exactly the squashfs's size."""
    tag = sqfs_tag(image_digest)
    try:
        data, _mt, _d = reg.get_manifest(tag)
    except ImageNotFound:
        return None
    what = f"{reg.where}:{tag}"
    doc = oci.load_json(data, what)
    layers = doc.get("layers")
    subject = doc.get("subject") or {}
    if doc.get("artifactType") != ARTIFACT_TYPE or not isinstance(layers, list) or len(layers) != 2:
        raise ImageError(f"{what}: not a nagaya squashfs artifact")
    if subject.get("digest") != image_digest:
        raise ImageError(f"{what}: the artifact is for another image ({str(subject.get('digest'))[:19]})")
    cdesc, sdesc = oci.Descriptor.parse(layers[0], what), oci.Descriptor.parse(layers[1], what)
    if cdesc.media_type != MT_CHUNKS or sdesc.media_type != MT_SQUASHFS:
        raise ImageError(f"{what}: unexpected layer types")
    c = oci.load_json(reg.get_blob_bytes(cdesc, f"{what}: chunk list"), f"{what}: chunk list")
    try:
        chunk, size, sums = int(c["chunk"]), int(c["size"]), [str(s) for s in c["sha256"]]
    except (KeyError, TypeError, ValueError):
        raise ImageError(f"{what}: malformed chunk list") from None
    if (chunk < 4096 or size != sdesc.size or c.get("squashfs") != sdesc.digest
            or len(sums) != -(-size // chunk) or any(len(s) != 64 for s in sums)):
        raise ImageError(f"{what}: the chunk list does not match the squashfs it describes")
    return LazyIndex(image_digest, sdesc.digest, size, chunk, sums)
