"""What the portal's image page says about trust: the signature state of each digest (verified against the
site's keys for that repository: the project's KEYS_DIR/projects/P/*.pub and the keys the site policy's rule
names) and its vulnerability scan from push (nagaya.server.scans). One function per question, read-only."""

from __future__ import annotations

import logging
from typing import Any

from nagaya.errors import NagayaError
from nagaya.server.base import INTERNAL, Site
from nagaya.server.scans import latest

log = logging.getLogger("nagaya.server")


def _trusted_keys(site: Site, name: str) -> list[Any]:
    from types import SimpleNamespace

    from nagaya.trust import gate
    from nagaya.trust.policy import site_keys

    st = site.settings
    if not st.keys_dir:
        return []
    cfg = SimpleNamespace(image=SimpleNamespace(keys_dir=st.keys_dir, policy=st.image_policy))
    rule: dict[str, Any] = {"keys": ["project"]}
    m = gate.match(cfg.image.policy, name) if cfg.image.policy else None
    if m is not None and m[1].get("keys"):
        rule = {"keys": sorted({"project", *m[1]["keys"]})}
    keys, _problems = site_keys(cfg, rule, name)
    return keys


def signature(site: Site, repository: str, digest: str) -> dict[str, str]:
    """{"state": signed | unsigned | invalid | unknown, "detail": ...} for one digest."""
    from nagaya.trust import sign as signing
    from nagaya.trust.keys import TrustError

    name = f"{site.settings.registry}/{repository}"
    try:
        with site.registry(repository, INTERNAL, ["pull"], timeout=10) as reg:
            if reg.head_manifest(signing.sig_tag(digest)) is None:
                return {"state": "unsigned", "detail": "no signature"}
            trusted = _trusted_keys(site, name)
            if not trusted:
                return {"state": "unknown", "detail": "signed, but the site has no keys for this project to check it"}
            v = signing.verify(reg, name, digest, trusted)
        return {"state": "signed", "detail": f"signed by {v.key_name.rsplit('/', 1)[-1]} ({v.key[:16]})"}
    except TrustError as e:
        return {"state": "invalid", "detail": e.message.split(": ", 1)[-1]}
    except (NagayaError, OSError) as e:
        log.warning("signature state of %s@%s: %s", repository, digest, e)
        return {"state": "unknown", "detail": "could not be checked"}


def for_tags(site: Site, repository: str, digests: list[str]) -> dict[str, dict[str, Any]]:
    """digest -> {"signature": ..., "scan": report or None, "scan_error": str}."""
    out: dict[str, dict[str, Any]] = {}
    for d in dict.fromkeys(digests):
        row = latest(site, d)
        out[d] = {"signature": signature(site, repository, d),
                  "scan": row.report if row is not None and row.state == "done" else None,
                  "scan_error": row.error if row is not None and row.state != "done" else ""}
    return out
