"""OCI image-spec objects nagaya reads and writes, as small typed dataclasses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nagaya.errors import ImageError

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
LAYER_TYPES = {
    MT_OCI_LAYER: "tar",
    MT_OCI_LAYER_GZIP: "gzip",
    MT_OCI_LAYER_ZSTD: "zstd",
    MT_DOCKER_LAYER_GZIP: "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
# Bounds against hostile manifests: real images have tens of layers and small JSON documents.
MAX_JSON_BYTES = 4 * 1024 * 1024
MAX_LAYERS = 512


def sha256_digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON, so that the same content always gets the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON_BYTES:
        raise ImageError(f"{what} is larger than {MAX_JSON_BYTES // 1024 // 1024} MiB")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ImageError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not a JSON object")
    return obj


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageError(f"{what}: descriptor is not an object")
        digest, size, mt = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise ImageError(f"{what}: unsupported or malformed digest {digest!r}")
        try:
            int(digest[7:], 16)
        except ValueError:
            raise ImageError(f"{what}: malformed digest {digest!r}") from None
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{what}: malformed size {size!r}")
        plat = obj.get("platform")
        ann = obj.get("annotations") or {}
        return cls(str(mt), digest, size, plat if isinstance(plat, dict) else None,
                   ann if isinstance(ann, dict) else {})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]
    media_type: str = MT_OCI_MANIFEST
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, what: str = "manifest") -> Manifest:
        obj = load_json(data, what)
        mt = obj.get("mediaType", MT_OCI_MANIFEST)
        if mt in INDEX_TYPES or "manifests" in obj:
            raise ImageError(f"{what} is an index, not an image manifest")
        if mt not in MANIFEST_TYPES:
            raise ImageError(f"{what}: unsupported media type {mt!r}")
        if obj.get("schemaVersion") != 2:
            raise ImageError(f"{what}: unsupported schemaVersion {obj.get('schemaVersion')!r}")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{what}: has no layer list")
        if len(layers) > MAX_LAYERS:
            raise ImageError(f"{what}: {len(layers)} layers is more than the {MAX_LAYERS} allowed")
        descs = tuple(Descriptor.parse(x, f"{what} layer {i}") for i, x in enumerate(layers))
        for d in descs:
            if d.media_type not in LAYER_TYPES:
                raise ImageError(f"{what}: unsupported layer media type {d.media_type!r}")
        return cls(Descriptor.parse(obj.get("config"), f"{what} config"), descs, mt,
                   obj.get("annotations") or {})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [x.to_json() for x in self.layers],
        }
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Index:
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, what: str = "index") -> Index:
        obj = load_json(data, what)
        ms = obj.get("manifests")
        if not isinstance(ms, list):
            raise ImageError(f"{what}: has no manifest list")
        if len(ms) > 1024:
            raise ImageError(f"{what}: too many manifests ({len(ms)})")
        return cls(tuple(Descriptor.parse(x, f"{what} entry {i}") for i, x in enumerate(ms)))

    def select(self, tag: str | None, arch: str, os_name: str = "linux") -> Descriptor:
        """Choose the manifest for `tag` (by ref.name annotation) and this platform."""
        cands = list(self.manifests)
        if tag:
            named = [d for d in cands if d.annotations.get("org.opencontainers.image.ref.name") == tag]
            if named:
                cands = named
            elif any("org.opencontainers.image.ref.name" in d.annotations for d in cands):
                names = sorted({d.annotations.get("org.opencontainers.image.ref.name", "") for d in cands})
                raise ImageError(f"no image tagged {tag!r} here (tags: {', '.join(n for n in names if n)})")
        plat = [d for d in cands if d.platform is None or
                (d.platform.get("architecture") == arch and d.platform.get("os", os_name) == os_name)]
        if not plat:
            found = sorted({f"{d.platform.get('os')}/{d.platform.get('architecture')}" for d in cands
                            if d.platform})
            raise ImageError(f"no image for linux/{arch} (found: {', '.join(found)})")
        return plat[0]


def oci_arch() -> str:
    import platform

    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)
