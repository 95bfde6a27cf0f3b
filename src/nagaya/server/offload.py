"""Thread pools of their own: a small one for the quick, hot handlers (token service, portal pages), and one
for handlers that wait on job operations, so that neither waits behind the other or the default pool."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.to_thread

THREADS = 4
_limiter: anyio.CapacityLimiter | None = None


async def quick(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in the small pool (see `offload`)."""
    global _limiter
    if _limiter is None:                # created inside the event loop that uses it
        _limiter = anyio.CapacityLimiter(THREADS)
    return await anyio.to_thread.run_sync(fn, *args, limiter=_limiter)


def offload(fn: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Run a quick handler (database + template or signature) in a pool of THREADS threads, in arrival
    order. Forty threads contending for the GIL (FastAPI's default for sync handlers) turn a burst of
    requests into a long latency tail and cost CPU in GIL hand-offs; four keep every core busy and the
    queue fair. Handlers that wait on something slow (PAM, the registry, the job spool) stay on the
    default pool."""
    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return await quick(functools.partial(fn, *args, **kwargs))
    return run


JOB_THREADS = 16                  # job operations in flight per server process, all users together
_job_limiter: anyio.CapacityLimiter | None = None


def job_pool(fn: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Run a handler that waits on a job operation (the dispatcher, slurmrestd) in a pool of its own,
    JOB_THREADS threads: however long such operations take, the default pool (logins, password /token)
    and the quick pool (pages, tokens) stay free. One user holds at most jobs.USER_OPS of these threads
    (sched/onbehalf.py: Bounded); a request beyond that is answered 429 at once."""
    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        global _job_limiter
        if _job_limiter is None:
            _job_limiter = anyio.CapacityLimiter(JOB_THREADS)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=_job_limiter)
    return run
