"""/api/projects: projects and their members."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from nagaya.server.base import Site, credentials, to_json
from nagaya.sitedb.service import SiteService


class ProjectCreate(BaseModel):
    name: str
    kind: str = Field("group", pattern="^(group|site)$")


class MemberAdd(BaseModel):
    name: str
    kind: str = Field("user", pattern="^(user|group)$")
    role: str = Field(pattern="^(owner|maintainer|developer|guest)$")



def router(site: Site) -> APIRouter:
    r = APIRouter()

    @r.get("/api/projects", tags=["projects"])
    def projects(request: Request) -> list[dict[str, Any]]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.projects(site.principal(svc, credentials(request))))

    @r.post("/api/projects", tags=["projects"], status_code=201)
    def create_project(request: Request, body: ProjectCreate) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.create_project(site.principal(svc, credentials(request)), body.name, body.kind,
                                            site.name_reserved))

    @r.get("/api/projects/{name}", tags=["projects"])
    def project(request: Request, name: str) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.project_info(site.principal(svc, credentials(request)), name))

    @r.get("/api/projects/{name}/members", tags=["projects"])
    def members(request: Request, name: str) -> list[dict[str, Any]]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.members(site.principal(svc, credentials(request)), name))

    @r.post("/api/projects/{name}/members", tags=["projects"])
    def add_member(request: Request, name: str, body: MemberAdd) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(site.add_member(svc, site.principal(svc, credentials(request)), name, body.name, body.kind,
                                         body.role))

    @r.delete("/api/projects/{name}/members/{kind}/{member}", tags=["projects"])
    def remove_member(request: Request, name: str, kind: str, member: str) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            svc.remove_member(site.principal(svc, credentials(request)), name, member, kind)
            return {"removed": member, "kind": kind, "project": name}

    return r
