"""Batch jobs: the `Scheduler` protocol and its backends, chosen by config (`[sched] backend`) or `--backend`.

`local` is the embedded executor for one machine (local.py, runner.py); `slurm` drives a real cluster
(slurm.py); `gridengine` drives Son of Grid Engine (gridengine.py).
Every job runs `nagaya run NAME@DIGEST ...` with the digest resolved at submit time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from nagaya.sched.models import STATES, JobInfo, JobSpec, parse_script, parse_time

__all__ = ["STATES", "JobInfo", "JobSpec", "Scheduler", "get_scheduler", "parse_script", "parse_time",
           "pin_image"]

BACKENDS = ("local", "slurm", "gridengine")


class Scheduler(Protocol):
    name: str

    def submit(self, spec: JobSpec) -> str: ...

    def status(self, job_id: str) -> JobInfo: ...

    def list(self, all_users: bool = False) -> list[JobInfo]: ...

    def cancel(self, job_id: str) -> None: ...

    def suspend(self, job_id: str) -> None: ...

    def resume(self, job_id: str) -> None: ...

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]: ...


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
    raise UsageError(f"unknown scheduler backend {name!r} (one of: {', '.join(BACKENDS)})")


def pin_image(cfg: Any, text: str) -> tuple[str, str]:
    """Resolve an image reference now: (the reference jobs run, pinned to its digest; the digest).

    Registry references are resolved tag→digest by a pull (the image is fetched into the submitter's cache
    once); local names pin the digest the local tag points at now, so a later re-tag changes nothing."""
    from nagaya.image.reference import parse
    from nagaya.image.store import open_store

    store = open_store(cfg)
    ref = None
    try:
        ref = parse(text)
    except Exception:
        ref = None                      # a bare digest or digest prefix: store.resolve knows those
    if ref is not None and ref.registry:
        try:
            from nagaya.image import pull
        except ImportError:             # registry pull not installed: only the local cache counts
            pass
        else:
            meta = pull.pull(store, text, cfg, quiet=True)
            return f"{ref.name}@{meta.digest}", meta.digest
    meta = store.resolve(text)
    if ref is None:
        return meta.digest, meta.digest
    return f"{ref.name}@{meta.digest}", meta.digest
