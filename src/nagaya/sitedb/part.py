"""What every part of the site database's door shares: one session, and the one way to write an audit row.

Each concern is a part in its own module (users, projects, tokens, repositories, usage, auditlog, archive,
dashboard); `SiteService` (service.py) is all of them over one session. Every check goes through `authz`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from nagaya.errors import NotFound
from nagaya.sitedb.models import AuditEvent, Project


class Part:
    def __init__(self, session: Session) -> None:
        self.s = session

    def audit(self, action: str, actor: str, *, repository: str = "", tag: str = "", digest: str = "",
              source: str = "", event_id: str | None = None, details: dict[str, Any] | None = None) -> None:
        """Add one event to the audit trail (committed with the session's other changes)."""
        self.s.add(AuditEvent(action=action, actor=actor, repository=repository, tag=tag, digest=digest,
                              source=source, event_id=event_id, details=details or {}))

    def named_project(self, name: str) -> Project:
        """A project by name, for site admins' operations (callers check the admin right first)."""
        p = self.s.scalar(select(Project).where(Project.name == name))
        if p is None:
            raise NotFound(f"project {name} not found")
        return p
