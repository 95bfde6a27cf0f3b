"""/api/audit and /api/admin/audit: the one audit trail, read by admins, reported to by the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request

from nagaya.server.base import Site, credentials
from nagaya.sitedb.auditlog import AuditQuery, as_row
from nagaya.sitedb.service import SiteService
from nagaya.units import naive_utc


def router(site: Site) -> APIRouter:
    r = APIRouter()

    @r.get("/api/audit", tags=["audit"], summary="Recent audit events (site admins)")
    def audit(request: Request, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        with site.db.session() as s:
            svc = SiteService(s)
            q = AuditQuery(action=action or "", exact_action=True, limit=min(limit, 10000))
            return [as_row(e) for e in svc.audit_events(site.principal(svc, credentials(request)), q)]

    @r.post("/api/audit", tags=["audit"], status_code=201,
              summary="Report a CLI event (run, submit, pull, ...) of the authenticated user")
    def audit_report(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            p = site.principal(svc, credentials(request), allow_password=False)
            host = request.client.host if request.client else ""
            svc.ingest_cli_event(p, body, f"cli:{host}")
            return {"recorded": True}

    @r.get("/api/admin/audit", tags=["admin"], summary="Query the audit trail (site admins), oldest first")
    def admin_audit(request: Request, user: str = "", since: datetime | None = None, until: datetime | None = None,
                    image: str = "", action: str = "", repository: str = "",
                    limit: int = 1000) -> list[dict[str, Any]]:
        with site.db.session() as s:
            svc = SiteService(s)
            p = site.principal(svc, credentials(request))
            rows = svc.audit_events(p, AuditQuery(actor=user, since=naive_utc(since), until=naive_utc(until),
                                                  image=image, action=action, repository=repository, limit=limit,
                                                  oldest_first=True))
            return [as_row(e) for e in rows]

    return r
