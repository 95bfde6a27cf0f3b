"""The web portal: server-rendered pages (Jinja2 + htmx) in the same app as the token service and the API.

Every page calls the same `SiteService` functions and `authz` rules as the API and the CLI; this module only
adds what a browser needs: cookie sessions (server-side, random ids, idle and absolute expiry), a per-session
CSRF token on every state-changing form, login rate limiting per user+IP, and HTML error pages (a 404 for
someone else's object looks exactly like a 404 for a missing one).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import re
import secrets
import shlex
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx
from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import bindparam, delete, insert, or_, select, update

from nagaya.encode import content_disposition, csv_row
from nagaya.errors import AuthError, NagayaError, NotFound, PermissionDenied, TooManyAttempts, UsageError
from nagaya.server import images as images_ops
from nagaya.server.jobs import REPLY_TIMEOUT, BoundedGateway, JobGateway, JobsUnavailable, SpoolGateway
from nagaya.server.offload import job_pool, offload
from nagaya.server.status import http_status
from nagaya.store import Database, Principal, authorize
from nagaya.store import service as svcmod
from nagaya.store.auditlog import COLUMNS, as_row
from nagaya.store.models import PortalSession, utcnow
from nagaya.store.service import MANIFEST_TYPES, SiteService
from nagaya.store.usage import usage_overview
from nagaya.units import format_size, format_time, parse_day

if TYPE_CHECKING:
    from nagaya.server.app import Site

log = logging.getLogger("nagaya.portal")
HERE = Path(__file__).parent
COOKIE = "nagaya_session"
LOGIN_COOKIE = "nagaya_login"
DEVICE_COOKIE = "nagaya_device"    # a browser that logged in as a user before keeps its own password budget
DEVICE_DAYS = 365
IDLE_TIMEOUT = 2 * 3600            # seconds without a request before a session ends
ABSOLUTE_TIMEOUT = 12 * 3600       # a working day, then log in again
PRINCIPAL_TTL = 30.0               # an admin's account expiry reaches open sessions within this many seconds


# ---- sessions, CSRF, rate limits --------------------------------------------------------------------------

@dataclass
class WebSession:
    sid: str
    user: str
    groups: frozenset[str]
    is_admin: bool
    csrf: str
    created: float
    seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)
    key: str = ""                             # what the database knows the session by: sha256 of the id
    flash_saved: list[tuple[str, str]] = field(default_factory=list)


def _session_key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class Sessions:
    """Server-side sessions in the database: logout really ends a session, and every server process (see
    `server.workers`) sees a login and a logout at once. The table keeps a hash of each id, never the id.

    `seen` is written at most every SEEN_RESOLUTION seconds (not on every page view: a write per view would
    serialize page views on the database's write lock), so the idle timeout may end a session up to that
    much early. The principal of a session is cached per process for PRINCIPAL_TTL (`principals`)."""

    SEEN_RESOLUTION = 60.0

    def __init__(self, db: Database, idle: float = IDLE_TIMEOUT, absolute: float = ABSOLUTE_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.idle, self.absolute, self.clock = db, idle, absolute, clock
        self.resolution = min(self.SEEN_RESOLUTION, idle / 4)
        self.principals: dict[str, tuple[Principal, float, datetime | None]] = {}
        t = PortalSession
        self._get = select(t.user, t.groups, t.is_admin, t.csrf, t.created, t.seen, t.flash) \
            .where(t.id_hash == bindparam("key"))

    def create(self, user: str, groups: frozenset[str], is_admin: bool) -> WebSession:
        now = self.clock()
        s = WebSession(secrets.token_urlsafe(32), user, groups, is_admin, secrets.token_urlsafe(32), now, now)
        s.key = _session_key(s.sid)
        with self.db.engine.begin() as c:
            c.execute(delete(PortalSession).where(or_(PortalSession.seen < now - self.idle,
                                                      PortalSession.created < now - self.absolute)))
            c.execute(insert(PortalSession).values(id_hash=s.key, user=user, groups=sorted(groups),
                                                   is_admin=is_admin, csrf=s.csrf, created=now, seen=now, flash=[]))
        return s

    def get(self, sid: str | None) -> WebSession | None:
        if not sid or len(sid) > 128:
            return None
        key = _session_key(sid)
        now = self.clock()
        with self.db.engine.begin() as c:
            row = c.execute(self._get, {"key": key}).first()
            if row is None:
                return None
            if now - row.seen > self.idle or now - row.created > self.absolute:
                c.execute(delete(PortalSession).where(PortalSession.id_hash == key))
                self.principals.pop(key, None)
                return None
            seen = row.seen
            if now - seen >= self.resolution:
                seen = now
                c.execute(update(PortalSession).where(PortalSession.id_hash == key).values(seen=now))
        flash = [(str(k), str(m)) for k, m in row.flash or []]
        return WebSession(sid, row.user, frozenset(row.groups or []), bool(row.is_admin), row.csrf, row.created,
                          seen, flash, key, list(flash))

    def save_flash(self, s: WebSession) -> None:
        """Keep the session's messages for its next page (called after a handler changed them)."""
        if s.flash == s.flash_saved:
            return
        with self.db.engine.begin() as c:
            c.execute(update(PortalSession).where(PortalSession.id_hash == s.key)
                      .values(flash=[list(x) for x in s.flash]))
        s.flash_saved = list(s.flash)

    def drop(self, sid: str | None) -> None:
        key = _session_key(sid or "")
        self.principals.pop(key, None)
        with self.db.engine.begin() as c:
            c.execute(delete(PortalSession).where(PortalSession.id_hash == key))


class LoginRequired(Exception):
    pass


def _render_error(request: Request, exc: NagayaError) -> Response:
    status = http_status(exc)
    templates: Jinja2Templates = request.app.state.templates
    sess = getattr(request.state, "web_session", None)
    out = templates.TemplateResponse(request, "error.html", {"status": status, "message": exc.message,
                                                             "s": sess, "nav": "", "flash": []}, status_code=status)
    _page_headers(out)
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
                return _render_error(request, e)
        return route


def _page_headers(resp: Response) -> None:
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


def _check_ref(ref: str) -> None:
    if not _REF.fullmatch(ref):           # fullmatch: `$` would let a trailing newline through
        raise UsageError("not a tag or a digest: " + ascii(ref[:80]))


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def make_templates() -> Jinja2Templates:
    t = Jinja2Templates(directory=str(HERE / "templates"))
    t.env.auto_reload = False       # templates change with the package, not under a running server: no stat per page
    t.env.filters["size"] = lambda n: format_size(n) if n else "—"
    t.env.filters["when"] = format_time
    t.env.filters["short"] = lambda d: (d or "").split(":")[-1][:12]
    t.env.filters["shjoin"] = lambda words: shlex.join(words or [])
    return t


# ---- jobs, shared by the pages and the API -----------------------------------------------------------------

class JobService:
    """The portal's job operations over a gateway (jobs.py), always on behalf of one logged-in user."""

    SEEN_UP_TTL = 2.0               # the dashboard asks on every view; the dispatcher's pid file changes rarely

    def __init__(self, site: Site, gateway: JobGateway | None) -> None:
        self.site, self.gateway = site, gateway
        self._seen_up = -self.SEEN_UP_TTL

    def available(self, recent: bool = False) -> bool:
        """Whether jobs can run; `recent` accepts a positive answer up to SEEN_UP_TTL old (the dashboard's
        tile), operations always look afresh. A negative answer is never reused: a dispatcher just started
        shows at once."""
        inner = self.gateway.inner if isinstance(self.gateway, BoundedGateway) else self.gateway
        if inner is None or not isinstance(inner, SpoolGateway):
            return inner is not None
        now = time.monotonic()
        if recent and now - self._seen_up < self.SEEN_UP_TTL:
            return True
        ok = self.gateway.available()
        if ok:
            self._seen_up = now
        return ok

    def gw(self) -> JobGateway:
        if self.gateway is None or not self.available():
            raise JobsUnavailable("Jobs are not enabled on this site yet: the job service is not running. "
                                  "Ask your admins to start it.")
        return self.gateway

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        """One operation as `user`. The jobs' owner shown is that user, whom the server asked for, never
        what the user's own scheduler state claims."""
        out = self.gw().call(user, op, args)
        for j in (out if op == "list" and isinstance(out, list) else [out] if op == "status" else []):
            if isinstance(j, dict):
                j["user"] = user
        return out

    def images(self, svc: SiteService, p: Principal) -> list[str]:
        """What a job may run: every tag the user may list (their own, their groups', the site's)."""
        reg = self.site.settings.registry
        return [f"{reg}/{repo.name}:{t.tag}" for repo in svc.repositories(p) for t in svc.tags(p, repo.name)]

    def submit(self, p: Principal, image: str, command: list[str], nodes: int = 1, cpus: int = 1, mem: str = "",
               gpus: str = "", time_limit: str = "", name: str = "", via: str = "portal") -> str:
        from nagaya.sched.models import parse_time

        settings = self.site.settings
        if not (1 <= nodes <= 64 and 1 <= cpus <= 1024):
            raise UsageError("nodes must be 1–64 and CPUs 1–1024")
        limit = parse_time(time_limit)
        with self.site.db.session() as db:
            svc = SiteService(db)
            reg = settings.registry
            # The digest the tag points at now: what the job runs, whenever it starts.
            digest = next((t.digest for repo in svc.repositories(p) for t in svc.tags(p, repo.name)
                           if f"{reg}/{repo.name}:{t.tag}" == image), "")
            if not digest:
                raise NotFound(f"image {image} not found among yours")
            user = svc.user(p.name)
            assert user is not None
            # A personal token so the job's pull runs with the user's own rights, nobody else's: used at once
            # by the dispatcher, when the job starts by slurmrestd (which says how long it may wait).
            hours = getattr(self.gateway, "pull_token_hours", 0)
            new = svc.issue_user_token(user, "portal-job", timedelta(hours=hours) if hours else timedelta(minutes=15))
        spec = {"image": image, "digest": digest, "command": command, "nodes": nodes, "cpus": cpus,
                "mem": mem.strip()[:32], "gpus": gpus.strip()[:32], "time_limit": limit, "name": name.strip()[:64]}
        out = self.gw().call(p.name, "submit", {"spec": spec, "login": {
            "registry": settings.registry, "server": settings.url, "username": p.name, "secret": new.secret}})
        job_id = str(out["id"])
        with self.site.db.session() as db:
            SiteService(db).audit("job.submit", p.name, digest=digest, details={
                "job": job_id, "image": image, "via": via, "backend": settings.portal_submit, "command": command,
                "nodes": nodes, "cpus": cpus, "mem": spec["mem"], "gpus": spec["gpus"], "time_limit": limit})
        return job_id

    def cancel(self, user: str, job_id: str, via: str = "portal") -> None:
        self.gw().call(user, "cancel", {"job_id": job_id})
        with self.site.db.session() as db:
            SiteService(db).audit("job.cancel", user, details={"job": job_id, "via": via})


def default_jobs(site: Site) -> JobService:
    """slurmrestd with a JWT per user (server/slurmrest.py), or the site's spool (STATE_DIR/jobs-spool), served
    by `python -m nagaya.server.jobs dispatch` as root."""
    key = site.settings.signing_key
    if not key:
        return JobService(site, None)
    state_dir = Path(key).parent.parent
    if site.settings.portal_submit == "slurmrestd":
        from nagaya.server.slurmrest import from_settings

        return JobService(site, BoundedGateway(from_settings(site.settings, state_dir)))
    return JobService(site, BoundedGateway(SpoolGateway(state_dir / "jobs-spool")))


# ---- the router ---------------------------------------------------------------------------------------------

def portal_router(site: Site, jobs: JobService, sessions: Sessions) -> APIRouter:
    settings = site.settings
    r = APIRouter(route_class=PortalRoute, include_in_schema=False)

    def sess_of(request: Request) -> WebSession:
        s = sessions.get(request.cookies.get(COOKIE))
        if s is None:
            raise LoginRequired()
        # Groups and admin rights as they are now (Site.rights: at most IDENTITY_TTL old), not as at login.
        rights = site.rights(s.user, s.groups)
        if rights is None:                             # the account is gone from the login backend
            sessions.drop(s.sid)
            raise LoginRequired()
        s.groups, s.is_admin = rights
        request.state.web_session = s
        return s

    def need_csrf(request: Request, s: WebSession, token: str) -> None:
        # The per-session token, plus Origin when the browser sends one (a cross-site form never has ours).
        sent = token or request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), s.csrf.encode()):
            raise PermissionDenied("the form expired or came from another site; reload the page and try again")
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.rstrip("/") != f"{request.url.scheme}://{request.url.netloc}":
            raise PermissionDenied("cross-site request refused")

    def principal(svc: SiteService, s: WebSession) -> Principal:
        now = time.time()
        cached = sessions.principals.get(s.key)
        if cached is not None and now - cached[1] < PRINCIPAL_TTL and (cached[2] is None or cached[2] > utcnow()):
            return dataclasses.replace(cached[0], groups=s.groups, is_admin=s.is_admin)   # rights: sess_of's
        user = svc.user(s.user)
        if user is None:
            raise LoginRequired()
        try:
            p = svc.principal(user, s.groups)          # also ends the session of an expired account
        except AuthError:
            sessions.drop(s.sid)
            raise LoginRequired() from None
        if len(sessions.principals) > 10000:
            sessions.principals.clear()                # a cache, not a registry of sessions
        sessions.principals[s.key] = (p, now, user.expires_at)
        return dataclasses.replace(p, groups=s.groups, is_admin=s.is_admin)

    def page(request: Request, name: str, s: WebSession | None, nav: str, status: int = 200,
             **ctx: Any) -> HTMLResponse:
        flash, s_flash = (list(s.flash), s) if s else ([], None)
        if s_flash:
            s_flash.flash.clear()
        out: HTMLResponse = request.app.state.templates.TemplateResponse(
            request, name, {"s": s, "nav": nav, "flash": flash, "registry": settings.registry, **ctx},
            status_code=status)
        _page_headers(out)
        return out

    def back(url: str, s: WebSession, kind: str = "", msg: str = "") -> RedirectResponse:
        if msg:
            s.flash.append((kind or "ok", msg))
        return RedirectResponse(url, status_code=303)

    # ---- login / logout --------------------------------------------------------------------------------

    @r.get("/", response_class=HTMLResponse)
    def root(request: Request) -> Response:
        return RedirectResponse("/dashboard" if sessions.get(request.cookies.get(COOKIE)) else "/login",
                                status_code=303)

    def login_page(request: Request, error: str = "", status: int = 200, username: str = "",
                   next: str | None = None) -> HTMLResponse:
        token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        out = page(request, "login.html", None, "", status=status, error=error, login_csrf=token,
                   next=request.query_params.get("next", "") if next is None else next, username=username,
                   auth=settings.auth)
        out.set_cookie(LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict", secure=_secure(request))
        return out

    @r.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        if sessions.get(request.cookies.get(COOKIE)):
            return RedirectResponse("/dashboard", status_code=303)
        return login_page(request)

    @r.post("/login", response_class=HTMLResponse)
    def login(request: Request, username: str = Form(""), password: str = Form(""), csrf: str = Form(""),
              next: str = Form("")) -> Response:
        # Login CSRF: the form's token must match the cookie set with the form (double submit).
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), csrf.encode()):
            return login_page(request, "Your login form expired. Please try again.", 400, username, next)
        username = username.strip()
        try:            # counts failures and refuses guessers (Site.password_login), as /token and the API do
            with site.db.session() as db:
                p = site.password_login(SiteService(db), username, password, _client(request), "portal",
                                        request.cookies.get(DEVICE_COOKIE))
        except TooManyAttempts as e:
            return login_page(request, f"Too many failed attempts. Please {e.message.split('; ')[1]}, or log in "
                              "from a browser you logged in with before.", 429, username, next)
        except AuthError as e:
            msg = e.message if "expired" in e.message else "Wrong username or password."
            return login_page(request, msg, 401, username, next)
        s = sessions.create(p.name, p.groups, p.is_admin)
        request.state.web_session = s                  # its first messages are saved with it (PortalRoute)
        from nagaya.server.app import NOTES  # an account about to expire: say so on the first page

        if (warning := (NOTES.get() or {}).get("warning")):
            s.flash.append(("warn", warning))
        dest = next if next.startswith("/") and not next.startswith("//") else "/dashboard"
        out = RedirectResponse(dest, status_code=303)
        out.set_cookie(COOKIE, s.sid, httponly=True, samesite="lax", secure=_secure(request), path="/")
        out.set_cookie(DEVICE_COOKIE, site.devices.issue(p.name), max_age=DEVICE_DAYS * 86400, httponly=True,
                       samesite="strict", secure=_secure(request), path="/login")
        out.delete_cookie(LOGIN_COOKIE)
        return out

    @r.post("/logout")
    def logout(request: Request, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        sessions.drop(s.sid)
        with site.db.session() as db:
            SiteService(db).audit("logout", s.user, details={"via": "portal"})
        out = RedirectResponse("/login", status_code=303)
        out.delete_cookie(COOKIE, path="/")
        return out

    # ---- dashboard ---------------------------------------------------------------------------------------

    @r.get("/dashboard", response_class=HTMLResponse)
    @offload
    def dashboard(request: Request) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            info = svcmod.summary(svc, principal(svc, s))
        return page(request, "dashboard.html", s, "dashboard", projects=info.projects, repos=info.repositories[:8],
                    n_repos=len(info.repositories), n_tokens=info.active_tokens,
                    jobs_on=jobs.available(recent=True))

    # ---- images ------------------------------------------------------------------------------------------

    @r.get("/images", response_class=HTMLResponse)
    @offload
    def images(request: Request, project: str = "") -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            p = principal(svc, s)
            projects = svc.projects(p)
            repos = svc.repositories(p, project or None)
        groups: dict[str, list[Any]] = {}
        for x in repos:
            groups.setdefault(x.project, []).append(x)
        kinds = {pr.name: pr.kind for pr in projects}
        order = sorted(groups, key=lambda n: (["personal", "group", "site"].index(kinds.get(n, "group")), n))
        return page(request, "images.html", s, "images", groups=[(n, kinds.get(n, ""), groups[n]) for n in order],
                    project=project, projects=projects)

    @r.get("/images/{repository:path}", response_class=HTMLResponse)
    @offload
    def repository(request: Request, repository: str) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            p = principal(svc, s)
            tags = svc.tags(p, repository)
            can_delete = "delete" in authorize(db, p, repository, ["delete"])
        ref = f"{settings.registry}/{repository}"
        return page(request, "repository.html", s, "images", repository=repository, tags=tags, ref=ref,
                    can_delete=can_delete, quote=shlex.quote)

    @r.get("/manifest/{repository:path}")
    def manifest(request: Request, repository: str, ref: str) -> Response:
        """The image's OCI manifest as a file: what `skopeo`/`nagaya pull` fetch first (no single-file export
        exists yet)."""
        s = sess_of(request)
        _check_ref(ref)
        with site.db.session() as db:
            p = principal(SiteService(db), s)
            if "pull" not in authorize(db, p, repository, ["pull"]):
                raise NotFound(f"repository {repository} not found")
        try:
            resp = images_ops.registry_call(site, "GET", f"manifests/{ref}", s.user, repository, ["pull"],
                                            headers={"Accept": ", ".join(MANIFEST_TYPES)})
        except httpx.HTTPError as e:
            raise UsageError(f"the registry did not answer: {e}") from None
        if resp.status_code == 404:
            raise NotFound(f"{repository}:{ref} not found")
        if resp.status_code != 200:
            raise UsageError(f"the registry answered {resp.status_code}")
        name = f"{repository.replace('/', '_')}_{ref.replace(':', '-')[:24]}.manifest.json"
        return Response(resp.content, media_type=resp.headers.get("content-type", "application/json"),
                        headers={"Content-Disposition": content_disposition(name)})

    @r.get("/download/{repository:path}")
    def download(request: Request, repository: str, ref: str, tag: str = "latest") -> Response:
        """The image as one OCI archive file, streamed from the registry (see download.py)."""
        from fastapi.responses import StreamingResponse

        from nagaya.server.download import Archive

        s = sess_of(request)
        _check_ref(ref)
        with site.db.session() as db:
            p = principal(SiteService(db), s)
            if "pull" not in authorize(db, p, repository, ["pull"]):
                raise NotFound(f"repository {repository} not found")
        tag = re.sub(r"[^A-Za-z0-9._-]", "_", tag)[:128] or "latest"

        def auth() -> dict[str, str]:
            tok = site.issuer.issue(s.user, [{"type": "repository", "name": repository, "actions": ["pull"]}])
            return {"Authorization": f"Bearer {tok['token']}"}

        http = httpx.Client(timeout=60, follow_redirects=True)
        base = f"http://{settings.registry}/v2/{repository}"
        try:
            resp = http.get(f"{base}/manifests/{ref}", headers={**auth(), "Accept": ", ".join(MANIFEST_TYPES)})
            if resp.status_code == 404:
                raise NotFound(f"{repository}@{ref} not found")
            if resp.status_code != 200:
                raise UsageError(f"the registry answered {resp.status_code}")
            digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
            if ref.startswith("sha256:") and ref != digest:
                raise UsageError("the registry sent a manifest that does not match its digest")
            media_type = resp.headers.get("content-type", "").split(";")[0].strip()
            archive = Archive(http, base, auth, resp.content, media_type, digest, tag)
        except (httpx.HTTPError, NagayaError) as e:
            http.close()
            if isinstance(e, NagayaError):
                raise
            raise UsageError(f"the registry did not answer: {e}") from None

        def body() -> Iterator[bytes]:
            try:
                yield from archive.stream()
            finally:
                http.close()

        name = f"{repository.replace('/', '_')}_{tag}.oci.tar"
        with site.db.session() as db:
            SiteService(db).audit("image.download", s.user, repository=repository, tag=tag, digest=digest,
                                  source=_client(request)[:64], details={"via": "portal"})
        return StreamingResponse(body(), media_type="application/x-tar", headers={
            "Content-Length": str(archive.length), "Content-Disposition": content_disposition(name)})

    @r.post("/images/delete")
    def delete_image(request: Request, repository: str = Form(...), digest: str = Form(...),
                     csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        with site.db.session() as db:
            p = principal(SiteService(db), s)
        images_ops.delete_image(site, p, repository, digest)
        rest = f"/images/{repository}"
        with site.db.session() as db:
            try:
                SiteService(db).tags(principal(SiteService(db), s), repository)
            except NotFound:
                rest = "/images"
        return back(rest, s, "ok", f"Deleted {repository}@{digest[:19]}…")

    # ---- projects ----------------------------------------------------------------------------------------

    @r.get("/projects", response_class=HTMLResponse)
    @offload
    def projects(request: Request) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            items = svc.projects(principal(svc, s))
        return page(request, "projects.html", s, "projects", projects=items)

    @r.post("/projects")
    def create_project(request: Request, name: str = Form(...), kind: str = Form("group"),
                       csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        name = name.strip().lower()
        with site.db.session() as db:
            svc = SiteService(db)
            svc.create_project(principal(svc, s), name, kind, site.name_reserved)
        return back(f"/projects/{name}", s, "ok", f"Project {name} created. You are its owner.")

    @r.get("/projects/{name}", response_class=HTMLResponse)
    @offload
    def project(request: Request, name: str) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            p = principal(svc, s)
            info = svc.project_info(p, name)
            try:
                members = svc.members(p, name)
            except PermissionDenied:
                members = None
            repos = svc.repositories(p, name)
            manage = p.is_admin or info.role in ("owner", "maintainer")
            tokens = svc.robots(p, name) if manage else []
        return page(request, "project.html", s, "projects", project=info, members=members, repos=repos,
                    tokens=tokens, is_owner=p.is_admin or info.role == "owner", manage=manage)

    @r.post("/projects/{name}/members")
    def add_member(request: Request, name: str, member: str = Form(...), kind: str = Form("user"),
                   role: str = Form(...), csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        member = member.strip()
        with site.db.session() as db:
            svc = SiteService(db)
            site.add_member(svc, principal(svc, s), name, member, kind, role)
        return back(f"/projects/{name}", s, "ok", f"{member} is now {role} of {name}.")

    @r.post("/projects/{name}/members/remove")
    def remove_member(request: Request, name: str, member: str = Form(...), kind: str = Form("user"),
                      csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        with site.db.session() as db:
            svc = SiteService(db)
            svc.remove_member(principal(svc, s), name, member, kind)
        return back(f"/projects/{name}", s, "ok", f"Removed {member} from {name}.")

    # ---- robot tokens ------------------------------------------------------------------------------------

    @r.get("/tokens", response_class=HTMLResponse)
    @offload
    def tokens(request: Request) -> Response:
        s = sess_of(request)
        with site.db.session() as db:
            svc = SiteService(db)
            p = principal(svc, s)
            items = svc.robots(p)
            manageable = [x for x in svc.projects(p) if p.is_admin or x.role in ("owner", "maintainer")]
        return page(request, "tokens.html", s, "tokens", tokens=items, projects=manageable)

    def _secret_page(request: Request, s: WebSession, info: Any, new: Any, what: str) -> Response:
        out = page(request, "secret.html", s, "tokens", info=info, new=new, what=what)
        return out

    @r.post("/tokens", response_class=HTMLResponse)
    def create_token(request: Request, project: str = Form(...), name: str = Form(...), scope: str = Form("pull"),
                     expires_days: int = Form(0), csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        if expires_days < 0 or expires_days > 3650:
            raise UsageError("expiry must be between 0 (never) and 3650 days")
        with site.db.session() as db:
            svc = SiteService(db)
            expires = utcnow() + timedelta(days=expires_days) if expires_days else None
            info, new = svc.create_robot(principal(svc, s), project, name.strip(), scope, expires)
        return _secret_page(request, s, info, new, "created")

    @r.post("/tokens/{project}/{name}/revoke")
    def revoke_token(request: Request, project: str, name: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        with site.db.session() as db:
            svc = SiteService(db)
            svc.revoke_robot(principal(svc, s), project, name)
        return back("/tokens", s, "ok", f"Token {name} of {project} revoked: it no longer works.")

    @r.post("/tokens/{project}/{name}/rotate", response_class=HTMLResponse)
    def rotate_token(request: Request, project: str, name: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        with site.db.session() as db:
            svc = SiteService(db)
            info, new = svcmod.rotate_robot(svc, principal(svc, s), project, name)
        return _secret_page(request, s, info, new, "rotated")

    # ---- jobs --------------------------------------------------------------------------------------------

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

    # ---- admin -------------------------------------------------------------------------------------------

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
            users = svcmod.users_overview(SiteService(db), p)
            usage = usage_overview(db, p)
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
                names = sorted({e.actor for e in svcmod.search_audit(SiteService(db), p, action="job.submit",
                                                                     limit=100000)})
            pool = ThreadPoolExecutor(4)
            futures = {pool.submit(jobs.call, n, "list", {}): n for n in names}
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
            rows = svcmod.search_audit(SiteService(db), p, action=filters["action"], actor=filters["actor"],
                                       repository=filters["repository"], since=parse_day(filters["since"]),
                                       until=parse_day(filters["until"], end=True), limit=limit)
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


def install_portal(app: Any, site: Site) -> None:
    """Mount the portal into the server's app: pages, static files (vendored htmx, CSS), templates."""
    from fastapi.staticfiles import StaticFiles

    app.state.templates = make_templates()
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    jobs = default_jobs(site)
    app.state.portal_sessions = sessions = Sessions(site.db)
    app.include_router(portal_router(site, jobs, sessions))
    app.include_router(jobs_api_router(site, jobs))


class JobSubmit(BaseModel):
    image: str = Field(description="HOST:PORT/PROJECT/NAME:TAG, one of the images you may pull")
    command: list[str] = Field(default_factory=list)
    nodes: int = Field(1, ge=1, le=64)
    cpus: int = Field(1, ge=1, le=1024)
    mem: str = Field("", max_length=32)
    gpus: str = Field("", max_length=32)
    time_limit: str = Field("", max_length=32, description="Slurm forms: MIN, H:MM:SS, D-H:MM:SS")
    name: str = Field("", max_length=64)


def jobs_api_router(site: Site, jobs: JobService) -> APIRouter:
    """/api/jobs: the same operations as the Jobs page, for personal access tokens (robots run no jobs)."""
    from nagaya.server.app import _basic, _json

    r = APIRouter(prefix="/api/jobs", tags=["jobs"])

    def user(request: Request) -> Principal:
        with site.db.session() as db:
            p = site.principal(SiteService(db), _basic(request), allow_password=False)
        if p.kind != "user":
            raise AuthError("jobs need a user's personal access token") if not p.authenticated else \
                PermissionDenied("robot tokens cannot run jobs")
        return p

    @r.get("", summary="Your jobs")
    @job_pool
    def list_jobs(request: Request) -> Any:
        return _json(jobs.call(user(request).name, "list", {}))

    @r.post("", status_code=201, summary="Submit a job as yourself")
    @job_pool
    def submit(request: Request, body: JobSubmit) -> dict[str, Any]:
        p = user(request)
        return {"id": jobs.submit(p, body.image, body.command, body.nodes, body.cpus, body.mem, body.gpus,
                                  body.time_limit, body.name, via="api")}

    @r.get("/{job_id}", summary="One of your jobs")
    @job_pool
    def status(request: Request, job_id: str) -> Any:
        return jobs.call(user(request).name, "status", {"job_id": job_id})

    @r.get("/{job_id}/log", summary="The end of a job's output (64 KiB)")
    @job_pool
    def log(request: Request, job_id: str) -> Any:
        return jobs.call(user(request).name, "logs", {"job_id": job_id})

    @r.delete("/{job_id}", summary="Cancel one of your jobs")
    @job_pool
    def cancel(request: Request, job_id: str) -> dict[str, Any]:
        jobs.cancel(user(request).name, job_id, via="api")
        return {"cancelled": job_id}

    return r
