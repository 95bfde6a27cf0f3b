"""/api/builds: the Build page's operations (server/builds.py) for personal access tokens, and what
`nagaya build --submit` calls. POST takes multipart: `context` (an archive, or files), `tag`, `file`,
`build_args` (K=V lines), or `git_url` [+ `git_ref`] instead of a context."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request

from nagaya.errors import AuthError, PermissionDenied
from nagaya.server.base import Site, credentials
from nagaya.server.builds import Builds, read_submission, submit_from
from nagaya.server.offload import job_pool
from nagaya.sitedb import Principal
from nagaya.sitedb.service import SiteService


def router(site: Site, builds: Builds) -> APIRouter:
    r = APIRouter(prefix="/api/builds", tags=["builds"])

    def user(request: Request) -> Principal:
        with site.db.session() as db:
            p = site.principal(SiteService(db), credentials(request), allow_password=False)
        if p.kind != "user":
            raise AuthError("builds need a user's personal access token") if not p.authenticated else \
                PermissionDenied("robot tokens cannot build")
        return p

    @r.get("", summary="Your builds, newest first")
    @job_pool
    def list_builds(request: Request) -> list[dict[str, Any]]:
        return [b.public() for b in builds.list(user(request).name)]

    @r.post("", status_code=201, summary="Build an image as yourself, as a batch job, and push it")
    async def submit(request: Request) -> dict[str, Any]:
        p = await anyio.to_thread.run_sync(user, request)
        sub = await read_submission(request, builds.limits)
        rec = await job_pool(lambda: submit_from(builds, p, sub, "api"))()
        return rec.public()

    @r.get("/{bid}", summary="One of your builds")
    @job_pool
    def show(request: Request, bid: str) -> dict[str, Any]:
        return builds.get(user(request).name, bid).public()

    @r.get("/{bid}/log", summary="The end of a build's log")
    @job_pool
    def log(request: Request, bid: str) -> dict[str, Any]:
        rec, text, truncated = builds.log(user(request).name, bid)
        return {"build": rec.public(), "log": text, "truncated": truncated}

    @r.post("/{bid}/rebuild", status_code=201, summary="Build the same source again (the kept context, the commit)")
    @job_pool
    def rebuild(request: Request, bid: str) -> dict[str, Any]:
        return builds.rebuild(user(request), bid, via="api").public()

    @r.delete("/{bid}", summary="Cancel a build (its job is cancelled)")
    @job_pool
    def cancel(request: Request, bid: str) -> dict[str, Any]:
        return builds.cancel(user(request).name, bid, via="api").public()

    return r
