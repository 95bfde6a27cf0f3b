"""Sandbox backends: each turns a prepared root and a mount plan into the argv that starts the app.

nagaya itself prepares what needs no privilege beyond a user namespace (the image mount, the overlay,
/proc of the container's pid namespace); a backend only assembles the final container from it.
"""

from __future__ import annotations

from nagaya.errors import UsageError
from nagaya.record import Factory, Record
from nagaya.runtime.spec import Bind

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from typing import Protocol


class SandboxPlan(Record):
    staging: str                    # private tmpfs for backend state
    root: str                       # the prepared root file system (overlay)
    proc: str                       # procfs of the container's pid namespace
    binds: list[Bind]
    readonly: bool
    cwd: str
    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    status_fd: int = -1             # where the backend reports the app's start (bwrap)
    extra_files: dict[str, str] = Factory(dict)   # container path -> host file (ro)


if TYPE_CHECKING:
    class Backend(Protocol):
        name: str
        exe: str

        def command(self, plan: SandboxPlan) -> tuple[list[str], dict[str, str]]:
            """argv and environment to exec as the pid namespace's first process."""
            ...


def get(name: str, exe: str) -> Backend:
    if name == "bwrap":
        from nagaya.runtime.backends.bwrap import Bwrap

        return Bwrap(exe)
    if name in ("runc", "oci"):
        from nagaya.runtime.backends.runc import Runc

        return Runc(exe)
    raise UsageError(f"unknown backend {name!r} (choose bwrap or runc)")
