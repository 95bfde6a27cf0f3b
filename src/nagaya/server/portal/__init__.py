"""The web portal: server-rendered pages (Jinja2 + htmx), one module per page group over `base.Portal`.

Every page calls the same parts (the store's services and `authz`, server/images.py, the job service) as the
API and the CLI; the portal only adds what a browser needs: cookie sessions (server-side, random ids, idle and
absolute expiry), a per-session CSRF token on every state-changing form, and HTML error pages (a 404 for
someone else's object looks exactly like a 404 for a missing one).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from nagaya.server.base import Site
from nagaya.server.job_service import JobService
from nagaya.server.portal import admin, auth, dashboard, images, jobs, projects, tokens
from nagaya.server.portal.base import STATIC, Portal, make_templates
from nagaya.server.portal.sessions import Sessions


def install_portal(app: FastAPI, site: Site, job_service: JobService) -> None:
    """Mount the portal into the server's app: pages, static files (vendored htmx, CSS), templates."""
    app.state.templates = make_templates()
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.state.portal_sessions = sessions = Sessions(site.db)
    portal = Portal(site, job_service, sessions)
    for group in (auth, dashboard, images, projects, tokens, jobs, admin):
        app.include_router(group.router(portal))
