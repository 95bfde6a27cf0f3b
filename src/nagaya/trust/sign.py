"""Signatures in the registry as cosign stores them, so that skopeo/podman (`sigstoreSigned`) and cosign read
nagaya's and nagaya reads theirs.

For a manifest digest sha256:HEX the tag `sha256-HEX.sig` of the same repository holds an OCI manifest;
each of its layers is a "simple signing" payload (media type application/vnd.dev.cosign.simplesigning.v1+json)
with the base64 ECDSA signature of the payload bytes in the `dev.cosignproject.cosign/signature` annotation.
The payload names the digest and the repository ("docker-reference"): a signature copied onto another image
or another repository does not verify.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from nagaya import __version__
from nagaya.errors import ImageError, NagayaError
from nagaya.image import oci
from nagaya.image.reference import Reference
from nagaya.image.registry import Registry
from nagaya.trust import keys
from nagaya.trust.keys import TrustError

MT_PAYLOAD = "application/vnd.dev.cosign.simplesigning.v1+json"
ANN_SIG = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"


def sig_tag(digest: str) -> str:
    return digest.replace(":", "-", 1) + ".sig"


def payload(repo: str, digest: str) -> bytes:
    doc = {"critical": {"identity": {"docker-reference": repo},
                        "image": {"docker-manifest-digest": digest}, "type": PAYLOAD_TYPE},
           "optional": {"creator": f"nagaya {__version__}"}}
    return json.dumps(doc, separators=(",", ":")).encode()


def _repo_of(reference: str) -> str:
    """`host/path[:tag][@digest]` -> `host/path` (skopeo signs with the tag, cosign without)."""
    name = reference.split("@", 1)[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    return name[:colon] if colon > slash else name


def _sig_manifest(reg: Registry, digest: str) -> dict[str, Any] | None:
    tag = sig_tag(digest)
    if reg.head_manifest(tag) is None:
        return None
    data, _mt, _d = reg.get_manifest(tag)
    doc = oci.load_json(data, f"{reg.where}:{tag}")
    return doc if isinstance(doc.get("layers"), list) else None


def resolve(reg: Registry, ref: Reference) -> str:
    """The manifest digest the reference names now (a tag is resolved; a digest is checked to exist)."""
    _data, _mt, digest = reg.get_manifest(ref.digest or ref.tag_or_latest)
    return digest


def sign(reg: Registry, ref: Reference, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    """Sign the manifest `ref` names; returns (digest, signature tag). Earlier signatures are kept."""
    digest = resolve(reg, ref)
    body = payload(ref.name, digest)
    sig = base64.b64encode(keys.sign(key, body)).decode()
    layer = {"mediaType": MT_PAYLOAD, "size": len(body), "digest": reg.upload_bytes(body),
             "annotations": {ANN_SIG: sig}}
    old = _sig_manifest(reg, digest)
    layers = [x for x in (old or {}).get("layers", []) if isinstance(x, dict)
              and not (x.get("digest") == layer["digest"] and (x.get("annotations") or {}).get(ANN_SIG) == sig)]
    layers.append(layer)
    # cosign's config: the payloads as the rootfs, no platform
    config = json.dumps({"architecture": "", "os": "", "config": {}, "created": "0001-01-01T00:00:00Z",
                         "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]}},
                        separators=(",", ":")).encode()
    manifest = {"schemaVersion": 2, "mediaType": oci.MT_OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config),
                           "digest": reg.upload_bytes(config)},
                "layers": layers}
    tag = sig_tag(digest)
    reg.put_manifest(tag, json.dumps(manifest, separators=(",", ":")).encode(), oci.MT_OCI_MANIFEST)
    return digest, tag


@dataclass
class Verified:
    digest: str
    identity: str           # the payload's docker-reference
    key: str                # fingerprint of the key that verified it
    key_name: str


def verify(reg: Registry, ref_name: str, digest: str,
           trusted: list[tuple[str, ec.EllipticCurvePublicKey]]) -> Verified:
    """The first signature on `digest` made by one of `trusted` (name, key) for this repository and this
    digest; TrustError naming why otherwise (none, wrong key, another digest or repository)."""
    what = f"{ref_name}@{digest[:19]}"
    if not trusted:
        raise TrustError(f"{what}: no keys to verify with")
    doc = _sig_manifest(reg, digest)
    entries = [x for x in (doc or {}).get("layers", []) if isinstance(x, dict) and x.get("mediaType") == MT_PAYLOAD]
    if not entries:
        raise TrustError(f"{what}: not signed (no {sig_tag(digest)[:20]}... signature in {reg.where})")
    reasons: list[str] = []
    for entry in entries:
        try:
            desc = oci.Descriptor.parse(entry, f"{what}: signature layer")
            body = reg.get_blob_bytes(desc, f"{what}: signature payload")
            sig = base64.b64decode(str((entry.get("annotations") or {}).get(ANN_SIG, "")), validate=True)
        except (KeyError, TypeError, ValueError, ImageError) as e:
            reasons.append(f"unreadable signature ({e})" if isinstance(e, NagayaError) else "malformed signature")
            continue
        signer = next(((n, k) for n, k in trusted if keys.verify(k, body, sig)), None)
        if signer is None:
            reasons.append("a signature that does not verify with the trusted keys (another key, or tampered)")
            continue
        try:
            crit = json.loads(body)["critical"]
            got_digest = str(crit["image"]["docker-manifest-digest"])
            identity = str(crit["identity"]["docker-reference"])
            kind = str(crit["type"])
        except (ValueError, KeyError, TypeError):
            reasons.append("a signed payload that is not a cosign simple-signing document")
            continue
        if kind != PAYLOAD_TYPE:
            reasons.append(f"a signed payload of type {kind!r}")
        elif got_digest != digest:
            reasons.append(f"a signature for another digest ({got_digest[:19]})")
        elif _repo_of(identity) != ref_name:
            reasons.append(f"a signature for another repository ({identity})")
        else:
            return Verified(digest, identity, keys.fingerprint(signer[1]), signer[0])
    why = "; ".join(dict.fromkeys(reasons))
    raise TrustError(f"{what}: signature refused: {why}")


def open_for(ref: Reference, cfg: Any, push: bool) -> Registry:
    from nagaya.image.pull import registry_client
    from nagaya.image.store import open_store

    return registry_client(open_store(cfg), ref, cfg, ("pull", "push") if push else ("pull",))


def load_trusted(names: list[str]) -> list[tuple[str, ec.EllipticCurvePublicKey]]:
    """Public keys given on the command line (a name in the user's store or a path)."""
    out = []
    for n in names:
        p = keys.find_public(n)
        out.append((n, keys.load_public(keys.read_file(p, "public key"), str(p))))
    return out


def default_public_keys() -> list[str]:
    d = keys.keys_dir()
    return sorted(str(p) for p in d.glob("*.pub")) if d.is_dir() else []
