"""What every door of the server shares: `Site` (the database, the login backend, rights looked up again
on every request, the token issuer), the caller's credentials, JSON shaping, and the per-request note sent as
the X-Nagaya-Warning header. The API (api/), the portal (portal/), the token service and the notification
sink are built over it; app.py assembles them."""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import logging
import os
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from nagaya.errors import AuthError, NagayaError, NotFound, TooManyAttempts, UsageError
from nagaya.server.authn import Authenticator, Identity, make_authenticator
from nagaya.server.ratelimit import DEVICE_PREFIX, Devices, LoginLimiter
from nagaya.server.registry_client import SiteRegistry
from nagaya.server.settings import ServerSettings
from nagaya.server.tokens import TokenIssuer
from nagaya.sitedb import Principal, SiteDatabase
from nagaya.sitedb.models import utcnow
from nagaya.sitedb.projects import MemberInfo
from nagaya.sitedb.repositories import MANIFEST_TYPES
from nagaya.sitedb.service import SiteService
from nagaya.sitedb.tokens import ROBOT_RE
from nagaya.sitedb.users import Users

log = logging.getLogger("nagaya.server")
# Per request: a note for the caller (an account about to expire), sent as the X-Nagaya-Warning header.
# A dict, not a value: handlers run in a copied context (thread pool) and mutate the one the middleware made.
NOTES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("nagaya_notes", default=None)
INTERNAL = "$nagaya"          # the server's own registry reads (manifest sizes): not user activity
IDENTITY_TTL = 30.0           # seconds a token request's group lookup is reused (as the portal's principal)


def credentials(request: Request) -> tuple[str, str] | None:
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


def to_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [to_json(x) for x in obj]
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
        self.db = SiteDatabase(settings.database)
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
        warning = Users.expiry_warning(user, utcnow(), self.settings.expiry_warn_days)
        if notes is not None and warning:
            notes["warning"] = warning

    def registry(self, repository: str, subject: str, actions: list[str], timeout: float = 30) -> SiteRegistry:
        """The site registry for one repository, with tokens this server issues to `subject` for `actions`
        (nagaya.image.registry.Registry: close it, or use it in a `with`)."""
        return SiteRegistry(self.issuer, self.settings.registry, repository, subject, actions, timeout)

    def manifest_size(self, repository: str, digest: str, media_type: str) -> int | None:
        """Bytes an image occupies (config + layers), read back from the registry with a server token."""
        if not self.settings.registry or media_type not in MANIFEST_TYPES:
            return None
        try:
            with self.registry(repository, INTERNAL, ["pull"], timeout=5) as reg:
                data, _mt, _digest = reg.get_manifest(digest)
            m = json.loads(data)
        except (NagayaError, ValueError) as e:
            log.warning("cannot read %s@%s for its size: %s", repository, digest, e)
            return None
        if "layers" in m:
            return int(m.get("config", {}).get("size", 0)) + sum(int(x.get("size", 0)) for x in m["layers"])
        return sum(int(x.get("size", 0)) for x in m.get("manifests", []))
