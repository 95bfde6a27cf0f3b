"""The audit trail as rows: one shape for the API, the portal's page and its CSV/JSON exports."""

from __future__ import annotations

from typing import Any

from nagaya.store.models import AuditEvent

COLUMNS = ("time", "action", "actor", "repository", "tag", "digest", "source", "details")


def as_row(e: AuditEvent, timespec: str = "auto") -> dict[str, Any]:
    """One event as JSON-ready fields; times are UTC with a `Z` (`timespec="seconds"` for pages)."""
    return {"time": e.time.isoformat(timespec=timespec) + "Z", "action": e.action, "actor": e.actor,
            "repository": e.repository, "tag": e.tag, "digest": e.digest, "source": e.source, "details": e.details}
