"""The one permission check, shared by the token service, the API and the CLI.

`authorize` grants the intersection of what was asked and what is allowed and never raises on a partial
grant. A caller with no rights on a private project gets exactly what it would get for a project that does
not exist (nothing), so grants never reveal whether something exists.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import bindparam, or_, select
from sqlalchemy.orm import Session

from nagaya.errors import NotFound, PermissionDenied
from nagaya.sitedb.models import Group, Membership, Project

ACTIONS: tuple[str, ...] = ("pull", "push", "delete", "list")
ROLES: tuple[str, ...] = ("owner", "maintainer", "developer", "guest")   # strongest first
PROJECT_KINDS: tuple[str, ...] = ("personal", "group", "site")
SCOPES: tuple[str, ...] = ("pull", "push")

ROLE_ACTIONS: dict[str, frozenset[str]] = {
    "owner": frozenset({"pull", "push", "delete", "list"}),
    "maintainer": frozenset({"pull", "push", "delete", "list"}),
    "developer": frozenset({"pull", "push", "list"}),
    "guest": frozenset({"pull", "list"}),
}
SCOPE_ACTIONS: dict[str, frozenset[str]] = {
    "pull": frozenset({"pull", "list"}),
    "push": frozenset({"pull", "push", "list"}),
}
READ = frozenset({"pull", "list"})
ALL = frozenset(ACTIONS)

# distribution's repository name grammar: path components of lowercase alphanumerics and separators.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})+$")
PROJECT_RE = re.compile(rf"^{_COMPONENT}$")


@dataclass(frozen=True)
class Principal:
    """Who is asking: a (logged-in) user, a robot token, or nobody."""

    kind: str                                   # user | robot | anonymous
    name: str
    user_id: int | None = None
    groups: frozenset[str] = field(default_factory=frozenset)
    is_admin: bool = False
    project: str | None = None                  # robots: the one project they belong to
    scope: str | None = None                    # robots: pull | push

    @classmethod
    def anonymous(cls) -> Principal:
        return cls(kind="anonymous", name="")

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"


def split_repository(repository: str) -> tuple[str, str] | None:
    """`project/path/name` -> (project, path/name); None for a name outside every project."""
    if len(repository) > 255 or not REPOSITORY_RE.match(repository):
        return None
    project, rest = repository.split("/", 1)
    return project, rest


def expand(requested: Iterable[str]) -> frozenset[str]:
    """The registry's `*` means every action."""
    out: set[str] = set()
    for a in requested:
        if a == "*":
            out |= ALL
        elif a in ALL:
            out.add(a)
    return frozenset(out)


def member_role(session: Session, principal: Principal, project: Project) -> str | None:
    """The strongest role the principal holds in the project, directly or through a group."""
    if principal.kind != "user":
        return None
    conds = []
    if principal.user_id is not None:
        conds.append(Membership.user_id == principal.user_id)
    if principal.groups:
        conds.append(Membership.group_id.in_(select(Group.id).where(Group.name.in_(sorted(principal.groups)))))
    if not conds:
        return None
    roles = set(session.scalars(select(Membership.role).where(Membership.project_id == project.id, or_(*conds))))
    return next((r for r in ROLES if r in roles), None)


class ProjectFacts(Protocol):
    """What the rules read of a project: a `Project`, or a row of its columns."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...


def allowed_actions(principal: Principal, project: ProjectFacts, role: str | None) -> frozenset[str]:
    """The rules, as a pure function of who, which project and which role."""
    if principal.kind == "robot":
        base = SCOPE_ACTIONS.get(principal.scope or "", frozenset()) if principal.project == project.name \
            else frozenset()
        return base | (READ if project.kind == "site" else frozenset())
    if principal.kind == "user" and principal.is_admin:
        return ALL
    if project.kind == "site":
        return READ                             # everyone reads the site project; only admins write
    if principal.kind != "user" or role is None:
        return frozenset()
    return ROLE_ACTIONS[role]


def project_actions(session: Session, principal: Principal, project: Project) -> frozenset[str]:
    return allowed_actions(principal, project, member_role(session, principal, project))


def visible_project(session: Session, principal: Principal, name: str) -> Project:
    """The project, if the caller may see it (a role in it, or any right on it); otherwise the same NotFound
    as for a missing one, so the answer never tells whether a private project exists."""
    p = session.scalar(select(Project).where(Project.name == name))
    if p is None or not (member_role(session, principal, p) or project_actions(session, principal, p)):
        raise NotFound(f"project {name} not found")
    return p


def require_role(session: Session, principal: Principal, project: Project, roles: tuple[str, ...]) -> None:
    """Managing a project (members, tokens): one of `roles` in it, or a site admin."""
    if principal.kind == "user" and principal.is_admin:
        return
    if member_role(session, principal, project) not in roles:
        raise PermissionDenied(f"you need the {' or '.join(roles)} role in project {project.name}")


def require_admin(principal: Principal, what: str = "may do this") -> None:
    if not (principal.kind == "user" and principal.is_admin):
        raise PermissionDenied(f"only site admins {what}")


@functools.cache
def _statements() -> dict[str, Any]:
    """authorize's two queries, built once over plain columns: it runs on every registry token request, and
    building, cache-keying and ORM-loading a statement cost more than running it."""
    p, m, g = Project.__table__, Membership.__table__, Group.__table__
    return {
        "project": select(p.c.id, p.c.name, p.c.kind).where(p.c.name == bindparam("name")),
        # member_role's rule, as one statement
        "roles": select(m.c.role).where(m.c.project_id == bindparam("pid"), or_(
            m.c.user_id == bindparam("uid"),
            m.c.group_id.in_(select(g.c.id).where(g.c.name.in_(bindparam("groups", expanding=True)))))),
    }


def authorize(session: Session, principal: Principal, repository: str, requested: Iterable[str]) -> set[str]:
    """The actions (pull/push/delete/list) on `repository` granted to `principal`: requested ∩ allowed."""
    want = expand(requested)
    parts = split_repository(repository)
    if not want or parts is None:
        return set()
    session.flush()                            # what the caller changed in this session counts (no-op if none)
    q = _statements()
    conn = session.connection()
    project = conn.execute(q["project"], {"name": parts[0]}).first()
    if project is None:
        return set()
    role = None
    if principal.kind == "user":
        roles = set(conn.execute(q["roles"], {"pid": project.id, "uid": principal.user_id,
                                              "groups": sorted(principal.groups)}).scalars())
        role = next((r for r in ROLES if r in roles), None)
    return set(want & allowed_actions(principal, project, role))
