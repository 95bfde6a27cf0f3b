"""nagaya.units: one way to read and print sizes, durations, times and ages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nagaya.errors import UsageError
from nagaya.units import format_age, format_size, parse_day, parse_duration, parse_expiry, parse_size, parse_when


@pytest.mark.parametrize(("text", "n"), [
    ("20G", 20 << 30), ("20GB", 20 << 30), ("20GiB", 20 << 30), ("512MiB", 512 << 20), ("512m", 512 << 20),
    ("1.5GB", 3 << 29), ("100", 100), ("100B", 100), ("4 KiB", 4096), ("2T", 2 << 40),
])
def test_sizes_are_iec_whatever_the_suffix(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "G", "20X", "20Gi", "-1G", "1e3"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_sizes_print_in_iec_units() -> None:
    assert format_size(0) == "0 B" and format_size(None) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1024) == "1.0 KiB"
    assert format_size(3 << 29) == "1.5 GiB"
    assert format_size(parse_size("20G")) == "20.0 GiB"


@pytest.mark.parametrize(("text", "secs"), [
    ("30s", 30), ("10m", 600), ("12h", 43200), ("7d", 7 * 86400), ("2w", 14 * 86400), ("30", 30 * 86400),
    ("1.5h", 5400),
])
def test_durations(text: str, secs: int) -> None:
    assert parse_duration(text) == timedelta(seconds=secs)


def test_expiry_never_and_bad() -> None:
    assert parse_expiry("never") is None and parse_expiry("0") is None
    assert parse_expiry("30d") == timedelta(days=30)
    for bad in ("soon", "0s", "-3d"):
        with pytest.raises(UsageError):
            parse_expiry(bad)


def test_when_takes_an_iso_time_or_an_age() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert parse_when("7d", now) == now - timedelta(days=7)
    assert parse_when("2026-01-31", now) == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse_when("2026-01-31T10:00:00+01:00", now).hour == 10
    with pytest.raises(UsageError):
        parse_when("yesterday", now)


def test_day_filters_end_inclusive() -> None:
    assert parse_day("") is None
    assert parse_day("2026-01-31", end=True) == datetime(2026, 2, 1)
    with pytest.raises(UsageError):
        parse_day("31/01/2026")


def test_ages() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert format_age(now - timedelta(seconds=5), now) == "just now"
    assert format_age(now - timedelta(minutes=1), now) == "1 minute ago"
    assert format_age((now - timedelta(days=3)).replace(tzinfo=None), now) == "3 days ago"
    assert format_age(now - timedelta(days=15), now) == "2 weeks ago"
