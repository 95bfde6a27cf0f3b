"""The web portal: server-rendered pages (Jinja2 + htmx), one module per page group over `base.Portal`.

Every page calls the same parts (the site database's services and `authz`, server/images.py, the job service) as the
API and the CLI; the portal only adds what a browser needs: cookie sessions (server-side, random ids, idle and
absolute expiry), a per-session CSRF token on every state-changing form, and HTML error pages (a 404 for
someone else's object looks exactly like a 404 for a missing one).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from nagaya.server.base import Site
from nagaya.server.job_service import JobService
from nagaya.server.portal import admin, auth, dashboard, image_size, images, job_terminal, jobs, projects, tokens
from nagaya.server.portal import apps as app_pages
from nagaya.server.portal.base import STATIC, Portal, make_templates
from nagaya.server.portal.sessions import Sessions


def install_portal(app: FastAPI, site: Site, job_service: JobService) -> None:
    """Mount the portal into the server's app: pages, static files (vendored htmx, CSS), templates."""
    app.state.templates = make_templates()
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.state.portal_sessions = sessions = Sessions(site.db)
    portal = Portal(site, job_service, sessions)
    for group in (auth, dashboard, images, image_size, projects, tokens, jobs, job_terminal, admin):
        app.include_router(group.router(portal))
    # Interactive apps (sessions of Jupyter or a web app) and their proxy: only where jobs can run.
    from nagaya.server.apps import from_settings, start_culler, state_dir_of

    state_dir = state_dir_of(job_service)
    if state_dir is not None:
        app.state.app_sessions = apps = from_settings(job_service, state_dir)      # the site's [apps] limits
        app.include_router(app_pages.router(portal, apps))
        from nagaya.server.api import apps as app_api

        app.include_router(app_api.router(site, apps))
        start_culler(apps)
        # Builds as batch jobs as the user (the Build page, /api/builds): through the same dispatcher.
        from nagaya.server.api import builds as build_api
        from nagaya.server.builds import Builds
        from nagaya.server.portal import builds as build_pages

        app.state.builds = builds = Builds(site, state_dir, job_service)
        app.include_router(build_pages.router(portal, builds))
        app.include_router(build_api.router(site, builds))
