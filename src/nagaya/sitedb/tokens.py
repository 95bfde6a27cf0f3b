"""Credentials: personal access tokens (a user's login from the CLI) and robot tokens (a project's
scripts and CI: create, list, revoke, rotate). Only hashes are stored; a secret is shown once."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload

from nagaya.errors import Conflict, NotFound, PermissionDenied, UsageError
from nagaya.sitedb import credentials
from nagaya.sitedb.authz import SCOPES, Principal, member_role, project_actions, require_role, visible_project
from nagaya.sitedb.models import Project, RobotToken, User, UserToken, utcnow
from nagaya.sitedb.part import Part

ROBOT_RE = re.compile(r"^robot\$([a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)\+([a-z0-9][a-z0-9._-]{0,63})$")
TOKEN_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# `last_used` is written at most this often per token: a write per registry request would serialize every
# token request on the database's write lock, for a figure people read in minutes and days.
LAST_USED_RESOLUTION = timedelta(seconds=60)
MANAGERS = ("owner", "maintainer")          # the roles that hold a project's robot tokens


def robot_username(project: str, name: str) -> str:
    return f"robot${project}+{name}"


@dataclass
class RobotInfo:
    project: str
    name: str
    username: str
    scope: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used: datetime | None
    created_by: str
    state: str           # active | expired | revoked


@dataclass
class NewSecret:
    username: str
    secret: str
    expires_at: datetime | None


def _touch(tok: RobotToken | UserToken, now: datetime) -> None:
    if tok.last_used is None or now - tok.last_used >= LAST_USED_RESOLUTION:
        tok.last_used = now


@functools.cache
def _robot_lookup() -> Any:
    rt, p = RobotToken.__table__, Project.__table__
    return (select(rt.c.id, rt.c.secret_hash, rt.c.scope, rt.c.expires_at, rt.c.revoked_at, rt.c.last_used)
            .select_from(rt.join(p, rt.c.project_id == p.c.id))
            .where(p.c.name == bindparam("project"), rt.c.name == bindparam("name")))


def _state(expires_at: datetime | None, revoked_at: datetime | None, now: datetime) -> str:
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"


def _robot_info(t: RobotToken, now: datetime) -> RobotInfo:
    return RobotInfo(project=t.project.name, name=t.name, username=robot_username(t.project.name, t.name),
                     scope=t.scope, created_at=t.created_at, expires_at=t.expires_at, revoked_at=t.revoked_at,
                     last_used=t.last_used, created_by=t.created_by.name if t.created_by else "",
                     state=_state(t.expires_at, t.revoked_at, now))


class Tokens(Part):
    # ---- personal access tokens ----------------------------------------------------------------------

    def issue_user_token(self, user: User, name: str, ttl: timedelta | None) -> NewSecret:
        secret = credentials.new_secret(credentials.USER_PREFIX)
        expires = utcnow() + ttl if ttl else None
        self.s.add(UserToken(user_id=user.id, name=name[:64], secret_hash=credentials.hash_secret(secret),
                             expires_at=expires))
        return NewSecret(username=user.name, secret=secret, expires_at=expires)

    def verify_user_token(self, username: str | None, secret: str) -> User | None:
        """The token's user if `secret` is an active personal access token (of `username`, if one is given)."""
        if not secret.startswith(credentials.USER_PREFIX):
            return None
        tok = self.s.scalar(select(UserToken).options(joinedload(UserToken.user))      # one query, not two
                            .where(UserToken.secret_hash == credentials.hash_secret(secret)))
        now = utcnow()
        if tok is None or (username is not None and tok.user.name != username) or \
                _state(tok.expires_at, tok.revoked_at, now) != "active":
            return None
        _touch(tok, now)
        return tok.user

    def revoke_user_tokens(self, user: User, secret: str | None = None) -> int:
        """Logout: revoke one personal access token (or all of the user's)."""
        q = select(UserToken).where(UserToken.user_id == user.id, UserToken.revoked_at.is_(None))
        if secret is not None:
            q = q.where(UserToken.secret_hash == credentials.hash_secret(secret))
        n = 0
        for t in self.s.scalars(q):
            t.revoked_at = utcnow()
            n += 1
        return n

    # ---- robot tokens --------------------------------------------------------------------------------

    def verify_robot(self, username: str, secret: str) -> Principal | None:
        m = ROBOT_RE.match(username)
        if not m or not secret.startswith(credentials.ROBOT_PREFIX):
            return None
        # Plain columns and a prebuilt statement: this runs on every registry request a robot makes.
        conn = self.s.connection()
        tok = conn.execute(_robot_lookup(), {"project": m.group(1), "name": m.group(2)}).first()
        now = utcnow()
        if tok is None or not credentials.matches(secret, tok.secret_hash) or \
                _state(tok.expires_at, tok.revoked_at, now) != "active":
            return None
        if tok.last_used is None or now - tok.last_used >= LAST_USED_RESOLUTION:
            conn.execute(RobotToken.__table__.update().where(RobotToken.__table__.c.id == tok.id)
                         .values(last_used=now))
        return Principal(kind="robot", name=username, project=m.group(1), scope=tok.scope)

    def create_robot(self, principal: Principal, project: str, name: str, scope: str,
                     expires_at: datetime | None) -> tuple[RobotInfo, NewSecret]:
        if scope not in SCOPES:
            raise UsageError(f"scope must be one of {', '.join(SCOPES)}")
        if not TOKEN_NAME_RE.match(name):
            raise UsageError(f"invalid token name {name!r}: lowercase letters, digits and . _ -")
        p = visible_project(self.s, principal, project)
        require_role(self.s, principal, p, MANAGERS)
        if scope not in project_actions(self.s, principal, p):
            raise PermissionDenied(f"you cannot {scope} in project {project}, so neither can your token")
        if self.s.scalar(select(RobotToken.id).where(RobotToken.project_id == p.id, RobotToken.name == name)):
            raise Conflict(f"project {project} already has a token named {name}")
        secret = credentials.new_secret(credentials.ROBOT_PREFIX)
        t = RobotToken(project_id=p.id, name=name, scope=scope, secret_hash=credentials.hash_secret(secret),
                       expires_at=expires_at, created_by_id=principal.user_id)
        self.s.add(t)
        try:
            self.s.flush()
        except IntegrityError:
            raise Conflict(f"project {project} already has a token named {name}") from None
        self.s.refresh(t)
        self.audit("token.create", principal.name, details={"project": project, "token": name, "scope": scope})
        username = robot_username(project, name)
        return _robot_info(t, utcnow()), NewSecret(username=username, secret=secret, expires_at=expires_at)

    def robots(self, principal: Principal, project: str | None = None) -> list[RobotInfo]:
        """Tokens of the projects the caller maintains (owner/maintainer) — never the secrets."""
        if project is not None:
            p = visible_project(self.s, principal, project)
            require_role(self.s, principal, p, MANAGERS)
            projects = [p]
        else:
            projects = [p for p in self.s.scalars(select(Project).order_by(Project.name))
                        if principal.is_admin or member_role(self.s, principal, p) in MANAGERS]
        if not projects:
            return []
        now = utcnow()
        q = select(RobotToken).where(RobotToken.project_id.in_([p.id for p in projects])) \
            .order_by(RobotToken.project_id, RobotToken.name)
        return [_robot_info(t, now) for t in self.s.scalars(q)]

    def _robot(self, principal: Principal, project: str, name: str) -> RobotToken:
        """A robot token the caller may manage; NotFound for one the project does not have."""
        p = visible_project(self.s, principal, project)
        require_role(self.s, principal, p, MANAGERS)
        t = self.s.scalar(select(RobotToken).where(RobotToken.project_id == p.id, RobotToken.name == name))
        if t is None:
            raise NotFound(f"project {project} has no token named {name}")
        return t

    def revoke_robot(self, principal: Principal, project: str, name: str) -> RobotInfo:
        t = self._robot(principal, project, name)
        if t.revoked_at is None:
            t.revoked_at = utcnow()
            self.audit("token.revoke", principal.name, details={"project": project, "token": name})
        return _robot_info(t, utcnow())

    def rotate_robot(self, principal: Principal, project: str, name: str) -> tuple[RobotInfo, NewSecret]:
        """A new secret for an existing robot token (same name, scope and expiry); the old secret stops
        working at once. Same role rule as creating one. A revoked token stays revoked: create a new one."""
        t = self._robot(principal, project, name)
        if t.revoked_at is not None:
            raise Conflict(f"token {name} is revoked; create a new one")
        secret = credentials.new_secret(credentials.ROBOT_PREFIX)
        t.secret_hash = credentials.hash_secret(secret)
        t.last_used = None
        self.audit("token.rotate", principal.name, details={"project": project, "token": name})
        self.s.flush()
        return _robot_info(t, utcnow()), NewSecret(username=robot_username(project, name), secret=secret,
                                                   expires_at=t.expires_at)
