"""The site's one clock for lifecycle decisions: expiry warnings, the token cut-off at expiry, frozen
projects, portal sessions. It is UTC now, moved by `NAGAYA_CLOCK_OFFSET` (`+10d`, `-2h`, `3600`).

The offset is read once, from the server process's environment. `nagaya site up` starts the server with a
clean environment, so a site's own server always runs on the real clock; tests (and an admin rehearsing a
term's end) start a second server on the same database with the clock moved forward instead of sleeping.
`nagaya admin maintain --now T` is the same idea for the periodic job."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

ENV = "NAGAYA_CLOCK_OFFSET"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_offset(text: str) -> timedelta:
    m = re.fullmatch(r"\s*([+-]?)(\d+)([smhdw]?)\s*", text)
    if not m:
        raise ValueError(f"{ENV}={text!r}: expected [+-]N[s|m|h|d|w]")
    secs = int(m.group(2)) * _UNITS[m.group(3) or "s"]
    return timedelta(seconds=-secs if m.group(1) == "-" else secs)


OFFSET = parse_offset(os.environ.get(ENV, "0"))


def now() -> datetime:
    """Naive UTC (what the site database keeps), moved by the offset."""
    return datetime.now(UTC).replace(tzinfo=None) + OFFSET


def set_offset(offset: timedelta) -> None:
    """For in-process tests."""
    global OFFSET
    OFFSET = offset
