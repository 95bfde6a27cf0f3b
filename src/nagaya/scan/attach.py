"""An SBOM stored in the registry beside its image, the way signatures are (nagaya.trust.sign): the tag
`sha256-HEX.sbom` of the same repository (cosign's `attach sbom` scheme) holds an OCI manifest whose layer
is the SPDX document and whose `subject` names the image (OCI 1.1 referrers)."""

from __future__ import annotations

import json
from typing import Any

from nagaya.image import oci
from nagaya.scan.sbom import MEDIA_TYPE


def sbom_tag(digest: str) -> str:
    return digest.replace(":", "-", 1) + ".sbom"


def manifest(digest: str, doc_desc: dict[str, Any], config_desc: dict[str, Any], size: int = 0,
             media_type: str = oci.MT_OCI_MANIFEST) -> bytes:
    m: dict[str, Any] = {"schemaVersion": 2, "mediaType": oci.MT_OCI_MANIFEST, "artifactType": MEDIA_TYPE,
                         "config": config_desc, "layers": [doc_desc]}
    if size:
        m["subject"] = {"mediaType": media_type, "digest": digest, "size": size}
    return json.dumps(m, separators=(",", ":")).encode()


def attach_sbom(reg: Any, digest: str, doc: bytes) -> str:
    """Upload `doc` and tag its manifest for `digest` with a nagaya.image.registry.Registry; returns the tag."""
    data, mt, _d = reg.get_manifest(digest)
    config = b"{}"
    cfg_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config),
                "digest": reg.upload_bytes(config)}
    layer = {"mediaType": MEDIA_TYPE, "size": len(doc), "digest": reg.upload_bytes(doc)}
    tag = sbom_tag(digest)
    reg.put_manifest(tag, manifest(digest, layer, cfg_desc, len(data), mt), oci.MT_OCI_MANIFEST)
    return tag
