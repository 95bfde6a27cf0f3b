"""The JSON API under /api, one module per resource, described by OpenAPI at /openapi.json. The CLI and
scripts use it; each handler authenticates, calls a part (store services, server/images.py, the job
service) and shapes the answer."""

from __future__ import annotations

from fastapi import APIRouter

from nagaya.server.api import admin, audit, auth, images, jobs, projects, tokens
from nagaya.server.base import Site
from nagaya.server.job_service import JobService


def routers(site: Site, job_service: JobService) -> list[APIRouter]:
    return [auth.router(site), projects.router(site), tokens.router(site), images.router(site), audit.router(site),
            admin.router(site), jobs.router(site, job_service)]
