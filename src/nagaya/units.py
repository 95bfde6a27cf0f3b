"""Sizes, durations, times and ages: the one place they are parsed and printed.

Sizes are IEC everywhere (1 KiB = 1024 B), in and out: `20G`, `20GB` and `20GiB` all mean 20 GiB, so
a quota set in one unit reads back as the same number on the CLI and the portal. Imports nothing heavy:
the run path uses it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from nagaya.errors import UsageError

_IEC = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b?)", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdwy]?)")
_NEVER = ("never", "none", "0")


def format_size(n: float | None) -> str:
    """`1.5 GiB`; whole bytes below 1 KiB (`512 B`). None reads as 0."""
    size = float(n or 0)
    for unit in _IEC:
        if abs(size) < 1024 or unit == _IEC[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """`20G`, `512MiB`, `1.5GB`, `100` (bytes) -> bytes, always powers of 1024."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m or (m.group(3) and m.group(3).lower() == "i"):          # `20Gi` without the B is a typo
        raise UsageError(f"invalid size {text!r} (e.g. 500M, 20G, 1.5GiB)")
    exp = " kmgtp".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1 << (10 * exp)))


def parse_duration(text: str, default_unit: str = "d") -> timedelta:
    """`30s`, `10m`, `12h`, `7d`, `2w`, `1y`; a bare number is in `default_unit` (days)."""
    m = _DURATION_RE.fullmatch(text.strip().lower())
    if not m:
        raise UsageError(f"invalid duration {text!r} (e.g. 30s, 10m, 12h, 7d, 2w)")
    return timedelta(seconds=float(m.group(1)) * _SECONDS[m.group(2) or default_unit])


def parse_expiry(text: str) -> timedelta | None:
    """A token's lifetime: a positive duration, or `never` (also `none`, `0`) for none."""
    if text.strip().lower() in _NEVER:
        return None
    ttl = parse_duration(text)
    if ttl.total_seconds() <= 0:
        raise UsageError(f"invalid duration {text!r}")
    return ttl


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO date/time (UTC unless it has a zone) or an age before now (`7d`, `12h`); zone-aware UTC."""
    now = now or datetime.now(UTC)
    if _DURATION_RE.fullmatch(text.strip().lower()) and text.strip()[-1:].isalpha():
        return now - parse_duration(text)
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"invalid time {text!r} (ISO date/time, or an age like 7d, 12h)") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_day(text: str, end: bool = False) -> datetime | None:
    """A form's date filter (`2026-01-31`, or a date and time), naive UTC as the site database keeps it; `end`
    makes a bare day inclusive (up to the next midnight). Empty: None."""
    if not text:
        return None
    try:
        d = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"dates look like 2026-01-31, not {text!r}") from None
    return d + timedelta(days=1) if end and len(text) <= 10 else d


def naive_utc(t: datetime | None) -> datetime | None:
    """Times arrive with or without a zone; the site database keeps naive UTC."""
    if t is None or t.tzinfo is None:
        return t
    return t.astimezone(UTC).replace(tzinfo=None)


def format_time(t: datetime | str | None) -> str:
    """`2026-01-31 12:00 UTC` (store times are naive UTC); a string (a scheduler's time) as given."""
    if not t:
        return "—"
    if isinstance(t, str):
        return t.replace("T", " ")[:19]
    return t.strftime("%Y-%m-%d %H:%M") + " UTC"


def format_age(t: datetime, now: datetime | None = None) -> str:
    """`just now`, `5 minutes ago`, `3 days ago` (naive times are UTC)."""
    now = now or datetime.now(UTC)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    secs = (now - t).total_seconds()
    if secs < 60:
        return "just now"
    for unit, n in (("week", 7 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= n:
            k = int(secs // n)
            return f"{k} {unit}{'s' if k != 1 else ''} ago"
    raise AssertionError("unreachable")
