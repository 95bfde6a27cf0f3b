"""/api/repositories: repositories, tags, image delete, tag policy; /api/archive: expired accounts' images."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from nagaya.image import attachments
from nagaya.server.base import Site, credentials, to_json
from nagaya.server.images import delete_image
from nagaya.sitedb import authorize
from nagaya.sitedb.archive import archive_root
from nagaya.sitedb.service import SiteService


def router(site: Site) -> APIRouter:
    settings = site.settings
    r = APIRouter()

    @r.get("/api/repositories", tags=["repositories"], summary="Repositories you may list")
    def repositories(request: Request, project: str | None = None) -> list[dict[str, Any]]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.repositories(site.principal(svc, credentials(request)), project))

    @r.get("/api/repositories/{repository:path}/tags", tags=["repositories"],
           summary="A repository's tags, each with its attachments (signature, SBOM, lazy-pull squashfs)")
    def tags(request: Request, repository: str, include_all: bool = Query(False, alias="all")) -> list[dict[str, Any]]:
        """Attachment tags (`sha256-HEX.sig|sbom|sqfs|att`) are listed under their image's `attachments`;
        `all=true` lists them as rows too (with `attachment_of`)."""
        with site.db.session() as s:
            svc = SiteService(s)
            rows = svc.tags(site.principal(svc, credentials(request)), repository)
        return attachments.listing_json(rows, to_json(rows), include_all=include_all)

    @r.delete("/api/repositories/{repository:path}/manifests/{digest}", tags=["repositories"],
              summary="Delete an image (the manifest and every tag on it): owners and maintainers")
    def delete_manifest(request: Request, repository: str, digest: str) -> dict[str, Any]:
        with site.db.session() as s:
            p = site.principal(SiteService(s), credentials(request))
        tags = delete_image(site, p, repository, digest)
        return {"repository": repository, "digest": digest, "tags": tags}

    @r.get("/api/archive", tags=["archive"], summary="Archived images with this digest the caller may pull")
    def archive_find(request: Request, digest: str) -> list[dict[str, Any]]:
        with site.db.session() as s:
            svc = SiteService(s)
            p = site.principal(svc, credentials(request), allow_password=False)
            return to_json(svc.archived(p, archive_root(settings), digest))

    @r.get("/api/archive/{project}/{name}", tags=["archive"], summary="One archived image (OCI archive)")
    def archive_get(request: Request, project: str, name: str) -> Any:
        with site.db.session() as s:
            svc = SiteService(s)
            p = site.principal(svc, credentials(request), allow_password=False)
            path = svc.archive_file(p, archive_root(settings), project, name)
        return FileResponse(path, media_type="application/x-tar")

    @r.get("/api/tag-policy", tags=["repositories"], summary="Whether a push may move this tag")
    def tag_policy(request: Request, repository: str, tag: str) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            p = site.principal(svc, credentials(request))
            # answered only to those who may push there: patterns are not public
            mine = "push" in authorize(s, p, repository, ["push"])
            immutable = mine and svc.is_immutable(repository, tag)
            return {"repository": repository, "tag": tag, "immutable": immutable}

    return r
