"""Images: projects' repositories, tags, the manifest and the whole image as files, delete."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.encode import content_disposition
from nagaya.errors import NotFound
from nagaya.server import images as images_ops
from nagaya.server.offload import offload
from nagaya.server.portal.base import Portal, check_ref, client_address
from nagaya.server.registry_client import as_site_errors
from nagaya.sitedb import authorize
from nagaya.sitedb.service import SiteService


def router(portal: Portal) -> APIRouter:
    site, settings, sess_of, need_csrf = portal.site, portal.site.settings, portal.sess_of, portal.need_csrf
    principal, page, back = portal.principal, portal.page, portal.back
    r = portal.router()

    @r.get("/images", response_class=HTMLResponse)
    @offload
    def images(request: Request, project: str = "") -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            p = principal(svc, s)
            projects = svc.projects(p)
            repos = svc.repositories(p, project or None)
        groups: dict[str, list[Any]] = {}
        for x in repos:
            groups.setdefault(x.project, []).append(x)
        kinds = {pr.name: pr.kind for pr in projects}
        order = sorted(groups, key=lambda n: (["personal", "group", "site"].index(kinds.get(n, "group")), n))
        return page(request, "images.html", s, "images", groups=[(n, kinds.get(n, ""), groups[n]) for n in order],
                    project=project, projects=projects)

    @r.get("/images/{repository:path}", response_class=HTMLResponse)
    @offload
    def repository(request: Request, repository: str) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            p = principal(svc, s)
            tags = svc.tags(p, repository)
            can_delete = "delete" in authorize(db, p, repository, ["delete"])
        ref = f"{settings.registry}/{repository}"
        from nagaya.image import attachments
        from nagaya.server import image_trust

        listing = attachments.split(tags)       # signatures, SBOMs, squashfs: badges under their image
        trust = image_trust.for_tags(site, repository, [t.digest for t in listing.images])  # signatures, scans
        return page(request, "repository.html", s, "images", repository=repository, tags=listing.images, ref=ref,
                    can_delete=can_delete, quote=shlex.quote, trust=trust, listing=listing)

    @r.get("/sbom/{repository:path}")
    def sbom(request: Request, repository: str, ref: str) -> Response:
        """The image's SPDX 2.3 SBOM, made when it was pushed (nagaya.server.scans)."""
        import json

        from nagaya.server.scans import latest

        s = sess_of(request)
        check_ref(ref)
        portal.may_pull(s, repository)
        row = latest(site, ref)
        if row is None or row.repository != repository or not row.sbom:
            raise NotFound(f"no SBOM of {repository}@{ref[:19]} (it is made when the image is pushed)")
        name = f"{repository.replace('/', '_')}_{ref.replace(':', '-')[:24]}.spdx.json"
        return Response(json.dumps(row.sbom, indent=1), media_type="application/spdx+json",
                        headers={"Content-Disposition": content_disposition(name)})

    @r.get("/manifest/{repository:path}")
    def manifest(request: Request, repository: str, ref: str) -> Response:
        """The image's OCI manifest as a file: what `skopeo`/`nagaya pull` fetch first (no single-file export
        exists yet)."""
        s = sess_of(request)
        check_ref(ref)
        portal.may_pull(s, repository)
        with as_site_errors(f"{repository}:{ref}"), site.registry(repository, s.user, ["pull"]) as reg:
            data, media_type, _digest = reg.get_manifest(ref)
        name = f"{repository.replace('/', '_')}_{ref.replace(':', '-')[:24]}.manifest.json"
        return Response(data, media_type=media_type or "application/json",
                        headers={"Content-Disposition": content_disposition(name)})

    @r.get("/download/{repository:path}")
    def download(request: Request, repository: str, ref: str, tag: str = "latest") -> Response:
        """The image as one OCI archive file, streamed from the registry (see download.py)."""
        from fastapi.responses import StreamingResponse

        from nagaya.server.download import Archive

        s = sess_of(request)
        check_ref(ref)
        portal.may_pull(s, repository)
        tag = re.sub(r"[^A-Za-z0-9._-]", "_", tag)[:128] or "latest"

        registry = site.registry(repository, s.user, ["pull"], timeout=60)
        try:
            with as_site_errors(f"{repository}@{ref}"):
                data, media_type, digest = registry.get_manifest(ref)     # a digest ref is verified
            archive = Archive(registry, data, media_type, digest, tag)
        except BaseException:
            registry.close()
            raise

        def body() -> Iterator[bytes]:
            try:
                yield from archive.stream()
            finally:
                registry.close()

        name = f"{repository.replace('/', '_')}_{tag}.oci.tar"
        with site.db.session() as db:
            SiteService(db).audit("image.download", s.user, repository=repository, tag=tag, digest=digest,
                                  source=client_address(request)[:64], details={"via": "portal"})
        return StreamingResponse(body(), media_type="application/x-tar", headers={
            "Content-Length": str(archive.length), "Content-Disposition": content_disposition(name)})

    @r.post("/images/delete")
    def delete_image(request: Request, repository: str = Form(...), digest: str = Form(...),
                     csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        p = portal.principal_of(s)
        images_ops.delete_image(site, p, repository, digest)
        rest = f"/images/{repository}"
        with site.db.session() as db:
            try:
                SiteService(db).tags(principal(SiteService(db), s), repository)
            except NotFound:
                rest = "/images"
        return back(rest, s, "ok", f"Deleted {repository}@{digest[:19]}…")

    return r
