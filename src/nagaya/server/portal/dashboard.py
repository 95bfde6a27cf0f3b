"""The dashboard: projects, images, tokens and jobs at a glance."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.server.offload import offload
from nagaya.server.portal.base import Portal
from nagaya.sitedb.service import SiteService


def router(portal: Portal) -> APIRouter:
    site, jobs, sess_of, principal, page = portal.site, portal.jobs, portal.sess_of, portal.principal, portal.page
    r = portal.router()

    @r.get("/dashboard", response_class=HTMLResponse)
    @offload
    def dashboard(request: Request) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            info = svc.summary(principal(svc, s))
        from nagaya.server.scans import fixes_by_repository

        fixes = fixes_by_repository(site, [r.name for r in info.repositories[:8]])    # from scans on push
        return page(request, "dashboard.html", s, "dashboard", projects=info.projects, repos=info.repositories[:8],
                    fixes=fixes,
                    n_repos=len(info.repositories), n_tokens=info.active_tokens,
                    jobs_on=jobs.available(recent=True))

    return r
