"""/api/jobs: the same operations as the Jobs page, for personal access tokens (JobInfo as its JSON)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from nagaya.errors import AuthError, PermissionDenied
from nagaya.server.base import Site, credentials
from nagaya.server.job_service import JobService
from nagaya.server.offload import job_pool
from nagaya.sitedb import Principal
from nagaya.sitedb.service import SiteService


class JobSubmit(BaseModel):
    image: str = Field(description="HOST:PORT/PROJECT/NAME:TAG, one of the images you may pull")
    command: list[str] = Field(default_factory=list)
    nodes: int = Field(1, ge=1, le=64)
    cpus: int = Field(1, ge=1, le=1024)
    mem: str = Field("", max_length=32)
    gpus: str = Field("", max_length=32)
    time_limit: str = Field("", max_length=32, description="Slurm forms: MIN, H:MM:SS, D-H:MM:SS")
    name: str = Field("", max_length=64)


def router(site: Site, jobs: JobService) -> APIRouter:
    """/api/jobs: the same operations as the Jobs page, for personal access tokens (robots run no jobs)."""
    r = APIRouter(prefix="/api/jobs", tags=["jobs"])

    def user(request: Request) -> Principal:
        with site.db.session() as db:
            p = site.principal(SiteService(db), credentials(request), allow_password=False)
        if p.kind != "user":
            raise AuthError("jobs need a user's personal access token") if not p.authenticated else \
                PermissionDenied("robot tokens cannot run jobs")
        return p

    @r.get("", summary="Your jobs")
    @job_pool
    def list_jobs(request: Request) -> Any:
        return [j.to_json() for j in jobs.list(user(request).name)]

    @r.post("", status_code=201, summary="Submit a job as yourself")
    @job_pool
    def submit(request: Request, body: JobSubmit) -> dict[str, Any]:
        p = user(request)
        return {"id": jobs.submit(p, body.image, body.command, body.nodes, body.cpus, body.mem, body.gpus,
                                  body.time_limit, body.name, via="api")}

    @r.get("/{job_id}", summary="One of your jobs")
    @job_pool
    def status(request: Request, job_id: str) -> Any:
        return jobs.status(user(request).name, job_id).to_json()

    @r.get("/{job_id}/log", summary="The end of a job's output (64 KiB)")
    @job_pool
    def log(request: Request, job_id: str) -> Any:
        return jobs.logs(user(request).name, job_id).to_dict()

    @r.get("/{job_id}/usage", summary="A job's CPU, memory and GPU use over time (samples, oldest first)")
    @job_pool
    def usage(request: Request, job_id: str) -> Any:
        return jobs.usage(user(request).name, job_id)

    @r.delete("/{job_id}", summary="Cancel one of your jobs")
    @job_pool
    def cancel(request: Request, job_id: str) -> dict[str, Any]:
        jobs.cancel(user(request).name, job_id, via="api")
        return {"cancelled": job_id}

    def control(what: str, done: str, summary: str) -> None:
        @r.post(f"/{{job_id}}/{what}", summary=summary, name=f"{what}_job")
        @job_pool
        def endpoint(request: Request, job_id: str) -> dict[str, Any]:
            getattr(jobs, what)(user(request).name, job_id, via="api")
            return {done: job_id}

    control("suspend", "suspended", "Suspend one of your running jobs (where the scheduler lets users)")
    control("resume", "resumed", "Resume one of your suspended jobs")
    control("hold", "held", "Keep one of your pending jobs from starting")
    control("release", "released", "Let one of your held jobs start")

    return r
