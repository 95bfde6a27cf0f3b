"""Storage use of projects: the one figure the quota check, the admin page, the API and the CLI show.

A project uses the size of each distinct manifest tagged in it, once however many tags point at it (layers
shared between images count once per image: an upper bound of what the registry stores)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from nagaya.errors import PermissionDenied
from nagaya.store.authz import Principal
from nagaya.store.models import Project, Repository, Tag, User


@dataclass
class ProjectUsage:
    name: str
    kind: str
    owner: str
    used: int               # bytes: each distinct manifest once
    quota: int | None       # None: no quota


def used_bytes(s: Session, project_ids: Iterable[int] | None = None) -> dict[int, int]:
    """Bytes used per project id (all projects when None); a project without tags is absent."""
    per_digest = (select(Repository.project_id, Tag.digest, func.max(Tag.size).label("size"))
                  .join(Repository, Tag.repository_id == Repository.id)
                  .group_by(Repository.project_id, Tag.digest))
    if project_ids is not None:
        per_digest = per_digest.where(Repository.project_id.in_(list(project_ids)))
    sub = per_digest.subquery()
    rows = s.execute(select(sub.c.project_id, func.coalesce(func.sum(sub.c.size), 0)).group_by(sub.c.project_id))
    return {int(pid): int(n) for pid, n in rows}


def project_used(s: Session, project: Project) -> int:
    return used_bytes(s, [project.id]).get(project.id, 0)


def usage_overview(s: Session, principal: Principal) -> list[ProjectUsage]:
    """Every project's use and quota, for site admins."""
    if not (principal.kind == "user" and principal.is_admin):
        raise PermissionDenied("only site admins see storage use")
    used = used_bytes(s)
    return [ProjectUsage(name=p.name, kind=p.kind, owner=owner or "", used=used.get(p.id, 0), quota=p.quota_bytes)
            for p, owner in s.execute(select(Project, User.name).outerjoin(User, Project.owner_id == User.id)
                                      .order_by(Project.name))]
