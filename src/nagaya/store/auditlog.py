"""The one audit trail (server events, registry notifications, CLI reports) as the doors read it: one query
with every filter the API, the admin pages and `nagaya admin audit` offer, and one row shape for the API,
the page and its CSV/JSON exports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from nagaya.errors import PermissionDenied
from nagaya.store.authz import Principal
from nagaya.store.models import AuditEvent

COLUMNS = ("time", "action", "actor", "repository", "tag", "digest", "source", "details")
MAX_ROWS = 100000


@dataclass(frozen=True)
class ImageRef:
    repository: str      # project/name, without the registry host
    tag: str
    digest: str


def parse_image(ref: str) -> ImageRef:
    """`[HOST[:PORT]/]project/name[:tag][@sha256:...]` or a bare digest -> its parts."""
    ref = ref.strip()
    if ref.startswith("sha256:"):
        return ImageRef("", "", ref)
    name, _, digest = ref.partition("@")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest                                    # drop the registry host
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
    return ImageRef(name, tag, digest)


@dataclass(frozen=True)
class AuditQuery:
    action: str = ""                # a prefix (`registry.` matches every registry event) ...
    exact_action: bool = False      # ... or exactly this action
    actor: str = ""
    repository: str = ""            # a part of the repository's name
    image: str = ""                 # one image's events: [HOST/]PROJECT/NAME[:TAG][@DIGEST], or a digest
    since: datetime | None = None   # naive UTC, as stored
    until: datetime | None = None
    limit: int = 500                # the newest this many
    oldest_first: bool = False


def search(s: Session, principal: Principal, q: AuditQuery) -> list[AuditEvent]:
    """The audit trail for site admins, filtered; the newest `limit` events, newest first unless asked."""
    if not (principal.kind == "user" and principal.is_admin):
        raise PermissionDenied("only site admins read the audit table")
    stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(q.limit, MAX_ROWS)))
    if q.action:
        stmt = stmt.where(AuditEvent.action == q.action if q.exact_action
                          else AuditEvent.action.startswith(q.action, autoescape=True))
    if q.actor:
        stmt = stmt.where(AuditEvent.actor == q.actor)
    if q.repository:
        stmt = stmt.where(AuditEvent.repository.contains(q.repository, autoescape=True))
    if q.since is not None:
        stmt = stmt.where(AuditEvent.time >= q.since)
    if q.until is not None:
        stmt = stmt.where(AuditEvent.time < q.until)
    if q.image:
        ref = parse_image(q.image)
        if ref.digest:
            stmt = stmt.where(AuditEvent.digest == ref.digest)
        if ref.repository:
            stmt = stmt.where(AuditEvent.repository == ref.repository)
        if ref.tag and not ref.digest:
            # a tag names whatever digest it pointed to at the time: match the tag or those digests
            digests = select(AuditEvent.digest).where(AuditEvent.repository == ref.repository,
                                                      AuditEvent.tag == ref.tag, AuditEvent.digest != "")
            stmt = stmt.where(or_(AuditEvent.tag == ref.tag, AuditEvent.digest.in_(digests)))
    rows = list(s.scalars(stmt))
    return rows[::-1] if q.oldest_first else rows


def as_row(e: AuditEvent, timespec: str = "auto") -> dict[str, Any]:
    """One event as JSON-ready fields; times are UTC with a `Z` (`timespec="seconds"` for pages)."""
    return {"time": e.time.isoformat(timespec=timespec) + "Z", "action": e.action, "actor": e.actor,
            "repository": e.repository, "tag": e.tag, "digest": e.digest, "source": e.source, "details": e.details}
