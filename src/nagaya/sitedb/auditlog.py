"""The one audit trail (server events, registry notifications, CLI reports) as the doors read and feed it:
one query with every filter the API, the admin pages and `nagaya admin audit` offer, one row shape for the
API, the page and its CSV/JSON exports, and the intake of the CLI's own records (forwarded at once by
`POST /api/audit`, or ingested later from the site spool). Rows are written by `Part.audit`."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select

from nagaya.errors import PermissionDenied, UsageError
from nagaya.sitedb.authz import Principal, require_admin
from nagaya.sitedb.models import AuditEvent
from nagaya.sitedb.part import Part

COLUMNS = ("time", "action", "actor", "repository", "tag", "digest", "source", "details")
MAX_ROWS = 100000
# Actions a CLI may report; registry.*, admin.*, login and the like are written by the server only.
CLI_ACTION_RE = re.compile(r"^(run|exec|shell|pull|push|submit|build|import|export|reproduce)$")


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


def as_row(e: AuditEvent, timespec: str = "auto") -> dict[str, Any]:
    """One event as JSON-ready fields; times are UTC with a `Z` (`timespec="seconds"` for pages)."""
    return {"time": e.time.isoformat(timespec=timespec) + "Z", "action": e.action, "actor": e.actor,
            "repository": e.repository, "tag": e.tag, "digest": e.digest, "source": e.source, "details": e.details}


def cli_event_id(actor: str, ev: dict[str, Any]) -> str:
    """One id per CLI record and actor: the copy forwarded at once (`POST /api/audit`) and the copy
    ingested later from the site spool are the same event. Namespaced by the authenticated actor, so a
    user can never pre-empt someone else's record with a chosen id."""
    rid = ev.get("id")
    key = str(rid) if isinstance(rid, str) and rid else json.dumps(ev, sort_keys=True, default=str)
    return "cli:" + hashlib.sha256(f"{actor}\0{key}".encode()).hexdigest()[:56]


def spool_time(ev: dict[str, Any], now: datetime) -> datetime:
    """When a spooled record happened: its own time (it may be ingested days later), never in the future."""
    try:
        t = datetime.fromisoformat(str(ev.get("time") or "").replace("Z", "+00:00"))
    except ValueError:
        return now
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    return min(t, now)


class AuditLog(Part):
    def audit_events(self, principal: Principal, q: AuditQuery) -> list[AuditEvent]:
        """The audit trail for site admins, filtered; the newest `limit` events, newest first unless asked."""
        require_admin(principal, "read the audit table")
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
        rows = list(self.s.scalars(stmt))
        return rows[::-1] if q.oldest_first else rows

    def ingest_cli_event(self, principal: Principal, ev: dict[str, Any], source: str) -> bool:
        """A record from a user's CLI (run, submit, pull, ...). The actor is the authenticated caller, never
        a name in the body; the server's clock stamps it (the client's time is kept in details)."""
        if principal.kind != "user":
            raise PermissionDenied("only users report their own activity")
        return self.record_cli_event(principal.name, ev, source)

    def record_cli_event(self, actor: str, ev: dict[str, Any], source: str, when: datetime | None = None) -> bool:
        """Store one CLI record for `actor` (already authenticated, or the owner of a spool file). False when
        the same record is already in the trail."""
        action = str(ev.get("action") or "")
        if not CLI_ACTION_RE.match(action):
            raise UsageError(f"action {action!r} cannot be reported by a client")
        event_id = cli_event_id(actor, ev)
        if self.s.scalar(select(AuditEvent.id).where(AuditEvent.event_id == event_id)):
            return False
        image = str(ev.get("image") or "")[:500]
        ref = parse_image(image) if image else ImageRef("", "", "")
        digest = str(ev.get("digest") or ref.digest)[:100]
        details = {k: ev.get(k) for k in ("id", "image", "command", "cwd", "host", "exit_code", "duration_s",
                                          "time", "uid") if ev.get(k) not in (None, "", [])}
        extra = ev.get("details")
        if isinstance(extra, dict):
            details.update({k: v for k, v in extra.items() if k not in details})
        row = AuditEvent(action=f"cli.{action}", actor=actor, repository=ref.repository[:255], tag=ref.tag[:128],
                         digest=digest, source=source[:64], event_id=event_id, details=details)
        if when is not None:
            row.time = when
        self.s.add(row)
        return True
