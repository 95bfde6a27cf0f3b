"""Jobs: a submit form, the user's jobs, a live log, cancel; through the job service (the `Scheduler` protocol,
typed JobInfo), as the user."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.errors import NagayaError
from nagaya.sched.models import ACTIVE
from nagaya.sched.onbehalf import JobsUnavailable
from nagaya.server.offload import job_pool
from nagaya.server.portal.base import Portal, command_words
from nagaya.server.portal.usage_charts import job_charts


def router(portal: Portal) -> APIRouter:
    jobs, sess_of, need_csrf = portal.jobs, portal.sess_of, portal.need_csrf
    page, back = portal.page, portal.back
    r = portal.router()

    @r.get("/jobs", response_class=HTMLResponse)
    @job_pool
    def jobs_page(request: Request) -> Response:
        s = sess_of(request)
        choices = portal.image_choices(s)
        error, items = "", []
        try:
            items = jobs.list(s.user)
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
        words, p = command_words(command), portal.principal_of(s)
        job_id = jobs.submit(p, image, words, nodes, cpus, mem, gpus, time_limit, name)
        return back(f"/jobs/{quote(job_id)}", s, "ok", f"Job {job_id} submitted.")

    @r.get("/jobs/{job_id}", response_class=HTMLResponse)
    @job_pool
    def job(request: Request, job_id: str) -> Response:
        s = sess_of(request)
        info = jobs.status(s.user, job_id)
        return page(request, "job.html", s, "jobs", job=info, **usage_view(s.user, job_id))

    def usage_view(user: str, job_id: str) -> dict[str, Any]:
        try:                                # the charts are a picture: the page stands without them
            samples, note = jobs.usage(user, job_id), ""
        except NagayaError as e:
            samples, note = [], e.message
        samples = samples if isinstance(samples, list) else []
        return {"charts": job_charts(samples), "note": note,
                "gpus": max((int(x.get("gpus") or 0) for x in samples), default=0)}

    @r.get("/jobs/{job_id}/usage", response_class=HTMLResponse)
    @job_pool
    def job_usage(request: Request, job_id: str) -> Response:
        """The charts alone: the job page reloads them every few seconds while the job runs."""
        s = sess_of(request)
        info = jobs.status(s.user, job_id)
        return page(request, "_usage_charts.html", s, "jobs", job=info, **usage_view(s.user, job_id))

    @r.get("/jobs/{job_id}/log", response_class=HTMLResponse)
    @job_pool
    def job_log(request: Request, job_id: str) -> Response:
        s = sess_of(request)
        info = jobs.status(s.user, job_id)
        logs = jobs.logs(s.user, job_id)
        out = page(request, "job_log.html", s, "jobs", job=info, log=logs.log, truncated=logs.truncated,
                   done=info.state not in ACTIVE, controls=jobs.controls(info))
        return out

    @r.post("/jobs/{job_id}/cancel")
    @job_pool
    def cancel_job(request: Request, job_id: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        jobs.cancel(s.user, job_id)
        return back(f"/jobs/{quote(job_id)}", s, "ok", f"Job {job_id} cancelled.")

    def control(what: str, done: str) -> None:
        """POST /jobs/ID/suspend|resume|hold|release: the job's own page offers the ones its state allows."""
        @r.post(f"/jobs/{{job_id}}/{what}", name=f"{what}_job")
        @job_pool
        def endpoint(request: Request, job_id: str, csrf: str = Form("")) -> Response:
            s = sess_of(request)
            need_csrf(request, s, csrf)
            getattr(jobs, what)(s.user, job_id)
            return back(f"/jobs/{quote(job_id)}", s, "ok", f"Job {job_id} {done}.")

    for what, done in (("suspend", "suspended"), ("resume", "resumed"), ("hold", "held"), ("release", "released")):
        control(what, done)

    return r
