"""Batch jobs: the `Scheduler` protocol and its backends, chosen by config (`[sched] backend`) or `--backend`.

`local` is the embedded executor for one machine (local.py, runner.py); `slurm` drives a real cluster
(slurm.py); `gridengine` drives Son of Grid Engine (gridengine.py), `pbs` OpenPBS (pbs.py).
Every job runs `nagaya run NAME@DIGEST ...` with the digest resolved at submit time.

The portal and /api/jobs use the same protocol, with the same JobSpec and JobInfo, on behalf of a logged-in
user: sched/onbehalf.py's `UserSchedulers.for_user` gives a Scheduler that acts as that user, through the
root dispatcher (server/jobs.py: the user's own backend, run as the user) or slurmrestd (slurmrest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from nagaya.sched.models import STATES, JobInfo, JobSpec, parse_script, parse_time

__all__ = ["STATES", "JobInfo", "JobSpec", "Scheduler", "get_scheduler", "parse_script", "parse_time"]

BACKENDS = ("local", "slurm", "gridengine", "pbs")


class Scheduler(Protocol):
    name: str

    def submit(self, spec: JobSpec) -> str: ...

    def status(self, job_id: str) -> JobInfo: ...

    def list(self, all_users: bool = False) -> list[JobInfo]: ...

    def cancel(self, job_id: str) -> None: ...

    def suspend(self, job_id: str) -> None: ...

    def resume(self, job_id: str) -> None: ...

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]: ...

    def hold(self, job_id: str) -> None:
        """Keep a pending job from starting (a user hold) until release()."""
        ...

    def release(self, job_id: str) -> None: ...

    def usage(self, job_id: str) -> list[dict[str, Any]]:
        """The job's resource use over time (UsageSample dicts, oldest first); [] where the backend has none."""
        ...


def get_scheduler(cfg: Any, backend: str | None = None) -> Scheduler:
    from nagaya.errors import UsageError

    name = backend or cfg.sched.backend
    if name == "local":
        from nagaya.sched.local import LocalScheduler

        return LocalScheduler(cfg)
    if name == "slurm":
        from nagaya.sched.slurm import SlurmScheduler

        return SlurmScheduler(cfg)
    if name == "gridengine":
        from nagaya.sched.gridengine import GridEngineScheduler

        return GridEngineScheduler(cfg)
    if name == "pbs":
        from nagaya.sched.pbs import PBSScheduler

        return PBSScheduler(cfg)
    raise UsageError(f"unknown scheduler backend {name!r} (one of: {', '.join(BACKENDS)})")
