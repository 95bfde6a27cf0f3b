"""Shared CLI plumbing: JSON output, progress bars (errors: app.py; sizes and durations: nagaya.units)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True)
STATE: dict[str, bool] = {"debug": False}


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


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
