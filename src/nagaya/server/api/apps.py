"""/api/sessions: the Sessions page's operations (interactive apps) for personal access tokens. Connecting
is the portal's (a browser login through the proxy); the API starts, lists, extends and ends."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from nagaya.errors import AuthError, PermissionDenied
from nagaya.server.apps import DEFAULT_HOURS, AppSessions
from nagaya.server.base import Site, credentials
from nagaya.server.offload import job_pool
from nagaya.sitedb import Principal
from nagaya.sitedb.service import SiteService


class SessionStart(BaseModel):
    kind: str = Field("jupyter", description="jupyter, or web: your command serving HTTP on $NAGAYA_APP_SOCKET")
    image: str = Field(description="HOST:PORT/PROJECT/NAME:TAG, one of the images you may pull")
    command: list[str] = Field(default_factory=list)
    cpus: int = Field(1, ge=1, le=1024)
    mem: str = Field("", max_length=32)
    gpus: str = Field("", max_length=32)
    hours: float = Field(DEFAULT_HOURS, gt=0)


def router(site: Site, apps: AppSessions) -> APIRouter:
    r = APIRouter(prefix="/api/sessions", tags=["sessions"])

    def user(request: Request) -> Principal:
        with site.db.session() as db:
            p = site.principal(SiteService(db), credentials(request), allow_password=False)
        if p.kind != "user":
            raise AuthError("sessions need a user's personal access token") if not p.authenticated else \
                PermissionDenied("robot tokens cannot start sessions")
        return p

    def shown(x: Any) -> dict[str, Any]:
        return x.public(apps.clock(), apps.idle, apps.warn_before)          # never the token

    @r.get("", summary="Your interactive sessions")
    @job_pool
    def list_sessions(request: Request) -> list[dict[str, Any]]:
        return [shown(x) for x in apps.list(user(request).name)]

    @r.post("", status_code=201, summary="Start an interactive app as yourself")
    @job_pool
    def start(request: Request, body: SessionStart) -> dict[str, Any]:
        return shown(apps.start(user(request), body.kind, body.image, body.command, body.cpus, body.mem, body.gpus,
                                body.hours, via="api"))

    @r.post("/{sid}/extend", summary="One more hour, within the site's limit")
    @job_pool
    def extend(request: Request, sid: str) -> dict[str, Any]:
        return shown(apps.extend(user(request).name, sid))

    @r.delete("/{sid}", summary="End a session (its job is cancelled)")
    @job_pool
    def end(request: Request, sid: str) -> dict[str, Any]:
        return shown(apps.end(user(request).name, sid, via="api"))

    return r
