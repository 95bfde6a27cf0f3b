"""The default backend: bubblewrap, run as the first process of nagaya's pid namespace.

As pid 1 of that namespace bwrap's monitor ignores signals it has no handler for, so a TERM sent to the
job's whole process group (scancel, timeout, `kill -- -PGID`) reaches the app and never the monitor —
bwrap 0.8 run the ordinary way would die of it and take the app down with SIGKILL.
"""

from __future__ import annotations

from nagaya.runtime.backends import SandboxPlan


class Bwrap:
    name = "bwrap"

    def __init__(self, exe: str) -> None:
        self.exe = exe

    def command(self, plan: SandboxPlan) -> tuple[list[str], dict[str, str]]:
        a = [self.exe, "--die-with-parent", "--bind", plan.root, "/", "--bind", plan.proc, "/proc",
             "--dev", "/dev", "--ro-bind", "/sys", "/sys"]
        if plan.status_fd >= 0:
            a += ["--json-status-fd", str(plan.status_fd)]
        for dst, src in plan.extra_files.items():
            a += ["--ro-bind", src, dst]
        for b in plan.binds:
            a += ["--dev-bind" if b.device else ("--ro-bind" if b.readonly else "--bind"), b.src, b.dst]
        if plan.readonly:
            a += ["--remount-ro", "/"]
        a += ["--chdir", plan.cwd, "--", *plan.argv]
        return a, plan.env
