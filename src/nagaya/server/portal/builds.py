"""Builds: a form (an uploaded context or a git URL, the tag to push), the user's builds, a live log, cancel
and rebuild; all through server/builds.py, as the user, like /api/builds and `nagaya build --submit`."""

from __future__ import annotations

from urllib.parse import quote

import anyio.to_thread
from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.errors import NagayaError
from nagaya.server.builds import Builds, read_submission, submit_from
from nagaya.server.offload import job_pool
from nagaya.server.portal.base import Portal
from nagaya.sitedb.service import SiteService


def router(portal: Portal, builds: Builds) -> APIRouter:
    site, sess_of, need_csrf = portal.site, portal.sess_of, portal.need_csrf
    principal, page, back = portal.principal, portal.page, portal.back
    r = portal.router()

    @r.get("/builds", response_class=HTMLResponse)
    @job_pool
    def builds_page(request: Request) -> Response:
        s = sess_of(request)
        error, items = "", []
        try:
            items = builds.list(s.user)
        except NagayaError as e:
            error = f"Could not list your builds: {e.message}"
        with site.db.session() as db:
            svc = SiteService(db)
            targets = _projects(svc, principal(svc, s))
        lim = builds.limits
        return page(request, "builds.html", s, "builds", builds=items, error=error, projects=targets,
                    limits=lim, git=bool(lim.git_hosts))

    @r.post("/builds")
    async def submit_build(request: Request) -> Response:
        s = await anyio.to_thread.run_sync(sess_of, request)
        sub = await read_submission(request, builds.limits)
        need_csrf(request, s, sub.csrf)

        def work() -> Response:
            p = portal.principal_of(s)
            rec = submit_from(builds, p, sub, "portal")
            return back(f"/builds/{rec.id}", s, "ok", f"Build submitted as job {rec.job}.")
        return await job_pool(work)()

    @r.get("/builds/of-image", response_class=HTMLResponse)
    @job_pool
    def of_image(request: Request, repository: str = "", tag: str = "") -> Response:
        """The image page's Rebuild button (loaded into it): the user's newest build that pushed this tag."""
        s = sess_of(request)
        rec = builds.for_image(s.user, repository, tag) if repository and tag else None
        return page(request, "_build_rebuild.html", s, "images", b=rec)

    @r.get("/builds/{bid}", response_class=HTMLResponse)
    @job_pool
    def build_page(request: Request, bid: str) -> Response:
        s = sess_of(request)
        return page(request, "build.html", s, "builds", b=builds.get(s.user, bid))

    @r.get("/builds/{bid}/log", response_class=HTMLResponse)
    @job_pool
    def build_log(request: Request, bid: str) -> Response:
        s = sess_of(request)
        rec, log, truncated = builds.log(s.user, bid)
        return page(request, "build_log.html", s, "builds", b=rec, log=log, truncated=truncated)

    @r.post("/builds/{bid}/cancel")
    @job_pool
    def cancel_build(request: Request, bid: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        builds.cancel(s.user, bid)
        return back(f"/builds/{quote(bid)}", s, "ok", "Build cancelled.")

    @r.post("/builds/{bid}/rebuild")
    @job_pool
    def rebuild(request: Request, bid: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        p = portal.principal_of(s)
        rec = builds.rebuild(p, bid)
        return back(f"/builds/{rec.id}", s, "ok", f"Rebuild submitted as job {rec.job}.")

    return r


def _projects(svc: SiteService, p: object) -> list[dict[str, str]]:
    """The projects the form offers (the user may push to them); the server checks again on submit."""
    out = []
    for x in svc.projects(p):                 # type: ignore[arg-type]
        if "push" in set(getattr(x, "actions", None) or []):
            out.append({"name": str(x.name)})
    return out
