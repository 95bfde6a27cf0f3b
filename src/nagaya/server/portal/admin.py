"""Admin pages: users and storage, every user's jobs, the audit trail with its CSV/JSON exports."""

from __future__ import annotations

import csv
import io
import json
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from nagaya.encode import content_disposition, csv_row
from nagaya.errors import PermissionDenied
from nagaya.server.jobs import REPLY_TIMEOUT, JobsUnavailable
from nagaya.server.offload import job_pool, offload
from nagaya.server.portal.base import Portal
from nagaya.server.portal.sessions import WebSession
from nagaya.sitedb import Principal
from nagaya.sitedb.auditlog import COLUMNS, AuditQuery, as_row
from nagaya.sitedb.service import SiteService
from nagaya.units import parse_day


def router(portal: Portal) -> APIRouter:
    site, jobs, sess_of, page = portal.site, portal.jobs, portal.sess_of, portal.page
    r = portal.router()

    def admin(request: Request) -> tuple[WebSession, Principal, Any]:
        s = sess_of(request)
        if not s.is_admin:
            raise PermissionDenied("only site admins see this page")
        return s, Principal(kind="user", name=s.user, groups=s.groups, is_admin=True), None

    @r.get("/admin/users", response_class=HTMLResponse)
    @offload
    def admin_users(request: Request) -> Response:
        s, p, _ = admin(request)
        with site.db.session() as db:
            svc = SiteService(db)
            users, usage = svc.users_overview(p), svc.usage_overview(p)
        return page(request, "admin_users.html", s, "admin", users=users, usage=usage)

    @r.get("/admin/jobs", response_class=HTMLResponse)
    @job_pool
    def admin_jobs(request: Request) -> Response:
        s, p, _ = admin(request)
        # Each user's jobs live with that user's scheduler; listing all of them means asking as each user
        # who used the portal's job service (the local executor has no site-wide view). A few at a time,
        # within one deadline: a user whose operations hang or flood is named, not waited for.
        from concurrent.futures import ThreadPoolExecutor, wait

        error, items, missing = "", [], []
        try:
            jobs.gw()
            with site.db.session() as db:
                # only the users who ever submitted through the portal or the API: one query each
                names = sorted({e.actor for e in SiteService(db).audit_events(p, AuditQuery(action="job.submit",
                                                                                               limit=100000))})
            pool = ThreadPoolExecutor(4)
            futures = {pool.submit(jobs.list, n): n for n in names}
            done, _late = wait(futures, timeout=REPLY_TIMEOUT + 1)
            pool.shutdown(wait=False, cancel_futures=True)
            for f, n in sorted(futures.items(), key=lambda x: x[1]):
                if f in done and f.exception() is None:
                    items.extend(f.result())
                else:
                    missing.append(n)
            if missing:
                error = f"No answer for the jobs of: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}"
        except JobsUnavailable as e:
            error = e.message
        return page(request, "admin_jobs.html", s, "admin", jobs=items, error=error)

    def _audit_rows(request: Request, p: Principal, limit: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
        q = request.query_params
        filters = {k: q.get(k, "").strip() for k in ("action", "actor", "repository", "since", "until")}

        with site.db.session() as db:
            rows = SiteService(db).audit_events(p, AuditQuery(
                action=filters["action"], actor=filters["actor"], repository=filters["repository"],
                since=parse_day(filters["since"]), until=parse_day(filters["until"], end=True), limit=limit))
            out = [as_row(e, timespec="seconds") for e in rows]
        return out, filters

    @r.get("/admin/audit", response_class=HTMLResponse)
    @offload
    def admin_audit(request: Request) -> Response:
        s, p, _ = admin(request)
        rows, filters = _audit_rows(request, p, 500)
        qs = "&".join(f"{k}={quote(v)}" for k, v in filters.items() if v)
        return page(request, "admin_audit.html", s, "admin", rows=rows, f=filters, qs=qs)

    @r.get("/admin/audit.csv")
    def admin_audit_csv(request: Request) -> Response:
        _s, p, _ = admin(request)
        rows, _f = _audit_rows(request, p, 100000)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(COLUMNS)
        for x in rows:               # actors include the user names of failed logins: anyone's text
            w.writerow(csv_row([json.dumps(x[c], sort_keys=True) if c == "details" else x[c] for c in COLUMNS]))
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": content_disposition("nagaya-audit.csv")})

    @r.get("/admin/audit.json")
    def admin_audit_json(request: Request) -> Response:
        _s, p, _ = admin(request)
        rows, _f = _audit_rows(request, p, 100000)
        return JSONResponse(rows, headers={"Content-Disposition": content_disposition("nagaya-audit.json")})

    return r
