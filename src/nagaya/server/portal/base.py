"""The portal's base: pages answer errors with HTML and send anonymous visitors to the login page; every page
group (one module each) works through `Portal`: the session with its current rights, CSRF, the principal,
rendering with the site's headers. Pages call the same parts (store, server/images.py, the job service) as the
API."""

from __future__ import annotations

import dataclasses
import hmac
import re
import shlex
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from nagaya.errors import AuthError, NagayaError, NotFound, PermissionDenied, UsageError
from nagaya.server.base import Site
from nagaya.server.job_service import JobService
from nagaya.server.portal.sessions import COOKIE, PRINCIPAL_TTL, Sessions, WebSession
from nagaya.server.status import http_status
from nagaya.sitedb import Principal, authorize
from nagaya.sitedb.models import utcnow
from nagaya.sitedb.service import SiteService
from nagaya.units import format_size, format_time

LOGIN_COOKIE = "nagaya_login"
DEVICE_COOKIE = "nagaya_device"    # a browser that logged in as a user before keeps its own password budget
DEVICE_DAYS = 365
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
STATIC = Path(__file__).resolve().parent.parent / "static"


class LoginRequired(Exception):
    pass


def render_error(request: Request, exc: NagayaError) -> Response:
    status = http_status(exc)
    templates: Jinja2Templates = request.app.state.templates
    sess = getattr(request.state, "web_session", None)
    out = templates.TemplateResponse(request, "error.html", {"status": status, "message": exc.message,
                                                             "s": sess, "nav": "", "flash": []}, status_code=status)
    page_headers(out)
    return out


class PortalRoute(APIRoute):
    """Page routes answer errors with an HTML page (the app's handler answers JSON, for the API), and send
    anonymous visitors to the login page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
                s: WebSession | None = getattr(request.state, "web_session", None)
                if s is not None and s.flash != s.flash_saved:       # a message for the next page, or one shown
                    await anyio.to_thread.run_sync(request.app.state.portal_sessions.save_flash, s)
                return response
            except LoginRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                if request.headers.get("hx-request"):
                    return Response(status_code=401, headers={"HX-Redirect": "/login"})
                return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
            except NagayaError as e:
                return render_error(request, e)
        return route


def page_headers(resp: Response) -> None:
    # Set on pages only (not on /token or the API: no per-request middleware on the hot paths).
    # Pages load nothing from elsewhere; no frames, no caching of personal pages.
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                               "script-src 'self'; frame-ancestors 'none'; form-action 'self'")
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-store"


# A tag or a digest (OCI distribution spec): anything else never reaches a registry URL or a header.
_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]{32,256}")


def check_ref(ref: str) -> None:
    if not _REF.fullmatch(ref):           # fullmatch: `$` would let a trailing newline through
        raise UsageError("not a tag or a digest: " + ascii(ref[:80]))


def command_words(command: str) -> list[str]:
    """A form's command line as the words it runs (shell quoting, no shell)."""
    try:
        return shlex.split(command)
    except ValueError as e:
        raise UsageError(f"cannot read the command: {e}") from None


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def client_address(request: Request) -> str:
    return request.client.host if request.client else "-"


def make_templates() -> Jinja2Templates:
    t = Jinja2Templates(directory=str(TEMPLATES))
    t.env.auto_reload = False       # templates change with the package, not under a running server: no stat per page
    t.env.filters["size"] = lambda n: format_size(n) if n else "—"
    t.env.filters["when"] = format_time
    t.env.filters["short"] = lambda d: (d or "").split(":")[-1][:12]
    t.env.filters["shjoin"] = lambda words: shlex.join(words or [])
    return t



class Portal:
    """What every page group needs: the site, the job service and the sessions, and the per-request steps
    of a page (the session and its current rights, CSRF, the principal, rendering, redirects)."""

    def __init__(self, site: Site, jobs: JobService, sessions: Sessions) -> None:
        self.site, self.jobs, self.sessions = site, jobs, sessions

    def sess_of(self, request: Request) -> WebSession:
        s = self.sessions.get(request.cookies.get(COOKIE))
        if s is None:
            raise LoginRequired()
        # Groups and admin rights as they are now (Site.rights: at most IDENTITY_TTL old), not as at login.
        rights = self.site.rights(s.user, s.groups)
        if rights is None:                             # the account is gone from the login backend
            self.sessions.drop(s.sid)
            raise LoginRequired()
        s.groups, s.is_admin = rights
        request.state.web_session = s
        return s

    def need_csrf(self, request: Request, s: WebSession, token: str) -> None:
        # The per-session token, plus Origin when the browser sends one (a cross-site form never has ours).
        sent = token or request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), s.csrf.encode()):
            raise PermissionDenied("the form expired or came from another site; reload the page and try again")
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.rstrip("/") != f"{request.url.scheme}://{request.url.netloc}":
            raise PermissionDenied("cross-site request refused")

    def principal(self, svc: SiteService, s: WebSession) -> Principal:
        now = time.time()
        cached = self.sessions.principals.get(s.key)
        if cached is not None and now - cached[1] < PRINCIPAL_TTL and (cached[2] is None or cached[2] > utcnow()):
            return dataclasses.replace(cached[0], groups=s.groups, is_admin=s.is_admin)   # rights: sess_of's
        user = svc.user(s.user)
        if user is None:
            raise LoginRequired()
        try:
            p = svc.principal(user, s.groups)          # also ends the session of an expired account
        except AuthError:
            self.sessions.drop(s.sid)
            raise LoginRequired() from None
        if len(self.sessions.principals) > 10000:
            self.sessions.principals.clear()                # a cache, not a registry of sessions
        self.sessions.principals[s.key] = (p, now, user.expires_at)
        return dataclasses.replace(p, groups=s.groups, is_admin=s.is_admin)

    def page(self, request: Request, name: str, s: WebSession | None, nav: str, status: int = 200,
             **ctx: Any) -> HTMLResponse:
        flash, s_flash = (list(s.flash), s) if s else ([], None)
        if s_flash:
            s_flash.flash.clear()
        out: HTMLResponse = request.app.state.templates.TemplateResponse(
            request, name, {"s": s, "nav": nav, "flash": flash, "registry": self.site.settings.registry, **ctx},
            status_code=status)
        page_headers(out)
        return out

    def image_choices(self, s: WebSession) -> list[Any]:
        """The images a form may offer this login (the Jobs and Sessions pages)."""
        with self.site.db.session() as db:
            svc = SiteService(db)
            return self.jobs.images(svc, self.principal(svc, s))

    def principal_of(self, s: WebSession) -> Principal:
        with self.site.db.session() as db:
            return self.principal(SiteService(db), s)

    def may_pull(self, s: WebSession, repository: str) -> None:
        """Pages of an image: a repository this login may not pull is a missing one (404), never a 403."""
        with self.site.db.session() as db:
            if "pull" not in authorize(db, self.principal(SiteService(db), s), repository, ["pull"]):
                raise NotFound(f"repository {repository} not found")

    def back(self, url: str, s: WebSession, kind: str = "", msg: str = "") -> RedirectResponse:
        if msg:
            s.flash.append((kind or "ok", msg))
        return RedirectResponse(url, status_code=303)

    def router(self) -> APIRouter:
        return APIRouter(route_class=PortalRoute, include_in_schema=False)
