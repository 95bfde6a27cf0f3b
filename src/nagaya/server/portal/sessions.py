"""Portal sessions: server-side, in the database (a hash of each random id), with idle and absolute expiry."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import bindparam, delete, insert, or_, select, update

from nagaya.sitedb import Principal, SiteDatabase
from nagaya.sitedb.models import PortalSession

COOKIE = "nagaya_session"
IDLE_TIMEOUT = 2 * 3600            # seconds without a request before a session ends
ABSOLUTE_TIMEOUT = 12 * 3600       # a working day, then log in again
PRINCIPAL_TTL = 30.0               # an admin's account expiry reaches open sessions within this many seconds


@dataclass
class WebSession:
    sid: str
    user: str
    groups: frozenset[str]
    is_admin: bool
    csrf: str
    created: float
    seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)
    key: str = ""                             # what the database knows the session by: sha256 of the id
    flash_saved: list[tuple[str, str]] = field(default_factory=list)


def _session_key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class Sessions:
    """Server-side sessions in the database: logout really ends a session, and every server process (see
    `server.workers`) sees a login and a logout at once. The table keeps a hash of each id, never the id.

    `seen` is written at most every SEEN_RESOLUTION seconds (not on every page view: a write per view would
    serialize page views on the database's write lock), so the idle timeout may end a session up to that
    much early. The principal of a session is cached per process for PRINCIPAL_TTL (`principals`)."""

    SEEN_RESOLUTION = 60.0

    def __init__(self, db: SiteDatabase, idle: float = IDLE_TIMEOUT, absolute: float = ABSOLUTE_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.idle, self.absolute, self.clock = db, idle, absolute, clock
        self.resolution = min(self.SEEN_RESOLUTION, idle / 4)
        self.principals: dict[str, tuple[Principal, float, datetime | None]] = {}
        t = PortalSession
        self._get = select(t.user, t.groups, t.is_admin, t.csrf, t.created, t.seen, t.flash) \
            .where(t.id_hash == bindparam("key"))

    def create(self, user: str, groups: frozenset[str], is_admin: bool) -> WebSession:
        now = self.clock()
        s = WebSession(secrets.token_urlsafe(32), user, groups, is_admin, secrets.token_urlsafe(32), now, now)
        s.key = _session_key(s.sid)
        with self.db.engine.begin() as c:
            c.execute(delete(PortalSession).where(or_(PortalSession.seen < now - self.idle,
                                                      PortalSession.created < now - self.absolute)))
            c.execute(insert(PortalSession).values(id_hash=s.key, user=user, groups=sorted(groups),
                                                   is_admin=is_admin, csrf=s.csrf, created=now, seen=now, flash=[]))
        return s

    def get(self, sid: str | None) -> WebSession | None:
        if not sid or len(sid) > 128:
            return None
        key = _session_key(sid)
        now = self.clock()
        with self.db.engine.begin() as c:
            row = c.execute(self._get, {"key": key}).first()
            if row is None:
                return None
            if now - row.seen > self.idle or now - row.created > self.absolute:
                c.execute(delete(PortalSession).where(PortalSession.id_hash == key))
                self.principals.pop(key, None)
                return None
            seen = row.seen
            if now - seen >= self.resolution:
                seen = now
                c.execute(update(PortalSession).where(PortalSession.id_hash == key).values(seen=now))
        flash = [(str(k), str(m)) for k, m in row.flash or []]
        return WebSession(sid, row.user, frozenset(row.groups or []), bool(row.is_admin), row.csrf, row.created,
                          seen, flash, key, list(flash))

    def save_flash(self, s: WebSession) -> None:
        """Keep the session's messages for its next page (called after a handler changed them)."""
        if s.flash == s.flash_saved:
            return
        with self.db.engine.begin() as c:
            c.execute(update(PortalSession).where(PortalSession.id_hash == s.key)
                      .values(flash=[list(x) for x in s.flash]))
        s.flash_saved = list(s.flash)

    def drop(self, sid: str | None) -> None:
        key = _session_key(sid or "")
        self.principals.pop(key, None)
        with self.db.engine.begin() as c:
            c.execute(delete(PortalSession).where(PortalSession.id_hash == key))
