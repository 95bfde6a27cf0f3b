"""The repository index: what the registry holds (kept from its push/delete notifications), listed per the
caller's rights, and dropped at once when the server itself deletes an image."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, or_, select

from nagaya.errors import NotFound
from nagaya.sitedb.authz import Principal, project_actions, split_repository, visible_project
from nagaya.sitedb.models import AuditEvent, Project, Repository, Tag, utcnow
from nagaya.sitedb.part import Part

MANIFEST_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
})


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
    tags: int                   # image tags; attachments (sha256-HEX.sig, .sbom, .sqfs) are counted apart
    updated_at: datetime | None
    attachments: int = 0


class Repositories(Part):
    def repositories(self, principal: Principal, project: str | None = None) -> list[RepositoryInfo]:
        if project is not None:
            p = visible_project(self.s, principal, project)
            projects = [p] if "list" in project_actions(self.s, principal, p) else []
        else:
            projects = [p for p in self.s.scalars(select(Project))
                        if "list" in project_actions(self.s, principal, p)]
        if not projects:
            return []
        q = select(Repository).where(Repository.project_id.in_([p.id for p in projects])).order_by(Repository.name)
        from nagaya.image.attachments import parse

        out = []
        for r in self.s.scalars(q):
            if not r.tags:
                continue
            attached = sum(1 for t in r.tags if parse(t.name))
            out.append(RepositoryInfo(name=r.name, project=r.project.name, tags=len(r.tags) - attached,
                                      updated_at=max(t.pushed_at for t in r.tags), attachments=attached))
        return out

    def tags(self, principal: Principal, repository: str) -> list[TagInfo]:
        """The repository's tags, if the caller may list it; otherwise NotFound, as for a missing one."""
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

    def forget_manifest(self, repository: str, digest: str) -> int:
        """Drop the index's tags of a manifest the server just deleted in the registry, so the next page is
        right at once; the registry's own notification still writes the audit event."""
        repo = self.s.scalar(select(Repository).where(Repository.name == repository))
        if repo is None:
            return 0
        n = len([t for t in repo.tags if t.digest == digest])
        self.s.execute(delete(Tag).where(Tag.repository_id == repo.id, Tag.digest == digest))
        self.s.expire(repo)
        return n
