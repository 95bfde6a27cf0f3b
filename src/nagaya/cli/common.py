"""Shared CLI plumbing: error handling, JSON output, sizes, progress bars."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console

from nagaya.errors import NagayaError

console = Console(soft_wrap=True)
err_console = Console(stderr=True)
STATE: dict[str, bool] = {"debug": False}


def fail(e: NagayaError) -> None:
    if STATE["debug"]:
        raise e
    sys.stderr.write(f"nagaya: {e.message}\n")     # one line, never wrapped
    raise typer.Exit(e.exit_code)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        return int(float(t) * mult)
    except ValueError:
        from nagaya.errors import UsageError

        raise UsageError(f"invalid size {text!r} (e.g. 500M, 20G)") from None


@contextlib.contextmanager
def byte_progress(description: str, enabled: bool, total: int | None = None) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on a TTY (never with --json); yields an `advance(nbytes)` callback."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeElapsedColumn(), console=err_console, transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)
