"""Password guessing is slowed the same way on every route that takes a password (the portal's login form,
`POST /api/login`, and `GET /token` with a password): MAX_FAILURES failed tries per user and client address
within FAILURE_WINDOW, counted in the database so that every server process refuses alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, insert, select

from nagaya.store import Database
from nagaya.store.models import LoginFailure

MAX_FAILURES = 5                   # per user+IP within FAILURE_WINDOW, then 429 until the window passes
FAILURE_WINDOW = 600


class LoginLimiter:
    """Failed logins per (user, client address): a password guesser gets MAX_FAILURES tries per window,
    counted in the database so that every server process refuses alike."""

    def __init__(self, db: Database, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.limit, self.window, self.clock = db, limit, window, clock

    def _who(self, user: str, ip: str) -> Any:
        return (LoginFailure.username == user[:128]) & (LoginFailure.address == ip[:64])

    def blocked(self, user: str, ip: str) -> float:
        """Seconds until the next try is allowed (0: allowed)."""
        now = self.clock()
        with self.db.engine.connect() as c:
            times = list(c.scalars(select(LoginFailure.time).where(self._who(user, ip),
                                                                   LoginFailure.time > now - self.window)
                                   .order_by(LoginFailure.time)))
        if len(times) < self.limit:
            return 0.0
        # allowed again when fewer than `limit` failures remain inside the window
        return max(0.0, self.window - (now - times[len(times) - self.limit]))

    def failed(self, user: str, ip: str) -> None:
        now = self.clock()
        with self.db.engine.begin() as c:
            c.execute(delete(LoginFailure).where(LoginFailure.time < now - self.window))
            c.execute(insert(LoginFailure).values(username=user[:128], address=ip[:64], time=now))

    def succeeded(self, user: str, ip: str) -> None:
        with self.db.engine.begin() as c:
            c.execute(delete(LoginFailure).where(self._who(user, ip)))
