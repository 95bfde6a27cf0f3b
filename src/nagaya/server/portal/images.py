"""Images: projects' repositories, tags, the manifest and the whole image as files, delete."""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Iterator
from typing import Any

import httpx
from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.encode import content_disposition
from nagaya.errors import NagayaError, NotFound, UsageError
from nagaya.server import images as images_ops
from nagaya.server.offload import offload
from nagaya.server.portal.base import Portal, check_ref, client_address
from nagaya.store import authorize
from nagaya.store.service import SiteService


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
        return page(request, "repository.html", s, "images", repository=repository, tags=tags, ref=ref,
                    can_delete=can_delete, quote=shlex.quote)

    @r.get("/manifest/{repository:path}")
    def manifest(request: Request, repository: str, ref: str) -> Response:
        """The image's OCI manifest as a file: what `skopeo`/`nagaya pull` fetch first (no single-file export
        exists yet)."""
        s = sess_of(request)
        check_ref(ref)
        with site.db.session() as db:
            p = principal(SiteService(db), s)
            if "pull" not in authorize(db, p, repository, ["pull"]):
                raise NotFound(f"repository {repository} not found")
        try:
            resp = site.registry(repository, s.user, ["pull"]).get_manifest(ref)
        except httpx.HTTPError as e:
            raise UsageError(f"the registry did not answer: {e}") from None
        if resp.status_code == 404:
            raise NotFound(f"{repository}:{ref} not found")
        if resp.status_code != 200:
            raise UsageError(f"the registry answered {resp.status_code}")
        name = f"{repository.replace('/', '_')}_{ref.replace(':', '-')[:24]}.manifest.json"
        return Response(resp.content, media_type=resp.headers.get("content-type", "application/json"),
                        headers={"Content-Disposition": content_disposition(name)})

    @r.get("/download/{repository:path}")
    def download(request: Request, repository: str, ref: str, tag: str = "latest") -> Response:
        """The image as one OCI archive file, streamed from the registry (see download.py)."""
        from fastapi.responses import StreamingResponse

        from nagaya.server.download import Archive

        s = sess_of(request)
        check_ref(ref)
        with site.db.session() as db:
            p = principal(SiteService(db), s)
            if "pull" not in authorize(db, p, repository, ["pull"]):
                raise NotFound(f"repository {repository} not found")
        tag = re.sub(r"[^A-Za-z0-9._-]", "_", tag)[:128] or "latest"

        http = httpx.Client(timeout=60, follow_redirects=True)
        registry = site.registry(repository, s.user, ["pull"], timeout=60, http=http)
        try:
            resp = registry.get_manifest(ref)
            if resp.status_code == 404:
                raise NotFound(f"{repository}@{ref} not found")
            if resp.status_code != 200:
                raise UsageError(f"the registry answered {resp.status_code}")
            digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
            if ref.startswith("sha256:") and ref != digest:
                raise UsageError("the registry sent a manifest that does not match its digest")
            media_type = resp.headers.get("content-type", "").split(";")[0].strip()
            archive = Archive(http, registry.base, registry.auth, resp.content, media_type, digest, tag)
        except (httpx.HTTPError, NagayaError) as e:
            http.close()
            if isinstance(e, NagayaError):
                raise
            raise UsageError(f"the registry did not answer: {e}") from None

        def body() -> Iterator[bytes]:
            try:
                yield from archive.stream()
            finally:
                http.close()

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
        with site.db.session() as db:
            p = principal(SiteService(db), s)
        images_ops.delete_image(site, p, repository, digest)
        rest = f"/images/{repository}"
        with site.db.session() as db:
            try:
                SiteService(db).tags(principal(SiteService(db), s), repository)
            except NotFound:
                rest = "/images"
        return back(rest, s, "ok", f"Deleted {repository}@{digest[:19]}…")

    return r
