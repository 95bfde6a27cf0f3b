"""Jobs: a submit form, the user's jobs, a live log, cancel; through the job service, as the user."""

from __future__ import annotations

import shlex
from urllib.parse import quote

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.errors import NagayaError, UsageError
from nagaya.server.jobs import JobsUnavailable
from nagaya.server.offload import job_pool
from nagaya.server.portal.base import Portal
from nagaya.store.service import SiteService


def router(portal: Portal) -> APIRouter:
    site, jobs, sess_of, need_csrf = portal.site, portal.jobs, portal.sess_of, portal.need_csrf
    principal, page, back = portal.principal, portal.page, portal.back
    r = portal.router()

    @r.get("/jobs", response_class=HTMLResponse)
    @job_pool
    def jobs_page(request: Request) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            choices = jobs.images(svc, principal(svc, s))
        error, items = "", []
        try:
            items = jobs.call(s.user, "list", {})
        except JobsUnavailable as e:
            error = e.message
        except NagayaError as e:
            error = f"Could not list your jobs: {e.message}"
        return page(request, "jobs.html", s, "jobs", images=choices, jobs=items, error=error)

    @r.post("/jobs")
    @job_pool
    def submit_job(request: Request, image: str = Form(...), command: str = Form(""), nodes: int = Form(1),
                   cpus: int = Form(1), mem: str = Form(""), gpus: str = Form(""), time_limit: str = Form(""),
                   name: str = Form(""), csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        try:
            words = shlex.split(command)
        except ValueError as e:
            raise UsageError(f"cannot read the command: {e}") from None
        with site.db.session() as db:
            p = principal(SiteService(db), s)
        job_id = jobs.submit(p, image, words, nodes, cpus, mem, gpus, time_limit, name)
        return back(f"/jobs/{quote(job_id)}", s, "ok", f"Job {job_id} submitted.")

    @r.get("/jobs/{job_id}", response_class=HTMLResponse)
    @job_pool
    def job(request: Request, job_id: str) -> Response:
        s = sess_of(request)
        info = jobs.call(s.user, "status", {"job_id": job_id})
        return page(request, "job.html", s, "jobs", job=info)

    @r.get("/jobs/{job_id}/log", response_class=HTMLResponse)
    @job_pool
    def job_log(request: Request, job_id: str) -> Response:
        s = sess_of(request)
        info = jobs.call(s.user, "status", {"job_id": job_id})
        logs = jobs.call(s.user, "logs", {"job_id": job_id})
        out = page(request, "job_log.html", s, "jobs", job=info, log=logs.get("log", ""),
                   truncated=logs.get("truncated"), done=info.get("state") not in ("PENDING", "RUNNING", "SUSPENDED"))
        return out

    @r.post("/jobs/{job_id}/cancel")
    @job_pool
    def cancel_job(request: Request, job_id: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        jobs.cancel(s.user, job_id)
        return back(f"/jobs/{quote(job_id)}", s, "ok", f"Job {job_id} cancelled.")

    return r
