"""One scan, reached from `nagaya image scan`, the run-time policy and the server's scan on push: inventory an
image, match it against the site's database, and describe the result as one JSON-able report."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from nagaya.scan import inventory, match
from nagaya.scan.inventory import Inventory
from nagaya.scan.vulndb import VulnDB, stamp


def make(inv: Inventory, db: VulnDB, digest: str, image: str) -> dict[str, Any]:
    findings = match.scan(inv, db)
    meta = db.meta()
    return {
        "image": image, "digest": digest, "distro": inv.distro, "os": inv.os_name,
        "scanned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vulndb": {"source": meta.get("source", ""), "updated": meta.get("updated", ""), "stamp": stamp(db.path)},
        "packages": len(inv.packages), "counts": match.counts(findings), "fixable": match.fixable(findings),
        "findings": [f.to_json() for f in findings],
    }


def local_inventory(cfg: Any, digest: str) -> Inventory:
    from nagaya.errors import ImageNotFound
    from nagaya.image.store import open_store

    sq = open_store(cfg).squashfs_path(digest)
    if not sq.exists():
        raise ImageNotFound(f"{digest[:19]}: not in your cache (nagaya pull it first)")
    return inventory.build(inventory.squashfs_files(str(sq)))


def scan_local(cfg: Any, text: str) -> tuple[dict[str, Any], Inventory]:
    """Scan a cached image (NAME[:TAG], NAME@DIGEST or digest); the report is kept in the cache for
    `nagaya images` ("rebuild: N fixes available")."""
    from nagaya.image.store import open_store

    meta = open_store(cfg).resolve(text)
    inv = local_inventory(cfg, meta.digest)
    with VulnDB(cfg.image.vulndb) as db:
        rep = make(inv, db, meta.digest, text)
    save(cfg, rep)
    return rep, inv


def _dir(cfg: Any) -> str:
    return os.path.join(cfg.cache_root, "scan")


def save(cfg: Any, rep: dict[str, Any]) -> None:
    d = _dir(cfg)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        path = os.path.join(d, rep["digest"][7:] + ".json")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({k: v for k, v in rep.items()}, f)
        os.replace(tmp, path)
    except OSError:
        pass                                # a cache: the next scan writes it again


def saved(cfg: Any, digest: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(_dir(cfg), digest[7:] + ".json")) as f:
            rep = json.load(f)
    except (OSError, ValueError):
        return None
    return rep if isinstance(rep, dict) else None
