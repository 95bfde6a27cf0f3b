"""The server's FastAPI application, assembled: the registry token service (`GET /token`), the JSON API
(api/), the registry's notification sink and the web portal (portal/), over one `Site` (base.py)."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

from nagaya import __version__
from nagaya.errors import NagayaError
from nagaya.server import api, notifications, scans, token_service
from nagaya.server.authn import Authenticator
from nagaya.server.base import NotesMiddleware, Site
from nagaya.server.job_service import default_jobs
from nagaya.server.portal import install_portal
from nagaya.server.settings import ServerSettings
from nagaya.server.status import json_error

SETTINGS_ENV = "NAGAYA_SERVER_SETTINGS"


def create_app(settings: ServerSettings, authenticator: Authenticator | None = None) -> FastAPI:
    site = Site(settings, authenticator)
    app = FastAPI(title="nagaya", version=__version__,
                  description="nagaya site server: registry token service, projects, roles and tokens")
    app.state.site = site
    app.add_middleware(NotesMiddleware)
    app.add_exception_handler(NagayaError, json_error)  # type: ignore[arg-type]  # pages answer HTML themselves
    jobs = default_jobs(site)
    app.include_router(token_service.router(site))
    for router in api.routers(site, jobs):
        app.include_router(router)
    app.include_router(notifications.router(site))
    app.include_router(scans.router(site))
    install_portal(app, site, jobs)
    return app


def app_from_env() -> FastAPI:
    """uvicorn's app factory for each server process (`python -m nagaya.server` sets SETTINGS_ENV)."""
    return create_app(ServerSettings.load(Path(os.environ[SETTINGS_ENV])))
