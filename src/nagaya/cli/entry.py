"""The `nagaya` executable. `run`, `shell` and `exec` take a lean path that never imports Typer,
Rich or anything of the server: container start-up time is the product."""

from __future__ import annotations

import os
import sys

FAST = {"run", "shell", "exec"}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in FAST:
        from nagaya.cli.run_cmd import main as run_main

        _exit_now(run_main(args[0], args[1:]))
    if args and args[0] == "submit":
        from nagaya.cli.submit_fast import main as submit_main

        code = submit_main(args[1:])
        if code is not None:
            _exit_now(code)
    from nagaya.cli.app import main as app_main

    app_main(args)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's finalization (tearing down every module and object: a few ms
    after the container has already exited). Nothing on the run path registers atexit work; the
    standard streams are all there is to flush, and a failure there takes sys.exit's usual path."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        sys.exit(code)
    os._exit(code)


def debug_enabled(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("NAGAYA_DEBUG") == "1"
