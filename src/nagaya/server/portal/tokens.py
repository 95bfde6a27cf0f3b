"""Robot tokens: create (the secret shown once), list, revoke, rotate."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.errors import UsageError
from nagaya.server.offload import offload
from nagaya.server.portal.base import Portal
from nagaya.server.portal.sessions import WebSession
from nagaya.sitedb.models import utcnow
from nagaya.sitedb.service import SiteService


def router(portal: Portal) -> APIRouter:
    site, sess_of, need_csrf, principal = portal.site, portal.sess_of, portal.need_csrf, portal.principal
    page, back = portal.page, portal.back
    r = portal.router()

    @r.get("/tokens", response_class=HTMLResponse)
    @offload
    def tokens(request: Request) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            p = principal(svc, s)
            items = svc.robots(p)
            manageable = [x for x in svc.projects(p) if p.is_admin or x.role in ("owner", "maintainer")]
        return page(request, "tokens.html", s, "tokens", tokens=items, projects=manageable)

    def _secret_page(request: Request, s: WebSession, info: Any, new: Any, what: str) -> Response:
        out = page(request, "secret.html", s, "tokens", info=info, new=new, what=what)
        return out

    @r.post("/tokens", response_class=HTMLResponse)
    def create_token(request: Request, project: str = Form(...), name: str = Form(...), scope: str = Form("pull"),
                     expires_days: int = Form(0), csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        if expires_days < 0 or expires_days > 3650:
            raise UsageError("expiry must be between 0 (never) and 3650 days")
        with site.db.session() as db:
            svc = SiteService(db)
            expires = utcnow() + timedelta(days=expires_days) if expires_days else None
            info, new = svc.create_robot(principal(svc, s), project, name.strip(), scope, expires)
        return _secret_page(request, s, info, new, "created")

    @r.post("/tokens/{project}/{name}/revoke")
    def revoke_token(request: Request, project: str, name: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        with site.db.session() as db:
            svc = SiteService(db)
            svc.revoke_robot(principal(svc, s), project, name)
        return back("/tokens", s, "ok", f"Token {name} of {project} revoked: it no longer works.")

    @r.post("/tokens/{project}/{name}/rotate", response_class=HTMLResponse)
    def rotate_token(request: Request, project: str, name: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        with site.db.session() as db:
            svc = SiteService(db)
            info, new = svc.rotate_robot(principal(svc, s), project, name)
        return _secret_page(request, s, info, new, "rotated")

    return r
