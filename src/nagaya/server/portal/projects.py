"""Projects: create, members (the same rules as the API and the CLI)."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.errors import PermissionDenied
from nagaya.server.offload import offload
from nagaya.server.portal.base import Portal
from nagaya.server.portal.usage_charts import storage_bar
from nagaya.sitedb.service import SiteService


def router(portal: Portal) -> APIRouter:
    site, sess_of, need_csrf, principal = portal.site, portal.sess_of, portal.need_csrf, portal.principal
    page, back = portal.page, portal.back
    r = portal.router()

    @r.get("/projects", response_class=HTMLResponse)
    @offload
    def projects(request: Request) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            items = svc.projects(principal(svc, s))
        return page(request, "projects.html", s, "projects", projects=items)

    @r.post("/projects")
    def create_project(request: Request, name: str = Form(...), kind: str = Form("group"),
                       csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        name = name.strip().lower()
        with site.db.session() as db:
            svc = SiteService(db)
            svc.create_project(principal(svc, s), name, kind, site.name_reserved)
        return back(f"/projects/{name}", s, "ok", f"Project {name} created. You are its owner.")

    @r.get("/projects/{name}", response_class=HTMLResponse)
    @offload
    def project(request: Request, name: str) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            p = principal(svc, s)
            info = svc.project_info(p, name)
            try:
                members = svc.members(p, name)
            except PermissionDenied:
                members = None
            repos = svc.repositories(p, name)
            manage = p.is_admin or info.role in ("owner", "maintainer")
            tokens = svc.robots(p, name) if manage else []
            bar = None
            if p.is_admin or info.role:     # members (and admins) see the figure the quota check uses
                quota = svc.quota(p, name)
                bar = storage_bar(quota.used_bytes, quota.quota_bytes, svc.quota_attachments(p, name))
        return page(request, "project.html", s, "projects", project=info, members=members, repos=repos,
                    tokens=tokens, is_owner=p.is_admin or info.role == "owner", manage=manage, bar=bar)

    @r.post("/projects/{name}/members")
    def add_member(request: Request, name: str, member: str = Form(...), kind: str = Form("user"),
                   role: str = Form(...), csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        member = member.strip()
        with site.db.session() as db:
            svc = SiteService(db)
            site.add_member(svc, principal(svc, s), name, member, kind, role)
        return back(f"/projects/{name}", s, "ok", f"{member} is now {role} of {name}.")

    @r.post("/projects/{name}/members/remove")
    def remove_member(request: Request, name: str, member: str = Form(...), kind: str = Form("user"),
                      csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        with site.db.session() as db:
            svc = SiteService(db)
            svc.remove_member(principal(svc, s), name, member, kind)
        return back(f"/projects/{name}", s, "ok", f"Removed {member} from {name}.")

    return r
