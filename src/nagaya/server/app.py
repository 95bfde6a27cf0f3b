"""The FastAPI application: the registry token service (`GET /token`), the JSON API under /api and the
registry's notification sink. Handlers are thin: authenticate, call `SiteService`, shape the answer."""

from __future__ import annotations

import base64
import binascii
import contextvars
import hmac
import json
import logging
import os
import time
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from nagaya import __version__
from nagaya.errors import (
    AuthError,
    NagayaError,
    NotFound,
    PermissionDenied,
    TooManyAttempts,
    UsageError,
)
from nagaya.server.authn import Authenticator, Identity, make_authenticator
from nagaya.server.images import delete_image
from nagaya.server.offload import quick
from nagaya.server.ratelimit import DEVICE_PREFIX, Devices, LoginLimiter
from nagaya.server.settings import ServerSettings
from nagaya.server.status import http_status, retry_after
from nagaya.server.tokens import Scope, TokenIssuer
from nagaya.store import Database, Principal, authorize, lifecycle
from nagaya.store.auditlog import as_row
from nagaya.store.models import Project, Repository, Tag, utcnow
from nagaya.store.service import MANIFEST_TYPES, ROBOT_RE, MemberInfo, SiteService, rotate_robot
from nagaya.store.usage import usage_overview
from nagaya.units import naive_utc

log = logging.getLogger("nagaya.server")
# Per request: a note for the caller (an account about to expire), sent as the X-Nagaya-Warning header.
# A dict, not a value: handlers run in a copied context (thread pool) and mutate the one the middleware made.
NOTES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("nagaya_notes", default=None)
INTERNAL = "$nagaya"          # the server's own registry reads (manifest sizes): not user activity
DEVICE_HEADER = "x-nagaya-device"   # POST /api/login: the device token an earlier login of this client got
IDENTITY_TTL = 30.0           # seconds a token request's group lookup is reused (as the portal's principal)


class LoginRequest(BaseModel):
    token_name: str = Field("nagaya-login", max_length=64)
    expires_days: int | None = Field(None, ge=1, le=3650, description="default: the site's login_ttl_days")


class ProjectCreate(BaseModel):
    name: str
    kind: str = Field("group", pattern="^(group|site)$")


class MemberAdd(BaseModel):
    name: str
    kind: str = Field("user", pattern="^(user|group)$")
    role: str = Field(pattern="^(owner|maintainer|developer|guest)$")


class TokenCreate(BaseModel):
    name: str
    scope: str = Field(pattern="^(pull|push)$")
    expires_in: int | None = Field(None, ge=1, description="seconds; null: never expires")


def _basic(request: Request) -> tuple[str, str] | None:
    h = request.headers.get("authorization", "")
    scheme, _, value = h.partition(" ")
    if scheme.lower() == "basic":
        try:
            user, sep, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("malformed Authorization header") from None
        if not sep:
            raise AuthError("malformed Authorization header")
        return user, secret
    if scheme.lower() == "bearer" and value.strip():
        return "", value.strip()            # a personal access token alone names its user
    return None


def _json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_json(x) for x in obj]
    d = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    if isinstance(d, dict):
        return {k: (v.isoformat() + "Z" if isinstance(v, datetime) else v) for k, v in d.items()}
    return d


class NotesMiddleware:
    """Sends the request's note (NOTES) as the X-Nagaya-Warning header. Plain ASGI: starlette's
    BaseHTTPMiddleware costs a task group and a streamed response on every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        notes: dict[str, str] = {}
        reset = NOTES.set(notes)

        async def send_with_note(message: Message) -> None:
            if message["type"] == "http.response.start" and notes.get("warning"):
                note = notes["warning"].encode("latin-1", "replace")
                message = {**message, "headers": [*message.get("headers", []), (b"x-nagaya-warning", note)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_note)
        finally:
            NOTES.reset(reset)


class Site:
    """What every handler needs: the database, the password back end, the token issuer."""

    def __init__(self, settings: ServerSettings, authenticator: Authenticator | None = None) -> None:
        self.settings = settings
        self.db = Database(settings.database)
        self.authn = authenticator or make_authenticator(settings.auth, settings.pam_service, settings.ldap)
        self.limiter = LoginLimiter(self.db)
        # Device tokens are signed with a key every server process shares: derived from the signing key.
        key_file = Path(settings.signing_key) if settings.signing_key else None
        self.devices = Devices(key_file.read_bytes() if key_file and key_file.is_file() else os.urandom(32))
        self._identities: dict[str, tuple[float, Identity | None]] = {}
        self.clock = time.monotonic                 # of the identity cache (tests move it)
        self.issuer = TokenIssuer(Path(settings.signing_key), Path(settings.signing_cert), Path(settings.ca_cert),
                                  settings.issuer, settings.service, settings.token_ttl)

    def is_admin(self, name: str, groups: frozenset[str]) -> bool:
        s = self.settings
        return name in s.admin_users or bool(groups & set(s.admin_groups))

    def password_login(self, svc: SiteService, username: str, password: str, ip: str = "",
                       via: str = "api", device: str | None = None) -> Principal:
        """Every route that takes a password comes here, so guessing is limited on all of them alike
        (ratelimit.py): the attempt is booked before the password is checked, against the budget of the
        client's device token if it holds one for this user, else against the user+address budget."""
        budget = self.devices.budget(username, device) or ip
        rid, wait = self.limiter.reserve(username, budget)
        if rid is None:
            raise TooManyAttempts(f"too many failed attempts; try again in {int(wait // 60) + 1} minutes")
        try:
            ident = self.authn.authenticate(username, password)
        except BaseException:
            self.limiter.release(rid)       # the check broke: no guess was made
            raise
        if ident is None:                   # the booking stays, as the failure
            svc.audit("login.fail", username[:128], source=ip[:64],
                      details={"via": via, "device": budget.startswith(DEVICE_PREFIX)})
            svc.s.commit()                  # kept although the request fails
            raise AuthError("invalid username or password")
        if budget.startswith(DEVICE_PREFIX):
            self.limiter.succeeded(username, budget)    # the device's own slips are forgiven
        else:
            self.limiter.release(rid)       # a shared budget: others' failures in it stay counted
        user = svc.login(ident.name, ident.uid, self.is_admin(ident.name, ident.groups))
        svc.audit("login", ident.name, details={"method": self.settings.auth})
        self.note_expiry(user)
        return svc.principal(user, ident.groups)

    def principal(self, svc: SiteService, creds: tuple[str, str] | None, allow_password: bool = True,
                  ip: str = "") -> Principal:
        """Credentials -> principal: a robot token, a personal access token, or (where allowed) a password.
        No credentials: anonymous. Wrong credentials: AuthError (never a silent downgrade to anonymous)."""
        if creds is None:
            return Principal.anonymous()
        username, secret = creds
        if ROBOT_RE.match(username):
            p = svc.verify_robot(username, secret)
            if p is None:
                raise AuthError("invalid, expired or revoked robot token")
            return p
        if secret.startswith("nyp_"):
            user = svc.verify_user_token(username or None, secret)     # Bearer: the token names its user
            if user is None:
                raise AuthError("invalid, expired or revoked access token; run `nagaya login` again")
            ident = self.identity(user.name)
            groups = ident.groups if ident else frozenset()
            user.is_admin = self.is_admin(user.name, groups)
            p = svc.principal(user, groups)
            self.note_expiry(user)
            return p
        if not allow_password:
            raise AuthError("use a personal access token (nagaya login) or a robot token")
        return self.password_login(svc, username, secret, ip, "token")

    def add_member(self, svc: SiteService, principal: Principal, project: str, member: str, kind: str,
                   role: str) -> MemberInfo:
        """Add (or change the role of) a user or group of the login backend: the API's and the portal's one way."""
        svc.project(principal, project)                     # 404 before revealing whether a user exists
        if kind == "user":
            ident = self.authn.user(member)
            if ident is None:
                raise NotFound(f"no such user: {member}")
            unix_id = ident.uid
        elif kind == "group":
            gid = self.authn.group_id(member)
            if gid is False:
                raise NotFound(f"no such group: {member}")
            unix_id = gid if isinstance(gid, int) and not isinstance(gid, bool) else None
        else:
            raise UsageError("member kind must be user or group")
        return svc.add_member(principal, project, member, kind, role, unix_id)

    def name_reserved(self, name: str) -> bool:
        """Whether `name` is, or may become, an account's personal project: any account the login backend
        knows. Fails closed: a backend that cannot answer (LDAP down) reserves the name."""
        try:
            return self.authn.user(name) is not None
        except Exception as e:                  # any back-end failure: refuse, never guess
            log.warning("cannot look up %s (%s): the name stays reserved", name, e)
            return True

    def identity(self, name: str) -> Identity | None:
        """The user's Unix/LDAP identity (groups) for a token request, remembered for IDENTITY_TTL seconds
        per process: NSS reads /etc/group on every call and LDAP asks its server, once per registry request
        otherwise. A portal session keeps the groups of its login for longer than that."""
        now = self.clock()
        hit = self._identities.get(name)
        if hit is not None and now - hit[0] < IDENTITY_TTL:
            return hit[1]
        ident = self.authn.user(name)
        if len(self._identities) > 10000:
            self._identities.clear()
        self._identities[name] = (now, ident)
        return ident

    def rights(self, name: str, fallback: frozenset[str] = frozenset()) -> tuple[frozenset[str], bool] | None:
        """(groups, is_admin) of an account now, at most IDENTITY_TTL old: what every request is authorized
        with, so leaving a group or the admins takes effect within that time on every route. None: the
        login backend no longer knows the account. A backend that cannot answer gives `fallback` groups and
        never admin rights."""
        try:
            ident = self.identity(name)
        except Exception as e:                  # LDAP down: fail closed for admin rights
            log.warning("cannot look up %s (%s): no admin rights until it answers", name, e)
            return fallback, False
        if ident is None:
            return None
        return ident.groups, self.is_admin(name, ident.groups)

    def note_expiry(self, user: Any) -> None:
        notes = NOTES.get()
        warning = lifecycle.expiry_warning(user, utcnow(), self.settings.expiry_warn_days)
        if notes is not None and warning:
            notes["warning"] = warning

    def manifest_size(self, repository: str, digest: str, media_type: str) -> int | None:
        """Bytes an image occupies (config + layers), read back from the registry with a server token."""
        if not self.settings.registry or media_type not in MANIFEST_TYPES:
            return None
        tok = self.issuer.issue(INTERNAL, [{"type": "repository", "name": repository, "actions": ["pull"]}])
        try:
            r = httpx.get(f"http://{self.settings.registry}/v2/{repository}/manifests/{digest}", timeout=5,
                          headers={"Authorization": f"Bearer {tok['token']}", "Accept": ", ".join(MANIFEST_TYPES)})
            r.raise_for_status()
            m = r.json()
        except (httpx.HTTPError, ValueError) as e:
            log.warning("cannot read %s@%s for its size: %s", repository, digest, e)
            return None
        if "layers" in m:
            return int(m.get("config", {}).get("size", 0)) + sum(int(x.get("size", 0)) for x in m["layers"])
        return sum(int(x.get("size", 0)) for x in m.get("manifests", []))


def create_app(settings: ServerSettings, authenticator: Authenticator | None = None) -> FastAPI:
    site = Site(settings, authenticator)
    app = FastAPI(title="nagaya", version=__version__,
                  description="nagaya site server: registry token service, projects, roles and tokens")
    app.state.site = site

    app.add_middleware(NotesMiddleware)

    @app.exception_handler(NagayaError)
    async def _nagaya_error(_request: Request, exc: NagayaError) -> JSONResponse:
        status = http_status(exc)
        headers = {"WWW-Authenticate": 'Basic realm="nagaya"'} if status == 401 else retry_after(exc) or None
        body: dict[str, Any] = {"detail": exc.message}
        if _request.url.path == "/token":
            # registry clients (skopeo, docker) print the distribution error format, not `detail`
            code = {403: "DENIED", 429: "TOOMANYREQUESTS"}.get(status, "UNAUTHORIZED")
            body["errors"] = [{"code": code, "message": exc.message}]
        return JSONResponse(body, status_code=status, headers=headers)

    def session() -> Any:
        return site.db.session()

    # ---- registry token service ---------------------------------------------------------------------

    @app.get("/token", tags=["registry"], summary="Docker registry token (distribution token auth spec)")
    async def token(request: Request, service: str = "", scope: list[str] = Query(default_factory=list),
                    account: str = "") -> dict[str, Any]:
        if service and service != settings.service:
            raise UsageError(f"unknown service {service!r}")
        creds = _basic(request)
        if creds is not None and not ROBOT_RE.match(creds[0]) and not creds[1].startswith("nyp_"):
            # A password: PAM or LDAP may take seconds (failure delays). The default pool, so that a few
            # wrong passwords never hold up the token requests of the small pool.
            ip = request.client.host if request.client else ""
            return await anyio.to_thread.run_sync(issue_token, creds, scope, ip)
        return await quick(issue_token, creds, scope)

    def issue_token(creds: tuple[str, str] | None, scope: list[str], ip: str = "") -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            principal = site.principal(svc, creds, ip=ip)
            access = []
            for text in scope:
                for part in text.split(" "):                 # some clients join several scopes with spaces
                    sc = Scope.parse(part)
                    if sc is None:
                        continue
                    if sc.type == "repository":
                        granted = authorize(s, principal, sc.name, sc.actions)
                        if "push" in granted and (why := lifecycle.push_refusal(svc, sc.name)):
                            # refuse the whole request: a token without `push` gives clients no reason
                            svc.audit("quota.refused", principal.name, repository=sc.name, details={"why": why})
                            s.commit()
                            raise PermissionDenied(why)
                        actions = [a for a in ("pull", "push", "delete") if a in granted]
                        if "*" in sc.actions and granted >= {"pull", "push", "delete"}:
                            actions = ["*"]
                    elif sc.type == "registry" and sc.name == "catalog":
                        actions = ["*"] if principal.kind == "user" and principal.is_admin else []
                    else:
                        actions = []
                    access.append({"type": sc.type, "name": sc.name, "actions": actions})
            return site.issuer.issue(principal.name, access)

    # ---- API ------------------------------------------------------------------------------------------

    @app.get("/api/info", tags=["site"])
    def info() -> dict[str, Any]:
        return {"registry": settings.registry, "server": settings.url, "service": settings.service,
                "realm": f"{settings.url}/token", "version": __version__}

    @app.post("/api/login", tags=["auth"], summary="Password login; returns a personal access token (shown once)")
    def login(request: Request, body: LoginRequest | None = None) -> dict[str, Any]:
        body = body or LoginRequest()
        creds = _basic(request)
        if creds is None or not creds[0]:
            raise AuthError("login needs HTTP Basic credentials (username and password)")
        with session() as s:
            svc = SiteService(s)
            principal = site.password_login(svc, *creds, ip=request.client.host if request.client else "",
                                            device=request.headers.get(DEVICE_HEADER))
            user = svc.user(principal.name)
            assert user is not None
            days = body.expires_days or settings.login_ttl_days
            new = svc.issue_user_token(user, body.token_name, timedelta(days=days))
            personal = s.scalar(select(Project.name).where(Project.name == user.name, Project.kind == "personal",
                                                           Project.owner_id == user.id))
            warning = (NOTES.get() or {}).get("warning")
            return {"username": user.name, "token": new.secret, "warning": warning,
                    "expires_at": _json({"t": new.expires_at})["t"],
                    "registry": settings.registry, "server": settings.url, "is_admin": principal.is_admin,
                    "personal_project": personal, "device": site.devices.issue(user.name)}

    @app.post("/api/logout", tags=["auth"], summary="Revoke the personal access token used for this request")
    def logout(request: Request) -> dict[str, Any]:
        creds = _basic(request)
        with session() as s:
            svc = SiteService(s)
            p = site.principal(svc, creds, allow_password=False)
            user = svc.user(p.name) if p.kind == "user" else None
            n = svc.revoke_user_tokens(user, creds[1]) if user and creds else 0
            return {"revoked": n}

    @app.get("/api/me", tags=["auth"])
    def me(request: Request) -> dict[str, Any]:
        with session() as s:
            p = site.principal(SiteService(s), _basic(request))
            return {"name": p.name, "kind": p.kind, "is_admin": p.is_admin, "groups": sorted(p.groups),
                    "project": p.project, "scope": p.scope}

    @app.get("/api/projects", tags=["projects"])
    def projects(request: Request) -> list[dict[str, Any]]:
        with session() as s:
            svc = SiteService(s)
            return _json(svc.projects(site.principal(svc, _basic(request))))

    @app.post("/api/projects", tags=["projects"], status_code=201)
    def create_project(request: Request, body: ProjectCreate) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            return _json(svc.create_project(site.principal(svc, _basic(request)), body.name, body.kind,
                                            site.name_reserved))

    @app.get("/api/projects/{name}", tags=["projects"])
    def project(request: Request, name: str) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            return _json(svc.project_info(site.principal(svc, _basic(request)), name))

    @app.get("/api/projects/{name}/members", tags=["projects"])
    def members(request: Request, name: str) -> list[dict[str, Any]]:
        with session() as s:
            svc = SiteService(s)
            return _json(svc.members(site.principal(svc, _basic(request)), name))

    @app.post("/api/projects/{name}/members", tags=["projects"])
    def add_member(request: Request, name: str, body: MemberAdd) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            return _json(site.add_member(svc, site.principal(svc, _basic(request)), name, body.name, body.kind,
                                         body.role))

    @app.delete("/api/projects/{name}/members/{kind}/{member}", tags=["projects"])
    def remove_member(request: Request, name: str, kind: str, member: str) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            svc.remove_member(site.principal(svc, _basic(request)), name, member, kind)
            return {"removed": member, "kind": kind, "project": name}

    @app.get("/api/tokens", tags=["tokens"], summary="Robot tokens of the projects you maintain")
    def tokens(request: Request, project: str | None = None) -> list[dict[str, Any]]:
        with session() as s:
            svc = SiteService(s)
            return _json(svc.robots(site.principal(svc, _basic(request)), project))

    @app.post("/api/projects/{name}/tokens", tags=["tokens"], status_code=201,
              summary="Create a robot token; the secret is in this answer only")
    def create_token(request: Request, name: str, body: TokenCreate) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            expires = utcnow() + timedelta(seconds=body.expires_in) if body.expires_in else None
            info_, new = svc.create_robot(site.principal(svc, _basic(request)), name, body.name, body.scope, expires)
            out = _json(info_)
            out["secret"] = new.secret
            return out

    @app.delete("/api/projects/{name}/tokens/{token_name}", tags=["tokens"], summary="Revoke a robot token")
    def revoke_token(request: Request, name: str, token_name: str) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            return _json(svc.revoke_robot(site.principal(svc, _basic(request)), name, token_name))

    @app.post("/api/projects/{name}/tokens/{token_name}/rotate", tags=["tokens"],
              summary="A new secret for a robot token (same name, scope, expiry); the old one stops working")
    def rotate_token(request: Request, name: str, token_name: str) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            info_, new = rotate_robot(svc, site.principal(svc, _basic(request)), name, token_name)
            out = _json(info_)
            out["secret"] = new.secret
            return out

    @app.get("/api/repositories", tags=["repositories"], summary="Repositories you may list")
    def repositories(request: Request, project: str | None = None) -> list[dict[str, Any]]:
        with session() as s:
            svc = SiteService(s)
            return _json(svc.repositories(site.principal(svc, _basic(request)), project))

    @app.get("/api/repositories/{repository:path}/tags", tags=["repositories"])
    def tags(request: Request, repository: str) -> list[dict[str, Any]]:
        with session() as s:
            svc = SiteService(s)
            return _json(svc.tags(site.principal(svc, _basic(request)), repository))

    @app.delete("/api/repositories/{repository:path}/manifests/{digest}", tags=["repositories"],
                summary="Delete an image (the manifest and every tag on it): owners and maintainers")
    def delete_manifest(request: Request, repository: str, digest: str) -> dict[str, Any]:
        with session() as s:
            p = site.principal(SiteService(s), _basic(request))
        tags = delete_image(site, p, repository, digest)
        return {"repository": repository, "digest": digest, "tags": tags}

    @app.get("/api/audit", tags=["audit"], summary="Recent audit events (site admins)")
    def audit(request: Request, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        with session() as s:
            svc = SiteService(s)
            return [as_row(e) for e in svc.audit_events(site.principal(svc, _basic(request)), limit, action)]

    @app.post("/api/audit", tags=["audit"], status_code=201,
              summary="Report a CLI event (run, submit, pull, ...) of the authenticated user")
    def audit_report(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            p = site.principal(svc, _basic(request), allow_password=False)
            host = request.client.host if request.client else ""
            lifecycle.ingest_cli_event(svc, p, body, f"cli:{host}")
            return {"recorded": True}

    @app.get("/api/admin/audit", tags=["admin"], summary="Query the audit trail (site admins), oldest first")
    def admin_audit(request: Request, user: str = "", since: datetime | None = None, until: datetime | None = None,
                    image: str = "", action: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        with session() as s:
            svc = SiteService(s)
            rows = lifecycle.query_audit(svc, site.principal(svc, _basic(request)), user=user, since=naive_utc(since),
                                         until=naive_utc(until), image=image, action=action, limit=limit)
            return [as_row(e) for e in rows]

    @app.get("/api/archive", tags=["archive"], summary="Archived images with this digest the caller may pull")
    def archive_find(request: Request, digest: str) -> list[dict[str, Any]]:
        with session() as s:
            svc = SiteService(s)
            p = site.principal(svc, _basic(request), allow_password=False)
            return lifecycle.archived(svc, p, lifecycle.archive_root(settings), digest)

    @app.get("/api/archive/{project}/{name}", tags=["archive"], summary="One archived image (OCI archive)")
    def archive_get(request: Request, project: str, name: str) -> Any:
        from fastapi.responses import FileResponse

        with session() as s:
            svc = SiteService(s)
            p = site.principal(svc, _basic(request), allow_password=False)
            path = lifecycle.archive_file(svc, p, lifecycle.archive_root(settings), project, name)
        return FileResponse(path, media_type="application/x-tar")

    @app.get("/api/admin/projects/{name}/quota", tags=["admin"])
    def get_quota(request: Request, name: str) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            p = svc.project(site.principal(svc, _basic(request)), name)
            return lifecycle.quota_info(svc, p)

    @app.get("/api/admin/usage", tags=["admin"], summary="Every project's storage use and quota (site admins)")
    def usage(request: Request) -> list[dict[str, Any]]:
        with session() as s:
            return _json(usage_overview(s, site.principal(SiteService(s), _basic(request))))

    @app.put("/api/admin/projects/{name}/quota", tags=["admin"], summary="Set (or clear, null) a storage quota")
    def put_quota(request: Request, name: str, body: dict[str, Any]) -> dict[str, Any]:
        q = body.get("quota_bytes")
        if q is not None and not isinstance(q, int):
            raise UsageError("quota_bytes must be an integer or null")
        with session() as s:
            svc = SiteService(s)
            return lifecycle.set_quota(svc, site.principal(svc, _basic(request)), name, q)

    @app.put("/api/admin/projects/{name}/policy", tags=["admin"],
             summary="Retention (keep_newest, keep_pattern) and immutable tag patterns of a project")
    def put_policy(request: Request, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            return lifecycle.set_policy(svc, site.principal(svc, _basic(request)), name, body)

    @app.get("/api/tag-policy", tags=["repositories"], summary="Whether a push may move this tag")
    def tag_policy(request: Request, repository: str, tag: str) -> dict[str, Any]:
        with session() as s:
            svc = SiteService(s)
            p = site.principal(svc, _basic(request))
            # answered only to those who may push there: patterns are not public
            mine = "push" in authorize(s, p, repository, ["push"])
            immutable = mine and lifecycle.is_immutable(svc, repository, tag)
            return {"repository": repository, "tag": tag, "immutable": immutable}

    @app.put("/api/admin/users/{name}/expiry", tags=["admin"],
             summary="Set (or clear) when an account expires; dry_run shows the consequences only")
    def put_expiry(request: Request, name: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = body.get("expires_at")
        try:
            when = naive_utc(datetime.fromisoformat(str(raw).replace("Z", "+00:00"))) if raw else None
        except ValueError:
            raise UsageError(f"invalid expires_at {raw!r}") from None
        with session() as s:
            svc = SiteService(s)
            return lifecycle.set_expiry(svc, site.principal(svc, _basic(request)), name, when,
                                        settings.expiry_grace_days, bool(body.get("dry_run")))

    # ---- registry notifications -----------------------------------------------------------------------

    @app.post("/api/registry/events", tags=["registry"], summary="The registry's notification webhook")
    async def registry_events(request: Request) -> dict[str, Any]:
        expected = f"Bearer {settings.notify_secret}"
        if not settings.notify_secret or \
                not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected.encode()):
            raise AuthError("bad notification secret")
        try:
            envelope = json.loads(await request.body())
            events = list(envelope.get("events") or [])
        except (ValueError, AttributeError, TypeError):
            raise UsageError("not a notification envelope") from None
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_apply_events, events)

    def _apply_events(events: list[dict[str, Any]]) -> dict[str, Any]:
        applied = 0
        for ev in events:
            if not isinstance(ev, dict) or (ev.get("actor") or {}).get("name") == INTERNAL:
                continue
            target = ev.get("target") or {}
            size = None
            if ev.get("action") == "push" and target.get("tag"):
                size = site.manifest_size(str(target.get("repository")), str(target.get("digest")),
                                          str(target.get("mediaType")))
            if ev.get("action") == "push" and target.get("tag") and _restore_immutable(ev):
                continue
            with session() as s:
                applied += SiteService(s).apply_registry_event(ev, size)
        return {"applied": applied}

    def _restore_immutable(ev: dict[str, Any]) -> bool:
        """A push that moved an immutable tag (a client other than `nagaya push`, which checks first): put
        the indexed manifest back under the tag at once. The registry cannot refuse it up front: it
        authorizes repositories, not tags."""
        target = ev.get("target") or {}
        repo, tag, digest = str(target.get("repository")), str(target.get("tag")), str(target.get("digest"))
        with session() as s:
            svc = SiteService(s)
            if not lifecycle.is_immutable(svc, repo, tag):
                return False
            old = s.scalar(select(Tag).join(Repository).where(Repository.name == repo, Tag.name == tag))
            if old is None or old.digest == digest:
                return False                                  # a first push, or the same image again
            old_digest, old_type = old.digest, old.media_type
        tok = site.issuer.issue(INTERNAL, [{"type": "repository", "name": repo, "actions": ["pull", "push"]}])
        base = f"http://{settings.registry}/v2/{repo}/manifests"
        hdr = {"Authorization": f"Bearer {tok['token']}"}
        try:
            r = httpx.get(f"{base}/{old_digest}", headers={**hdr, "Accept": old_type or ", ".join(MANIFEST_TYPES)},
                          timeout=10)
            r.raise_for_status()
            put = httpx.put(f"{base}/{tag}", content=r.content, timeout=10,
                            headers={**hdr, "Content-Type": r.headers.get("content-type", old_type)})
            put.raise_for_status()
        except httpx.HTTPError as e:
            log.error("cannot restore immutable tag %s:%s: %s", repo, tag, e)
            return False
        with session() as s:
            SiteService(s).audit("tag.immutable.restored", str((ev.get("actor") or {}).get("name") or ""),
                                 repository=repo, tag=tag, digest=digest, details={"kept": old_digest})
        return True

    # ---- the web portal (pages, static files) -----------------------------------------------------------
    from nagaya.server.web import install_portal

    install_portal(app, site)
    return app


SETTINGS_ENV = "NAGAYA_SERVER_SETTINGS"


def app_from_env() -> FastAPI:
    """uvicorn's app factory for each server process (`python -m nagaya.server` sets SETTINGS_ENV)."""
    import os

    return create_app(ServerSettings.load(Path(os.environ[SETTINGS_ENV])))
