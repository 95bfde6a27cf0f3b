"""Forward a CLI audit record to the site's one audit trail (`POST /api/audit`), best effort.

The local JSONL log stays the record of truth for the user; the site copy is what admins query
(`nagaya admin audit`). Only the login whose registry the image lives in (or, for local images, the most
recent login) is told; an unreachable server never slows or fails the command for long."""

from __future__ import annotations

import json
from typing import Any

TIMEOUT = 3.0


def forward(event: Any) -> bool:
    """`event`: a nagaya.audit.AuditEvent. True when the server recorded it."""
    try:
        from nagaya.client import authfile

        host = str(getattr(event, "image", "") or "").split("/", 1)[0]
        entries = authfile.load().get("nagaya") or {}
        login = authfile.current(host if host in entries else None)
    except Exception:       # not logged in, unreadable auth file: nothing to forward
        return False
    import httpx

    body = json.loads(event.to_json())
    try:
        r = httpx.post(f"{login.server.rstrip('/')}/api/audit", json=body, timeout=TIMEOUT,
                       auth=(login.username, login.secret))
    except httpx.HTTPError:
        return False
    return r.status_code == 201
