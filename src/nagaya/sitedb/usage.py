"""Storage use and quotas of projects: the one figure the quota check, the admin page, the API and the CLI
show, and the check itself.

A project uses the size of each distinct manifest tagged in it, once however many tags point at it (layers
shared between images count once per image: an upper bound of what the registry stores).

Quota design: the registry cannot be asked "how big will this push be" before it happens, so the token
service refuses the `push` scope once a project's indexed size has reached its quota. That stops every
client (skopeo, docker, `nagaya push`) at its first request, before any blob is uploaded, with a message."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select

from nagaya.errors import UsageError
from nagaya.sitedb.authz import Principal, require_admin, split_repository, visible_project
from nagaya.sitedb.models import Project, Repository, Tag, User, utcnow
from nagaya.sitedb.part import Part
from nagaya.units import format_size


@dataclass
class ProjectUsage:
    name: str
    kind: str
    owner: str
    used: int               # bytes: each distinct manifest once
    quota: int | None       # None: no quota
    attachments: int = 0    # of `used`: signatures, SBOMs, lazy-pull squashfs (nagaya.image.attachments)


@dataclass
class Quota:
    project: str
    quota_bytes: int | None         # None: no quota
    used_bytes: int                 # what the quota check counts


class Usage(Part):
    def used_bytes(self, project_ids: Iterable[int] | None = None) -> dict[int, int]:
        """Bytes used per project id (all projects when None); a project without tags is absent."""
        per_digest = (select(Repository.project_id, Tag.digest, func.max(Tag.size).label("size"))
                      .join(Repository, Tag.repository_id == Repository.id)
                      .group_by(Repository.project_id, Tag.digest))
        if project_ids is not None:
            per_digest = per_digest.where(Repository.project_id.in_(list(project_ids)))
        sub = per_digest.subquery()
        rows = self.s.execute(select(sub.c.project_id, func.coalesce(func.sum(sub.c.size), 0))
                              .group_by(sub.c.project_id))
        return {int(pid): int(n) for pid, n in rows}

    def attachment_bytes(self, project_ids: Iterable[int] | None = None) -> dict[int, int]:
        """Of `used_bytes`, what attachments take (tags named after an image: nagaya.image.attachments),
        each manifest once: stored bytes the quota counts, shown apart so nobody wonders where they went."""
        from nagaya.image.attachments import parse

        q = (select(Repository.project_id, Tag.name, Tag.digest, Tag.size)
             .join(Repository, Tag.repository_id == Repository.id).where(Tag.name.like("sha256-%")))
        if project_ids is not None:
            q = q.where(Repository.project_id.in_(list(project_ids)))
        per: dict[int, dict[str, int]] = {}
        for pid, name, digest, size in self.s.execute(q):
            if parse(name):
                d = per.setdefault(int(pid), {})
                d[digest] = max(int(size or 0), d.get(digest, 0))
        return {pid: sum(d.values()) for pid, d in per.items()}

    def _quota(self, p: Project) -> Quota:
        return Quota(project=p.name, quota_bytes=p.quota_bytes, used_bytes=self.used_bytes([p.id]).get(p.id, 0))

    def quota(self, principal: Principal, name: str) -> Quota:
        """A project's quota and use, for whoever may see the project."""
        return self._quota(visible_project(self.s, principal, name))

    def quota_attachments(self, principal: Principal, name: str) -> int:
        """Of the project's use (`quota`), the bytes attachments take, for whoever may see the project."""
        p = visible_project(self.s, principal, name)
        return self.attachment_bytes([p.id]).get(p.id, 0)

    def usage_overview(self, principal: Principal) -> list[ProjectUsage]:
        """Every project's use and quota, for site admins."""
        require_admin(principal, "see storage use")
        used, attached = self.used_bytes(), self.attachment_bytes()
        return [ProjectUsage(name=p.name, kind=p.kind, owner=owner or "", used=used.get(p.id, 0),
                             quota=p.quota_bytes, attachments=attached.get(p.id, 0))
                for p, owner in self.s.execute(select(Project, User.name)
                                               .outerjoin(User, Project.owner_id == User.id).order_by(Project.name))]

    def set_quota(self, principal: Principal, name: str, quota: int | None) -> Quota:
        require_admin(principal)
        p = self.named_project(name)
        if quota is not None and quota < 0:
            raise UsageError("a quota cannot be negative")
        p.quota_bytes = quota
        self.audit("admin.quota", principal.name, details={"project": name, "quota_bytes": quota})
        return self._quota(p)

    def push_refusal(self, repository: str) -> str | None:
        """Why a push to `repository` must be refused now (None: it may go ahead): a frozen personal project
        (its owner's account expired) or a project at its quota."""
        parts = split_repository(repository)
        project = self.s.scalar(select(Project).where(Project.name == parts[0])) if parts else None
        if project is None:
            return None
        owner = project.owner
        if project.kind == "personal" and owner is not None and owner.expires_at is not None \
                and owner.expires_at <= utcnow():
            return f"project {project.name} is frozen: its owner's account expired on {owner.expires_at:%Y-%m-%d}"
        if project.quota_bytes is None:
            return None
        used = self._quota(project).used_bytes
        if used >= project.quota_bytes:
            return (f"project {project.name} is over its storage quota "
                    f"({format_size(used)} used of {format_size(project.quota_bytes)}); "
                    f"delete tags or ask a site admin to raise it")
        return None
