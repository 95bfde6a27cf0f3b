"""Password guessing is slowed the same way on every route that takes a password (the portal's login form,
`POST /api/login`, and `GET /token` with a password), counted in the database so that every server
process refuses alike.

Two rules make the limit hold and keep it from being turned against the user (THREAT_MODEL.md):

* Attempts in flight count. An attempt is *reserved* (a row written and committed) before PAM or LDAP is
  asked, and counted after: of N concurrent guesses at most MAX_FAILURES reach the password check. The
  row stays as the failure if the password was wrong, and goes if it was right or the check broke.
* A third party cannot lock a user out (OWASP's device cookies). Every local user shares 127.0.0.1, so a
  budget per user+address is everyone's budget. A client that logged in as that user before holds a device
  token (the portal: a cookie; `nagaya login`: a header, kept in the auth file) signed by the server for
  that user; its attempts count against that device's own budget, which others' failures never touch.
  Clients without one share the per user+address budget, which is what a guesser exhausts. Personal
  access and robot tokens are never subject to this limiter at all (no password is checked for them).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, insert, select

from nagaya.sitedb import SiteDatabase
from nagaya.sitedb.models import LoginFailure

MAX_FAILURES = 5                   # per user+IP (or device) within FAILURE_WINDOW, then 429 until it passes
FAILURE_WINDOW = 600
DEVICE_PREFIX = "device:"          # in LoginFailure.address: a device's own budget, apart from addresses


class LoginLimiter:
    """Failed (and in-flight) logins per (user, client address or device): MAX_FAILURES per window."""

    def __init__(self, db: SiteDatabase, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.limit, self.window, self.clock = db, limit, window, clock

    def _who(self, user: str, key: str) -> Any:
        return (LoginFailure.username == user[:128]) & (LoginFailure.address == key[:64])

    def _times(self, user: str, key: str, now: float) -> list[float]:
        with self.db.engine.connect() as c:
            return list(c.scalars(select(LoginFailure.time).where(self._who(user, key),
                                                                 LoginFailure.time > now - self.window)
                                  .order_by(LoginFailure.time)))

    def _wait(self, times: list[float], now: float) -> float:
        if len(times) < self.limit:
            return 0.0
        # allowed again when fewer than `limit` failures remain inside the window
        return max(1.0, self.window - (now - times[len(times) - self.limit]))

    def blocked(self, user: str, key: str) -> float:
        """Seconds until the next try is allowed (0: allowed)."""
        now = self.clock()
        return self._wait(self._times(user, key, now), now)

    def reserve(self, user: str, key: str) -> tuple[int | None, float]:
        """Book one attempt before the password is checked: (its id, 0), or (None, seconds to wait) when
        the budget is spent, in-flight attempts included. Counted after the booking is committed, so of
        any number of concurrent attempts at most `limit` get an id: the last of them to count sees all."""
        now = self.clock()
        with self.db.engine.begin() as c:
            c.execute(delete(LoginFailure).where(LoginFailure.time < now - self.window))
            rid = int(c.execute(insert(LoginFailure).values(username=user[:128], address=key[:64], time=now))
                      .inserted_primary_key[0])
        times = self._times(user, key, now)
        if len(times) <= self.limit:
            return rid, 0.0
        self.release(rid)
        if now in times:
            times.remove(now)
        return None, self._wait(times, now)

    def release(self, rid: int) -> None:
        """The attempt did not count (a right password, or the check itself failed)."""
        with self.db.engine.begin() as c:
            c.execute(delete(LoginFailure).where(LoginFailure.id == rid))

    def failed(self, user: str, key: str) -> None:
        now = self.clock()
        with self.db.engine.begin() as c:
            c.execute(delete(LoginFailure).where(LoginFailure.time < now - self.window))
            c.execute(insert(LoginFailure).values(username=user[:128], address=key[:64], time=now))

    def succeeded(self, user: str, key: str) -> None:
        with self.db.engine.begin() as c:
            c.execute(delete(LoginFailure).where(self._who(user, key)))


class Devices:
    """Device tokens (OWASP "slow down online guessing attacks with device cookies"): `nonce.mac`, the mac
    an HMAC of user and nonce under a key only the server holds, so a token is good for one user only and
    cannot be made by anyone else. The nonce names the device's budget."""

    def __init__(self, key: bytes) -> None:
        self.key = hashlib.sha256(b"nagaya device tokens\0" + key).digest()

    def _mac(self, user: str, nonce: str) -> str:
        return hmac.new(self.key, f"{user}\0{nonce}".encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, user: str) -> str:
        nonce = secrets.token_urlsafe(12)
        return f"{nonce}.{self._mac(user, nonce)}"

    def budget(self, user: str, token: str | None) -> str | None:
        """The limiter key of a device token valid for `user` (None: not one)."""
        token = token or ""
        nonce, _, mac = token.partition(".")
        if not nonce or len(token) > 100 or not hmac.compare_digest(mac.encode(), self._mac(user, nonce).encode()):
            return None
        return DEVICE_PREFIX + nonce
