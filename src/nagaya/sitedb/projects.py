"""Projects: who sees them, creating them, members and their roles, and each project's tag policy
(retention: which tags expire; immutability: which tags a push may not move)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from nagaya.errors import Conflict, NotFound, PermissionDenied, UsageError
from nagaya.sitedb.authz import (
    PROJECT_KINDS,
    PROJECT_RE,
    ROLES,
    Principal,
    member_role,
    project_actions,
    require_admin,
    require_role,
    split_repository,
    visible_project,
)
from nagaya.sitedb.models import Group, Membership, Project, Repository, Tag, User
from nagaya.sitedb.part import Part

log = logging.getLogger(__name__)


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
class Policy:
    project: str
    keep_newest: int | None
    keep_pattern: str
    immutable_pattern: str
    quota_bytes: int | None


@dataclass
class Removal:
    """One manifest retention removes: every tag of it in the repository is expired."""

    repository: str
    digest: str
    tags: list[str]
    size: int


def _globs(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


def _matches(patterns: str, tag: str) -> bool:
    return any(fnmatch.fnmatchcase(tag, g) for g in _globs(patterns))


class Projects(Part):
    def _info(self, principal: Principal, p: Project) -> ProjectInfo:
        role = member_role(self.s, principal, p) or ""
        return ProjectInfo(name=p.name, kind=p.kind, owner=p.owner.name if p.owner else "", role=role,
                           actions=sorted(project_actions(self.s, principal, p)), created_at=p.created_at)

    def projects(self, principal: Principal) -> list[ProjectInfo]:
        """The projects the caller holds a role in or has any right on."""
        out = []
        for p in self.s.scalars(select(Project).order_by(Project.name)):
            info = self._info(principal, p)
            if info.role or info.actions:
                out.append(info)
        return out

    def project(self, principal: Principal, name: str) -> Project:
        """The project, if the caller may see it; otherwise the same NotFound as for a missing one."""
        return visible_project(self.s, principal, name)

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
        if self.s.scalar(select(Project.id).where(Project.name == name)) is not None \
                or self.s.scalar(select(User.id).where(User.name == name)) is not None \
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

    # ---- members -------------------------------------------------------------------------------------

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
        """Add or change a member. The caller (server: `Site.add_member`) has checked that the user or
        group exists in the login backend."""
        if role not in ROLES:
            raise UsageError(f"role must be one of {', '.join(ROLES)}")
        p = self.project(principal, name)
        require_role(self.s, principal, p, ("owner",))
        if p.kind == "personal" and kind == "user" and p.owner_id is not None and \
                (u := self.s.get(User, p.owner_id)) is not None and u.name == member and role != "owner":
            raise UsageError(f"{member} owns the personal project {name}")
        if kind not in ("user", "group"):
            raise UsageError("member kind must be user or group")
        model, column = (User, Membership.user_id) if kind == "user" else (Group, Membership.group_id)
        who = self.s.scalar(select(model).where(model.name == member))
        if who is None:            # known to the login backend, new to the site: recorded with its Unix id
            who = User(name=member, uid=unix_id) if kind == "user" else Group(name=member, gid=unix_id)
            self.s.add(who)
            self.s.flush()
        m = self.s.scalar(select(Membership).where(Membership.project_id == p.id, column == who.id))
        if m is None:
            m = Membership(project_id=p.id, role=role, **{column.key: who.id})
            self.s.add(m)
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
        require_role(self.s, principal, p, ("owner",))
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

    # ---- tag policy: retention and immutable tags ----------------------------------------------------

    def set_policy(self, principal: Principal, name: str, body: dict[str, Any]) -> Policy:
        """Retention and immutability of a project (site admins); keys absent from `body` stay as they are."""
        require_admin(principal)
        p = self.named_project(name)
        if "keep_newest" in body:
            n = body["keep_newest"]
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                raise UsageError("keep_newest must be a non-negative integer or null")
            p.keep_newest = n
        for key in ("keep_pattern", "immutable_pattern"):
            if key in body:
                v = body[key] or ""
                if not isinstance(v, str) or len(v) > 255:
                    raise UsageError(f"{key} must be comma-separated globs (at most 255 characters)")
                setattr(p, key, ",".join(_globs(v)))
        policy = Policy(project=p.name, keep_newest=p.keep_newest, keep_pattern=p.keep_pattern,
                        immutable_pattern=p.immutable_pattern, quota_bytes=p.quota_bytes)
        self.audit("admin.policy", principal.name, details=asdict(policy))
        return policy

    def is_immutable(self, repository: str, tag: str) -> bool:
        """Whether a push may not move `tag` in `repository` (the project's immutable patterns)."""
        parts = split_repository(repository)
        project = self.s.scalar(select(Project).where(Project.name == parts[0])) if parts else None
        return bool(project and tag and _matches(project.immutable_pattern, tag))

    def retention_plan(self, project: str | None = None) -> list[Removal]:
        """Per repository: keep the newest `keep_newest` tags, tags matching `keep_pattern` and immutable
        tags; a manifest goes only when none of its tags is kept (a registry deletes manifests, not tags)."""
        q = select(Project).where(Project.keep_newest.is_not(None))
        if project:
            q = q.where(Project.name == project)
        out: list[Removal] = []
        for p in self.s.scalars(q.order_by(Project.name)):
            for repo in self.s.scalars(select(Repository).where(Repository.project_id == p.id)
                                       .order_by(Repository.name)):
                tags = sorted(repo.tags, key=lambda t: (t.pushed_at, t.id), reverse=True)
                keep = {t.name for t in tags[:p.keep_newest]}
                keep |= {t.name for t in tags
                         if _matches(p.keep_pattern, t.name) or _matches(p.immutable_pattern, t.name)}
                kept_digests = {t.digest for t in tags if t.name in keep}
                by_digest: dict[str, list[Tag]] = {}
                for t in tags:
                    if t.digest not in kept_digests:
                        by_digest.setdefault(t.digest, []).append(t)
                for digest, ts in by_digest.items():
                    out.append(Removal(repo.name, digest, sorted(t.name for t in ts), max(t.size for t in ts)))
        return out
