"""A small thread pool of its own for the quick, hot handlers (token service, portal pages)."""

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
