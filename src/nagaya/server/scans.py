"""Scan on push: the registry's notification of a pushed image makes the server (the service account, with a
token of its own; no user code runs: the layers are read as tar streams) inventory the image, match it
against the site's vulnerability database, keep the report and an SPDX SBOM per digest in the site database,
and attach the SBOM in the registry beside the image (tag sha256-HEX.sbom, see nagaya.scan.attach).

One background thread per server process does the scans in push order: the notification is answered at once
(the registry retries slow sinks). `GET /api/scans/{repository}?digest=` gives the report to whoever may pull.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request

from nagaya.errors import NagayaError, NotFound, UsageError
from nagaya.image.registry import Registry
from nagaya.server.base import INTERNAL, Site
from nagaya.sitedb.models import ImageScan, utcnow

log = logging.getLogger("nagaya.server")
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nagaya-scan")
MAX_LAYERS_BYTES = 8 << 30
IMAGE_TYPES = ("application/vnd.oci.image.manifest.v1+json",
               "application/vnd.docker.distribution.manifest.v2+json")


def wanted(event: dict[str, Any]) -> tuple[str, str] | None:
    """(repository, digest) of a push event that is an image (not a signature, SBOM or index)."""
    target = event.get("target") or {}
    tag = str(target.get("tag") or "")
    if event.get("action") != "push" or not tag or tag.startswith("sha256-"):
        return None
    if str(target.get("mediaType") or "") not in IMAGE_TYPES:
        return None
    repo, digest = str(target.get("repository") or ""), str(target.get("digest") or "")
    return (repo, digest) if repo and digest.startswith("sha256:") else None


def schedule(site: Site, repository: str, digest: str) -> None:
    if site.settings.vulndb:
        _pool.submit(_scan_logged, site, repository, digest)


def _scan_logged(site: Site, repository: str, digest: str) -> None:
    try:
        scan_pushed(site, repository, digest)
    except Exception as e:              # a background thread: record the failure, never crash the server
        log.warning("scan of %s@%s failed: %s", repository, digest, e)
        _store(site, repository, digest, {}, {}, 0, "failed", str(e)[:500])


def _layer_opener(reg: Registry, desc: dict[str, Any]):
    @contextlib.contextmanager
    def op() -> Iterator[IO[bytes]]:
        from nagaya.image import oci
        from nagaya.image.layers import decompressed

        layer = oci.Descriptor.parse(desc, "layer")
        with tempfile.NamedTemporaryFile(prefix="nagaya-scan-") as tmp:
            reg.fetch_blob(layer, tmp, "layer")                 # size-bounded and checked against its digest
            tmp.flush()
            with decompressed(Path(tmp.name), "") as stream:
                yield stream
    return op


def scan_pushed(site: Site, repository: str, digest: str) -> dict[str, Any]:
    from nagaya.scan import inventory, sbom
    from nagaya.scan.attach import attach_sbom
    from nagaya.scan.report import make
    from nagaya.scan.vulndb import VulnDB

    with site.registry(repository, INTERNAL, ["pull", "push"], timeout=120) as reg:
        data, _mt, _d = reg.get_manifest(digest)                # verified against the digest
        manifest = json.loads(data)
        layers = list(manifest.get("layers") or [])
        if sum(int(x.get("size", 0)) for x in layers) > MAX_LAYERS_BYTES:
            raise UsageError("the image is too large to scan on push")
        inv = inventory.build(inventory.layer_files(_layer_opener(reg, x) for x in reversed(layers)))
        with VulnDB(site.settings.vulndb) as db:
            rep = make(inv, db, digest, f"{site.settings.registry}/{repository}")
        doc = sbom.spdx(inv, f"{site.settings.registry}/{repository}", digest)
        try:
            attach_sbom(reg, digest, json.dumps(doc, indent=1).encode())
        except NagayaError as e:
            log.warning("cannot attach the SBOM of %s@%s: %s", repository, digest, e)
    # the inventory is kept (not shown): when the database changes, reports are matched again without the layers
    _store(site, repository, digest, {**rep, "inventory": inv.to_json()}, doc, int(rep["fixable"]), "done", "")
    return rep


_matched_against = ""               # the database stamp this process last brought every stored report up to


def rematch_if_stale(site: Site) -> int:
    """After `admin vulndb update`: match every stored inventory against the new database once (per server
    process; cheap: no layers are read). How many reports changed."""
    global _matched_against
    from sqlalchemy import select

    from nagaya.scan import inventory
    from nagaya.scan.report import make
    from nagaya.scan.vulndb import VulnDB, stamp

    path = site.settings.vulndb
    now = stamp(path) if path else "-"
    if now in ("-", _matched_against):
        return 0
    changed = 0
    with VulnDB(path) as db, site.db.session() as s:
        for row in s.scalars(select(ImageScan).where(ImageScan.state == "done")):
            rep = row.report or {}
            if (rep.get("vulndb") or {}).get("stamp") == now or not rep.get("inventory"):
                continue
            inv = inventory.Inventory.from_json(rep["inventory"])
            new = make(inv, db, row.digest, str(rep.get("image", "")))
            new["scanned"] = rep.get("scanned", new["scanned"])
            row.report, row.fixable = {**new, "inventory": rep["inventory"]}, int(new["fixable"])
            changed += 1
    _matched_against = now
    return changed


def _store(site: Site, repository: str, digest: str, rep: dict[str, Any], doc: dict[str, Any], fixable: int,
           state: str, error: str) -> None:
    with site.db.session() as s:
        row = s.get(ImageScan, digest)
        if row is None:
            row = ImageScan(digest=digest)
            s.add(row)
        row.repository, row.scanned, row.state, row.error = repository, utcnow(), state, error
        row.fixable, row.report, row.sbom = fixable, rep, doc


def latest(site: Site, digest: str) -> ImageScan | None:
    _fresh(site)
    with site.db.session() as s:
        row = s.get(ImageScan, digest)
        if row is not None:
            s.expunge(row)
        return row


def _fresh(site: Site) -> None:
    try:
        rematch_if_stale(site)
    except Exception as e:          # a page still shows what was stored
        log.warning("cannot match stored scans against the new database: %s", e)


def fixes_by_repository(site: Site, repositories: list[str]) -> dict[str, int]:
    """For the dashboard: repository -> the most fixes a rebuild would bring to one of its tagged images."""
    from sqlalchemy import func, select

    from nagaya.sitedb.models import Repository, Tag

    if not repositories:
        return {}
    _fresh(site)
    q = (select(Repository.name, func.max(ImageScan.fixable)).join(Tag, Tag.repository_id == Repository.id)
         .join(ImageScan, ImageScan.digest == Tag.digest).where(Repository.name.in_(repositories))
         .group_by(Repository.name))
    with site.db.session() as s:
        return {n: int(f or 0) for n, f in s.execute(q).all() if f}


def router(site: Site) -> APIRouter:
    r = APIRouter(tags=["images"])

    @r.get("/api/scans/{repository:path}", summary="An image's vulnerability report (made when it was pushed)")
    def get_scan(request: Request, repository: str, digest: str, sbom: bool = False) -> dict[str, Any]:
        from nagaya.server.base import credentials
        from nagaya.sitedb import authorize
        from nagaya.sitedb.service import SiteService

        with site.db.session() as db:
            p = site.principal(SiteService(db), credentials(request))
            if "pull" not in authorize(db, p, repository, ["pull"]):
                raise NotFound(f"repository {repository} not found")
        row = latest(site, digest)
        if row is None or row.repository != repository:
            raise NotFound(f"no scan of {repository}@{digest[:19]} (yet)")
        if row.state != "done":
            raise UsageError(f"the scan of {repository}@{digest[:19]} failed: {row.error}")
        return row.sbom if sbom else {k: v for k, v in row.report.items() if k != "inventory"}

    return r

