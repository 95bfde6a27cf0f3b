"""/api/tokens and /api/projects/NAME/tokens: robot tokens (create, list, revoke, rotate)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from nagaya.server.base import Site, credentials, to_json
from nagaya.sitedb.models import utcnow
from nagaya.sitedb.service import SiteService


class TokenCreate(BaseModel):
    name: str
    scope: str = Field(pattern="^(pull|push)$")
    expires_in: int | None = Field(None, ge=1, description="seconds; null: never expires")



def router(site: Site) -> APIRouter:
    r = APIRouter()

    @r.get("/api/tokens", tags=["tokens"], summary="Robot tokens of the projects you maintain")
    def tokens(request: Request, project: str | None = None) -> list[dict[str, Any]]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.robots(site.principal(svc, credentials(request)), project))

    @r.post("/api/projects/{name}/tokens", tags=["tokens"], status_code=201,
              summary="Create a robot token; the secret is in this answer only")
    def create_token(request: Request, name: str, body: TokenCreate) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            expires = utcnow() + timedelta(seconds=body.expires_in) if body.expires_in else None
            p = site.principal(svc, credentials(request))
            info_, new = svc.create_robot(p, name, body.name, body.scope, expires)
            out = to_json(info_)
            out["secret"] = new.secret
            return out

    @r.delete("/api/projects/{name}/tokens/{token_name}", tags=["tokens"], summary="Revoke a robot token")
    def revoke_token(request: Request, name: str, token_name: str) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.revoke_robot(site.principal(svc, credentials(request)), name, token_name))

    @r.post("/api/projects/{name}/tokens/{token_name}/rotate", tags=["tokens"],
              summary="A new secret for a robot token (same name, scope, expiry); the old one stops working")
    def rotate_token(request: Request, name: str, token_name: str) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            info_, new = svc.rotate_robot(site.principal(svc, credentials(request)), name, token_name)
            out = to_json(info_)
            out["secret"] = new.secret
            return out

    return r
