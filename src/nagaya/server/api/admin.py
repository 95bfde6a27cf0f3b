"""/api/admin: storage quotas and usage, retention and immutable-tag policies, account expiry."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request

from nagaya.errors import UsageError
from nagaya.server.base import Site, credentials, to_json
from nagaya.sitedb.service import SiteService
from nagaya.units import naive_utc


def router(site: Site) -> APIRouter:
    settings = site.settings
    r = APIRouter()

    @r.get("/api/admin/projects/{name}/quota", tags=["admin"])
    def get_quota(request: Request, name: str) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.quota(site.principal(svc, credentials(request)), name))

    @r.get("/api/admin/usage", tags=["admin"], summary="Every project's storage use and quota (site admins)")
    def usage(request: Request) -> list[dict[str, Any]]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.usage_overview(site.principal(svc, credentials(request))))

    @r.put("/api/admin/projects/{name}/quota", tags=["admin"], summary="Set (or clear, null) a storage quota")
    def put_quota(request: Request, name: str, body: dict[str, Any]) -> dict[str, Any]:
        q = body.get("quota_bytes")
        if q is not None and not isinstance(q, int):
            raise UsageError("quota_bytes must be an integer or null")
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.set_quota(site.principal(svc, credentials(request)), name, q))

    @r.put("/api/admin/projects/{name}/policy", tags=["admin"],
             summary="Retention (keep_newest, keep_pattern) and immutable tag patterns of a project")
    def put_policy(request: Request, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.set_policy(site.principal(svc, credentials(request)), name, body))

    @r.put("/api/admin/users/{name}/expiry", tags=["admin"],
             summary="Set (or clear) when an account expires; dry_run shows the consequences only")
    def put_expiry(request: Request, name: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = body.get("expires_at")
        try:
            when = naive_utc(datetime.fromisoformat(str(raw).replace("Z", "+00:00"))) if raw else None
        except ValueError:
            raise UsageError(f"invalid expires_at {raw!r}") from None
        with site.db.session() as s:
            svc = SiteService(s)
            return to_json(svc.set_expiry(site.principal(svc, credentials(request)), name, when,
                                          settings.expiry_grace_days, bool(body.get("dry_run"))))

    return r
