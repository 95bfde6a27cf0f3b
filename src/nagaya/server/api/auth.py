"""/api/info, /api/login, /api/logout, /api/me: who the caller is, and personal access tokens for a password."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from nagaya import __version__
from nagaya.errors import AuthError
from nagaya.server.base import NOTES, Site, credentials, to_json
from nagaya.sitedb.models import Project
from nagaya.sitedb.service import SiteService

DEVICE_HEADER = "x-nagaya-device"   # POST /api/login: the device token an earlier login of this client got


class LoginRequest(BaseModel):
    token_name: str = Field("nagaya-login", max_length=64)
    expires_days: int | None = Field(None, ge=1, le=3650, description="default: the site's login_ttl_days")



def router(site: Site) -> APIRouter:
    settings = site.settings
    r = APIRouter()

    @r.get("/api/info", tags=["site"])
    def info() -> dict[str, Any]:
        return {"registry": settings.registry, "server": settings.url, "service": settings.service,
                "realm": f"{settings.url}/token", "version": __version__}

    @r.post("/api/login", tags=["auth"], summary="Password login; returns a personal access token (shown once)")
    def login(request: Request, body: LoginRequest | None = None) -> dict[str, Any]:
        body = body or LoginRequest()
        creds = credentials(request)
        if creds is None or not creds[0]:
            raise AuthError("login needs HTTP Basic credentials (username and password)")
        with site.db.session() as s:
            svc = SiteService(s)
            principal = site.password_login(svc, *creds, ip=request.client.host if request.client else "",
                                            device=request.headers.get(DEVICE_HEADER))
            user = svc.user(principal.name)
            assert user is not None
            days = body.expires_days or settings.login_ttl_days
            new = svc.issue_user_token(user, body.token_name, timedelta(days=days))
            personal = s.scalar(select(Project.name).where(Project.name == user.name, Project.kind == "personal",
                                                           Project.owner_id == user.id))
            warning = (NOTES.get() or {}).get("warning")
            return {"username": user.name, "token": new.secret, "warning": warning,
                    "expires_at": to_json({"t": new.expires_at})["t"],
                    "registry": settings.registry, "server": settings.url, "is_admin": principal.is_admin,
                    "personal_project": personal, "device": site.devices.issue(user.name)}

    @r.post("/api/logout", tags=["auth"], summary="Revoke the personal access token used for this request")
    def logout(request: Request) -> dict[str, Any]:
        creds = credentials(request)
        with site.db.session() as s:
            svc = SiteService(s)
            p = site.principal(svc, creds, allow_password=False)
            user = svc.user(p.name) if p.kind == "user" else None
            n = svc.revoke_user_tokens(user, creds[1]) if user and creds else 0
            return {"revoked": n}

    @r.get("/api/me", tags=["auth"])
    def me(request: Request) -> dict[str, Any]:
        with site.db.session() as s:
            p = site.principal(SiteService(s), credentials(request))
            return {"name": p.name, "kind": p.kind, "is_admin": p.is_admin, "groups": sorted(p.groups),
                    "project": p.project, "scope": p.scope}

    return r
