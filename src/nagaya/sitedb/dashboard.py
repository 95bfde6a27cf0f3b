"""The portal's dashboard: the projects, newest repositories and live robot tokens a caller sees, in four
queries whatever the number of projects."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, or_, select

from nagaya.sitedb.authz import ROLES, Principal, allowed_actions
from nagaya.sitedb.models import Group, Membership, Project, Repository, RobotToken, Tag, User, utcnow
from nagaya.sitedb.part import Part
from nagaya.sitedb.projects import ProjectInfo
from nagaya.sitedb.repositories import RepositoryInfo
from nagaya.sitedb.tokens import MANAGERS


@dataclass
class Summary:
    projects: list[ProjectInfo]
    repositories: list[RepositoryInfo]     # newest first
    active_tokens: int


@functools.cache
def _summary_statements() -> dict[str, Any]:
    """The dashboard's statements, built once, over plain columns: on SQLite, building a statement, keying it
    for the compiled cache and loading ORM objects cost several times what running the query does."""
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


class Dashboard(Part):
    def summary(self, principal: Principal) -> Summary:
        """Every role at once (the membership rule of `authz.member_role`, for all projects), then
        `authz.allowed_actions` — the same pure rule the token service applies — per project."""
        q = _summary_statements()
        db = self.s.connection()
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
            if principal.is_admin or role in MANAGERS:
                manage.append(p.id)
        repos: list[RepositoryInfo] = []
        if listable:
            repos = [RepositoryInfo(name=n, project=listable[pid], tags=int(c), updated_at=t)
                     for n, pid, c, t in db.execute(q["repositories"], {"pids": list(listable)})]
        tokens = 0
        if manage:
            tokens = int(db.execute(q["tokens"], {"pids": manage, "now": utcnow()}).scalar() or 0)
        return Summary(projects=projects, repositories=repos, active_tokens=tokens)
