"""Site operations over one database session: users, projects, members, tokens, the repository index and
the audit table. The server's API and the token service are thin layers over this; so is any CLI that
works on the database directly. Every check goes through `authz`."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from nagaya.errors import AuthError, Conflict, NotFound, PermissionDenied, UsageError
from nagaya.store import auditlog, credentials
from nagaya.store.auditlog import AuditQuery
from nagaya.store.authz import (
    PROJECT_KINDS,
    PROJECT_RE,
    ROLES,
    SCOPES,
    Principal,
    member_role,
    project_actions,
    split_repository,
)
from nagaya.store.models import (
    AuditEvent,
    Group,
    Membership,
    Project,
    Repository,
    RobotToken,
    Tag,
    User,
    UserToken,
    utcnow,
)

log = logging.getLogger(__name__)

ROBOT_RE = re.compile(r"^robot\$([a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)\+([a-z0-9][a-z0-9._-]{0,63})$")
TOKEN_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# `last_used` is written at most this often per token: a write per registry request would serialize every
# token request on the database's write lock, for a figure people read in minutes and days.
LAST_USED_RESOLUTION = timedelta(seconds=60)
MANIFEST_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
})


def robot_username(project: str, name: str) -> str:
    return f"robot${project}+{name}"


@dataclass
class ProjectInfo:
    name: str
    kind: str
    owner: str
    role: str            # the caller's role ("" if none; site projects are readable anyway)
    actions: list[str]   # what the caller may do on its repositories
    created_at: datetime


@dataclass
class MemberInfo:
    name: str
    kind: str            # user | group
    role: str


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


@dataclass
class TagInfo:
    repository: str
    tag: str
    digest: str
    media_type: str
    size: int
    pushed_at: datetime
    pushed_by: str


@dataclass
class RepositoryInfo:
    name: str
    project: str
    tags: int
    updated_at: datetime | None


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


class SiteService:
    def __init__(self, session: Session) -> None:
        self.s = session

    # ---- identity ------------------------------------------------------------------------------------

    def user(self, name: str) -> User | None:
        return self.s.scalar(select(User).where(User.name == name))

    def login(self, name: str, uid: int | None, is_admin: bool) -> User:
        """Record a successful password login; the first one creates the user's personal project."""
        user = self.user(name)
        now = utcnow()
        if user is None:
            user = User(name=name, uid=uid, is_admin=is_admin)
            self.s.add(user)
            self.s.flush()
        if user.expires_at is not None and user.expires_at <= now:
            raise AuthError(f"account {name} expired on {user.expires_at:%Y-%m-%d}")
        user.uid, user.is_admin, user.last_login = uid, is_admin, now
        self.ensure_personal_project(user)
        return user

    def ensure_personal_project(self, user: User) -> Project | None:
        """The user's personal project, created on first login. A project of that name that is not this
        user's personal one (made before names were reserved, or by an admin) is never adopted: it keeps
        its owners and members, the user gets no personal project, and `project.squatted` tells the admins
        to rename or remove it (adopting it would hand the user a project whose owners are others)."""
        if not PROJECT_RE.match(user.name):
            return None          # a Unix name the registry cannot express (e.g. upper case): no personal project
        p = self.s.scalar(select(Project).where(Project.name == user.name))
        if p is None:
            p = Project(name=user.name, kind="personal", owner_id=user.id)
            self.s.add(p)
            self.s.flush()
            self.s.add(Membership(project_id=p.id, user_id=user.id, role="owner"))
            self.audit("project.create", user.name, details={"project": p.name, "kind": "personal"})
        elif p.kind != "personal" or p.owner_id != user.id:
            owner = self.s.scalar(select(User.name).where(User.id == p.owner_id)) if p.owner_id else None
            log.warning("project %s is named after user %s but is not theirs (kind %s, owner %s): not adopted",
                        p.name, user.name, p.kind, owner)
            self.audit("project.squatted", user.name, details={"project": p.name, "kind": p.kind, "owner": owner})
            return None
        return p

    def principal(self, user: User, groups: Iterable[str]) -> Principal:
        if user.expires_at is not None and user.expires_at <= utcnow():
            raise AuthError(f"account {user.name} expired")
        return Principal(kind="user", name=user.name, user_id=user.id, groups=frozenset(groups),
                         is_admin=user.is_admin)

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

    # ---- projects ------------------------------------------------------------------------------------

    def _visible(self, principal: Principal, project: Project) -> tuple[str, frozenset[str]]:
        role = member_role(self.s, principal, project)
        return role or "", project_actions(self.s, principal, project)

    def _info(self, principal: Principal, p: Project) -> ProjectInfo:
        role, actions = self._visible(principal, p)
        return ProjectInfo(name=p.name, kind=p.kind, owner=p.owner.name if p.owner else "", role=role,
                           actions=sorted(actions), created_at=p.created_at)

    def projects(self, principal: Principal) -> list[ProjectInfo]:
        out = []
        for p in self.s.scalars(select(Project).order_by(Project.name)):
            role, actions = self._visible(principal, p)
            if role or actions:
                out.append(self._info(principal, p))
        return out

    def project(self, principal: Principal, name: str) -> Project:
        """The project, if the caller may see it; otherwise the same NotFound as for a missing one."""
        p = self.s.scalar(select(Project).where(Project.name == name))
        if p is None or not any(self._visible(principal, p)):
            raise NotFound(f"project {name} not found")
        return p

    def project_info(self, principal: Principal, name: str) -> ProjectInfo:
        return self._info(principal, self.project(principal, name))

    def create_project(self, principal: Principal, name: str, kind: str = "group",
                       reserved: Callable[[str], bool] | None = None) -> ProjectInfo:
        """`reserved(name)`: whether the login backend knows an account of that name (the server passes
        one): its personal project's name is kept for it even before its first login."""
        if principal.kind != "user":
            raise PermissionDenied("only users can create projects")
        if kind not in PROJECT_KINDS or kind == "personal":
            raise UsageError(f"project kind must be group or site, not {kind!r}")
        if not PROJECT_RE.match(name) or len(name) > 64:
            raise UsageError(f"invalid project name {name!r}: lowercase letters, digits and . _ - inside")
        if kind == "site" and not principal.is_admin:
            raise PermissionDenied("only site admins create site projects")
        if self.s.scalar(select(Project.id).where(Project.name == name)) is not None or self.user(name) is not None \
                or (reserved is not None and reserved(name)):
            # user names are reserved for personal projects, even before the user's first login; the answer
            # is the same as for an existing project, so it tells no more than `getent passwd` would
            raise Conflict(f"project {name} already exists")
        p = Project(name=name, kind=kind, owner_id=principal.user_id)
        self.s.add(p)
        self.s.flush()
        self.s.add(Membership(project_id=p.id, user_id=principal.user_id, role="owner"))
        self.audit("project.create", principal.name, details={"project": name, "kind": kind})
        self.s.flush()
        return self._info(principal, p)

    def _require_manage(self, principal: Principal, p: Project, roles: tuple[str, ...]) -> None:
        if principal.kind == "user" and principal.is_admin:
            return
        if member_role(self.s, principal, p) not in roles:
            raise PermissionDenied(f"you need the {' or '.join(roles)} role in project {p.name}")

    def members(self, principal: Principal, name: str) -> list[MemberInfo]:
        p = self.project(principal, name)
        if not principal.is_admin and member_role(self.s, principal, p) is None:
            raise PermissionDenied(f"only members see the members of project {name}")
        out = []
        for m in p.memberships:
            if m.user is not None:
                out.append(MemberInfo(name=m.user.name, kind="user", role=m.role))
            elif m.group is not None:
                out.append(MemberInfo(name=m.group.name, kind="group", role=m.role))
        return sorted(out, key=lambda m: (ROLES.index(m.role), m.kind, m.name))

    def add_member(self, principal: Principal, name: str, member: str, kind: str, role: str,
                   unix_id: int | None = None) -> MemberInfo:
        """Add or change a member. The caller (server) has checked that the user or group exists."""
        if role not in ROLES:
            raise UsageError(f"role must be one of {', '.join(ROLES)}")
        p = self.project(principal, name)
        self._require_manage(principal, p, ("owner",))
        if p.kind == "personal" and kind == "user" and p.owner_id is not None and \
                (u := self.s.get(User, p.owner_id)) is not None and u.name == member and role != "owner":
            raise UsageError(f"{member} owns the personal project {name}")
        if kind == "user":
            u = self.user(member)
            if u is None:
                u = User(name=member, uid=unix_id)
                self.s.add(u)
                self.s.flush()
            m = self.s.scalar(select(Membership).where(Membership.project_id == p.id, Membership.user_id == u.id))
            if m is None:
                m = Membership(project_id=p.id, user_id=u.id, role=role)
                self.s.add(m)
        elif kind == "group":
            g = self.s.scalar(select(Group).where(Group.name == member))
            if g is None:
                g = Group(name=member, gid=unix_id)
                self.s.add(g)
                self.s.flush()
            m = self.s.scalar(select(Membership).where(Membership.project_id == p.id, Membership.group_id == g.id))
            if m is None:
                m = Membership(project_id=p.id, group_id=g.id, role=role)
                self.s.add(m)
        else:
            raise UsageError("member kind must be user or group")
        if m.role == "owner" and role != "owner" and m.id is not None:
            self._check_owner_left(p, excluding=m.id)
        m.role = role
        self.s.flush()
        self.audit("member.add", principal.name, details={"project": name, "member": member, "kind": kind,
                                                          "role": role})
        return MemberInfo(name=member, kind=kind, role=role)

    def _check_owner_left(self, p: Project, excluding: int) -> None:
        """Checked before changing anything: a failed request leaves the session clean."""
        owners = self.s.scalar(select(Membership.id).where(Membership.project_id == p.id, Membership.role == "owner",
                                                            Membership.id != excluding).limit(1))
        if owners is None:
            raise Conflict(f"project {p.name} must keep at least one owner")

    def remove_member(self, principal: Principal, name: str, member: str, kind: str) -> None:
        p = self.project(principal, name)
        self._require_manage(principal, p, ("owner",))
        if kind == "user":
            cond = Membership.user_id.in_(select(User.id).where(User.name == member))
        elif kind == "group":
            cond = Membership.group_id.in_(select(Group.id).where(Group.name == member))
        else:
            raise UsageError("member kind must be user or group")
        m = self.s.scalar(select(Membership).where(Membership.project_id == p.id, cond))
        if m is None:
            raise NotFound(f"{kind} {member} is not a member of project {name}")
        if m.role == "owner":
            self._check_owner_left(p, excluding=m.id)
        self.s.delete(m)
        self.s.flush()
        self.s.expire(p)
        self.audit("member.remove", principal.name, details={"project": name, "member": member, "kind": kind})

    # ---- robot tokens --------------------------------------------------------------------------------

    def _robot_info(self, t: RobotToken, now: datetime) -> RobotInfo:
        return RobotInfo(project=t.project.name, name=t.name, username=robot_username(t.project.name, t.name),
                         scope=t.scope, created_at=t.created_at, expires_at=t.expires_at, revoked_at=t.revoked_at,
                         last_used=t.last_used, created_by=t.created_by.name if t.created_by else "",
                         state=_state(t.expires_at, t.revoked_at, now))

    def create_robot(self, principal: Principal, project: str, name: str, scope: str,
                     expires_at: datetime | None) -> tuple[RobotInfo, NewSecret]:
        if scope not in SCOPES:
            raise UsageError(f"scope must be one of {', '.join(SCOPES)}")
        if not TOKEN_NAME_RE.match(name):
            raise UsageError(f"invalid token name {name!r}: lowercase letters, digits and . _ -")
        p = self.project(principal, project)
        self._require_manage(principal, p, ("owner", "maintainer"))
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
        return self._robot_info(t, utcnow()), NewSecret(username=username, secret=secret, expires_at=expires_at)

    def robots(self, principal: Principal, project: str | None = None) -> list[RobotInfo]:
        """Tokens of the projects the caller maintains (owner/maintainer) — never the secrets."""
        if project is not None:
            p = self.project(principal, project)
            self._require_manage(principal, p, ("owner", "maintainer"))
            projects = [p]
        else:
            projects = [p for p in self.s.scalars(select(Project).order_by(Project.name))
                        if principal.is_admin or member_role(self.s, principal, p) in ("owner", "maintainer")]
        if not projects:
            return []
        now = utcnow()
        q = select(RobotToken).where(RobotToken.project_id.in_([p.id for p in projects])) \
            .order_by(RobotToken.project_id, RobotToken.name)
        return [self._robot_info(t, now) for t in self.s.scalars(q)]

    def revoke_robot(self, principal: Principal, project: str, name: str) -> RobotInfo:
        p = self.project(principal, project)
        self._require_manage(principal, p, ("owner", "maintainer"))
        t = self.s.scalar(select(RobotToken).where(RobotToken.project_id == p.id, RobotToken.name == name))
        if t is None:
            raise NotFound(f"project {project} has no token named {name}")
        if t.revoked_at is None:
            t.revoked_at = utcnow()
            self.audit("token.revoke", principal.name, details={"project": project, "token": name})
        return self._robot_info(t, utcnow())

    # ---- repositories --------------------------------------------------------------------------------

    def repositories(self, principal: Principal, project: str | None = None) -> list[RepositoryInfo]:
        if project is not None:
            p = self.project(principal, project)
            projects = [p] if "list" in project_actions(self.s, principal, p) else []
        else:
            projects = [p for p in self.s.scalars(select(Project))
                        if "list" in project_actions(self.s, principal, p)]
        if not projects:
            return []
        q = select(Repository).where(Repository.project_id.in_([p.id for p in projects])).order_by(Repository.name)
        out = []
        for r in self.s.scalars(q):
            if not r.tags:
                continue
            out.append(RepositoryInfo(name=r.name, project=r.project.name, tags=len(r.tags),
                                      updated_at=max(t.pushed_at for t in r.tags)))
        return out

    def tags(self, principal: Principal, repository: str) -> list[TagInfo]:
        parts = split_repository(repository)
        missing = NotFound(f"repository {repository} not found")
        if parts is None:
            raise missing
        p = self.s.scalar(select(Project).where(Project.name == parts[0]))
        if p is None or "list" not in project_actions(self.s, principal, p):
            raise missing
        r = self.s.scalar(select(Repository).where(Repository.name == repository))
        if r is None or not r.tags:
            raise missing
        return [TagInfo(repository=r.name, tag=t.name, digest=t.digest, media_type=t.media_type, size=t.size,
                        pushed_at=t.pushed_at, pushed_by=t.pushed_by) for t in sorted(r.tags, key=lambda t: t.name)]

    # ---- registry notifications and audit -----------------------------------------------------------

    def audit(self, action: str, actor: str, *, repository: str = "", tag: str = "", digest: str = "",
              source: str = "", event_id: str | None = None, details: dict[str, Any] | None = None) -> None:
        self.s.add(AuditEvent(action=action, actor=actor, repository=repository, tag=tag, digest=digest,
                              source=source, event_id=event_id, details=details or {}))

    def apply_registry_event(self, ev: dict[str, Any], size: int | None = None) -> bool:
        """One event of the registry's notification envelope: index manifest pushes/deletes, audit
        pushes and pulls of manifests. Returns False for events already seen (the registry retries)."""
        event_id = str(ev.get("id") or "")[:64] or None
        if event_id and self.s.scalar(select(AuditEvent.id).where(AuditEvent.event_id == event_id)):
            return False
        action = str(ev.get("action") or "")
        target = ev.get("target") or {}
        repo_name = str(target.get("repository") or "")
        media_type = str(target.get("mediaType") or "")
        digest = str(target.get("digest") or "")
        tag = str(target.get("tag") or "")
        actor = str((ev.get("actor") or {}).get("name") or "")
        source = str((ev.get("request") or {}).get("addr") or "")[:64]
        is_manifest = media_type in MANIFEST_TYPES or action == "delete"
        if not is_manifest or not repo_name:
            return False                      # blob-level events: too fine-grained for the index or audit
        parts = split_repository(repo_name)
        project = self.s.scalar(select(Project).where(Project.name == parts[0])) if parts else None
        if action == "push" and project is not None and tag:
            repo = self.s.scalar(select(Repository).where(Repository.name == repo_name))
            if repo is None:
                repo = Repository(project_id=project.id, name=repo_name)
                self.s.add(repo)
                self.s.flush()
            t = self.s.scalar(select(Tag).where(Tag.repository_id == repo.id, Tag.name == tag))
            if t is None:
                t = Tag(repository_id=repo.id, name=tag)
                self.s.add(t)
            t.digest, t.media_type, t.pushed_at, t.pushed_by = digest, media_type, utcnow(), actor
            t.size = size if size is not None else int(target.get("size") or target.get("length") or 0)
        elif action == "delete":
            repo = self.s.scalar(select(Repository).where(Repository.name == repo_name))
            if repo is not None:
                q = delete(Tag).where(Tag.repository_id == repo.id)
                q = q.where(or_(Tag.digest == digest, Tag.name == tag)) if (digest or tag) else q
                self.s.execute(q)
                self.s.expire(repo)
        self.audit(f"registry.{action}", actor, repository=repo_name, tag=tag, digest=digest, source=source,
                   event_id=event_id, details={"mediaType": media_type, "size": size})
        return True

    def audit_events(self, principal: Principal, limit: int = 100, action: str | None = None) -> list[AuditEvent]:
        """The newest events (at most 10000), of exactly one action if given."""
        return auditlog.search(self.s, principal, AuditQuery(action=action or "", exact_action=True,
                                                             limit=min(limit, 10000)))


# ---- portal additions: rotation, index pruning after a delete, admin views ---------------------------------

def rotate_robot(svc: SiteService, principal: Principal, project: str, name: str) -> tuple[RobotInfo, NewSecret]:
    """A new secret for an existing robot token (same name, scope and expiry); the old secret stops working
    at once. Same role rule as creating one. A revoked token stays revoked: create a new one instead."""
    p = svc.project(principal, project)
    svc._require_manage(principal, p, ("owner", "maintainer"))
    t = svc.s.scalar(select(RobotToken).where(RobotToken.project_id == p.id, RobotToken.name == name))
    if t is None:
        raise NotFound(f"project {project} has no token named {name}")
    if t.revoked_at is not None:
        raise Conflict(f"token {name} is revoked; create a new one")
    secret = credentials.new_secret(credentials.ROBOT_PREFIX)
    t.secret_hash = credentials.hash_secret(secret)
    t.last_used = None
    svc.audit("token.rotate", principal.name, details={"project": project, "token": name})
    svc.s.flush()
    return svc._robot_info(t, utcnow()), NewSecret(username=robot_username(project, name), secret=secret,
                                                     expires_at=t.expires_at)


def forget_manifest(svc: SiteService, repository: str, digest: str) -> int:
    """Drop the index's tags of a manifest the server just deleted in the registry, so the next page is
    right at once; the registry's own notification still writes the audit event."""
    repo = svc.s.scalar(select(Repository).where(Repository.name == repository))
    if repo is None:
        return 0
    n = len([t for t in repo.tags if t.digest == digest])
    svc.s.execute(delete(Tag).where(Tag.repository_id == repo.id, Tag.digest == digest))
    svc.s.expire(repo)
    return n


@dataclass
class UserInfo:
    name: str
    uid: int | None
    is_admin: bool
    created_at: datetime
    last_login: datetime | None
    expires_at: datetime | None
    projects: int
    tokens: int             # live personal access tokens


def users_overview(svc: SiteService, principal: Principal) -> list[UserInfo]:
    if not (principal.kind == "user" and principal.is_admin):
        raise PermissionDenied("only site admins list users")
    from sqlalchemy import func

    now = utcnow()
    owned = dict(svc.s.execute(select(Membership.user_id, func.count()).where(Membership.user_id.is_not(None))
                               .group_by(Membership.user_id)).all())
    live = dict(svc.s.execute(select(UserToken.user_id, func.count()).where(
        UserToken.revoked_at.is_(None), or_(UserToken.expires_at.is_(None), UserToken.expires_at > now))
        .group_by(UserToken.user_id)).all())
    return [UserInfo(name=u.name, uid=u.uid, is_admin=u.is_admin, created_at=u.created_at, last_login=u.last_login,
                     expires_at=u.expires_at, projects=int(owned.get(u.id, 0)), tokens=int(live.get(u.id, 0)))
            for u in svc.s.scalars(select(User).order_by(User.name))]


@dataclass
class Summary:
    projects: list[ProjectInfo]
    repositories: list[RepositoryInfo]     # newest first
    active_tokens: int


@functools.cache
def _summary_statements() -> dict[str, Any]:
    """The dashboard's statements, built once, over plain columns: on SQLite, building a statement, keying it
    for the compiled cache and loading ORM objects cost several times what running the query does."""
    from sqlalchemy import func

    m, g, p, u = Membership.__table__, Group.__table__, Project.__table__, User.__table__
    r, t, rt = Repository.__table__, Tag.__table__, RobotToken.__table__
    pids = bindparam("pids", expanding=True)
    return {
        # the membership rule of `authz.member_role`, for every project at once
        "roles": select(m.c.project_id, m.c.role).where(or_(
            m.c.user_id == bindparam("uid"),
            m.c.group_id.in_(select(g.c.id).where(g.c.name.in_(bindparam("groups", expanding=True)))))),
        "projects": select(p.c.id, p.c.name, p.c.kind, p.c.created_at, u.c.name.label("owner"))
        .select_from(p.outerjoin(u, p.c.owner_id == u.c.id)).order_by(p.c.name),
        "repositories": select(r.c.name, r.c.project_id, func.count(t.c.id), func.max(t.c.pushed_at))
        .select_from(r.join(t, t.c.repository_id == r.c.id)).where(r.c.project_id.in_(pids))
        .group_by(r.c.id, r.c.name, r.c.project_id).order_by(func.max(t.c.pushed_at).desc()),
        "tokens": select(func.count(rt.c.id)).where(
            rt.c.project_id.in_(bindparam("pids", expanding=True)), rt.c.revoked_at.is_(None),
            or_(rt.c.expires_at.is_(None), rt.c.expires_at > bindparam("now"))),
    }


def summary(svc: SiteService, principal: Principal, recent: int = 8) -> Summary:
    """The portal's dashboard in four queries, whatever the number of projects: every role at once (the
    membership rule of `authz.member_role`, for all projects), then `authz.allowed_actions` — the same pure
    rule the token service applies — per project."""
    from nagaya.store.authz import allowed_actions

    q = _summary_statements()
    db = svc.s.connection()
    roles: dict[int, str] = {}
    if principal.kind == "user":
        for pid, role in db.execute(q["roles"], {"uid": principal.user_id, "groups": sorted(principal.groups)}):
            if pid not in roles or ROLES.index(role) < ROLES.index(roles[pid]):
                roles[pid] = role
    projects: list[ProjectInfo] = []
    listable: dict[int, str] = {}
    manage: list[int] = []
    for p in db.execute(q["projects"]):
        role = roles.get(p.id)
        actions = allowed_actions(principal, p, role)
        if not (role or actions):
            continue
        projects.append(ProjectInfo(name=p.name, kind=p.kind, owner=p.owner or "", role=role or "",
                                    actions=sorted(actions), created_at=p.created_at))
        if "list" in actions:
            listable[p.id] = p.name
        if principal.is_admin or role in ("owner", "maintainer"):
            manage.append(p.id)
    repos: list[RepositoryInfo] = []
    if listable:
        repos = [RepositoryInfo(name=n, project=listable[pid], tags=int(c), updated_at=t)
                 for n, pid, c, t in db.execute(q["repositories"], {"pids": list(listable)})]
    tokens = 0
    if manage:
        tokens = int(db.execute(q["tokens"], {"pids": manage, "now": utcnow()}).scalar() or 0)
    return Summary(projects=projects, repositories=repos, active_tokens=tokens)
