"""Scheduler operations on behalf of one named user: the portal's and /api/jobs' side of the `Scheduler` protocol.

The server (the service account) never holds a `Scheduler` of its own: it asks a `UserSchedulers` for one that
acts AS a named user — over the root dispatcher's spool (server/jobs.py, the user's own backend run as the
user) or over slurmrestd with a JWT for that user (sched/slurmrest.py). Both answer the same `Scheduler`
protocol with the same typed values (JobSpec in, JobInfo out) as the CLI's backends.

What crosses a privilege boundary does so as data: `spec_to_wire` writes the few JobSpec fields the server
may choose, `spec_from_wire` is the strict check the dispatcher and the user's side both apply (unknown
fields, wrong types: refused). The rest of a spec (where it runs, as whom, the pinned reference) is set on
the user's side, never taken from the server.
"""

from __future__ import annotations

import os
import pwd
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from nagaya.errors import NagayaError, PermissionDenied, UsageError
from nagaya.record import Record
from nagaya.sched import Scheduler
from nagaya.sched.models import JobInfo, JobSpec

UID_MIN = 1000
NOBODY = (65534, 4294967294)             # the overflow ids (nobody, nfsnobody): above UID_MIN, yet no one's
USER_OPS = 4                             # one user's operations in flight, per server process
LOG_TAIL = 64 * 1024                     # bytes of a job's output the portal shows (its end)

# The JobSpec fields the server may set for a portal job (their wire types). Not cwd, user, env, script,
# partition: the user's side (or the slurmrestd backend) decides those.
WIRE_FIELDS: dict[str, type] = {"image": str, "ref": str, "digest": str, "command": list, "nodes": int,
                                "ntasks": int, "cpus": int, "mem": str, "gpus": str, "time_limit": int,
                                "name": str}


class JobsUnavailable(NagayaError):
    """No job service on this site (no dispatcher running, or no scheduler backend)."""


class JobsBusy(NagayaError):
    """Too many of this user's job operations in flight (HTTP 429): answered at once, never queued."""


BUSY = "too many of your job operations are in flight; wait for them to finish and try again"


class PullLogin(Record):
    """A short-lived personal registry token the portal mints so the job pulls its image as the user."""
    registry: str
    server: str
    username: str
    secret: str

    def __repr__(self) -> str:                       # never in a log line or a traceback
        return f"PullLogin(registry={self.registry!r}, username={self.username!r}, secret=...)"


class LogTail(Record):
    """The end of a job's output, as the portal and /api/jobs/ID/log show it."""
    log: str = ""
    truncated: bool = False


class UserSchedulers(Protocol):
    """Where the portal gets a `Scheduler` that acts as one user (a site's dispatcher, or slurmrestd)."""

    name: str                            # the site's `[sched] portal_submit`: dispatcher | slurmrestd

    def for_user(self, user: str, login: PullLogin | None = None) -> Scheduler: ...

    def available(self) -> bool: ...


def target_user(user: str, service_account: str) -> pwd.struct_passwd:
    """The account a job runs as: a real user, never root, a system account or the service account."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PermissionDenied(f"no such user {user}") from None
    if pw.pw_uid < UID_MIN or pw.pw_uid in NOBODY or user == service_account:
        raise PermissionDenied(f"jobs are not run for {user}")
    return pw


def spec_to_wire(spec: JobSpec) -> dict[str, Any]:
    """The server-chosen part of a spec, as JSON; empty `ref` is left out (the user's side pins it)."""
    return {k: getattr(spec, k) for k in WIRE_FIELDS if k != "ref" or spec.ref}


def spec_from_wire(data: Any) -> JobSpec:
    """A JobSpec from its wire form, or UsageError: only WIRE_FIELDS, each of its type, an image named."""
    if not isinstance(data, dict) or set(data) - set(WIRE_FIELDS):
        raise UsageError("malformed job spec")
    for k, v in data.items():
        if not isinstance(v, WIRE_FIELDS[k]) or isinstance(v, bool) or \
                (k == "command" and not all(isinstance(x, str) for x in v)):
            raise UsageError(f"malformed job spec field {k}")
    if not data.get("image"):
        raise UsageError("malformed job spec (no image)")
    return JobSpec(**{"ref": "", "digest": "", **data})


_INFO_TYPES: dict[str, tuple[type, ...]] = {"id": (str,), "user": (str,), "state": (str,), "command": (list,),
                                            "exit_code": (int, type(None)), "time_limit": (int,), "cpus": (int,)}


def info_from_wire(data: Any) -> JobInfo:
    """A JobInfo from the JSON the user's side answered (fields it does not know are dropped)."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("id", "state")):
        raise NagayaError("the job operation answered nonsense")
    known = {k: ("" if v is None and k not in _INFO_TYPES else v) for k, v in data.items() if k in JobInfo._fields()}
    for k, v in known.items():
        if not isinstance(v, _INFO_TYPES.get(k, (str,))) or (isinstance(v, bool) and k != "id"):
            raise NagayaError(f"the job operation answered nonsense ({k})")
    return JobInfo(**{"user": "", **known})


# Where the site's scheduler and nagaya configuration are: the only variables the dispatcher (root) passes on to
# what it starts as a user, and only the values it was started with (a test cluster's slurm.conf elsewhere than
# the default). Nothing from the server's requests ever becomes an environment variable.
SITE_ENV = ("NAGAYA_SITE_CONFIG", "SLURM_CONF", "PBS_CONF_FILE")


def user_env(pw: pwd.struct_passwd, **extra: str) -> dict[str, str]:
    """The clean environment of an operation run as `pw` (its job ops, terminals, app relays): the account's
    own names, a fixed PATH, the site's SITE_ENV from the dispatcher's environment, then `extra` (TERM...)."""
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "LANG": "C.UTF-8",
           "PATH": "/usr/local/bin:/usr/bin:/bin"}
    env.update({k: os.environ[k] for k in SITE_ENV if k in os.environ})
    env.update(extra)
    return env


class PerUser:
    """Counts each user's operations in flight and refuses one more than `limit` at once (thread-safe)."""

    def __init__(self, limit: int = USER_OPS, total: int | None = None) -> None:
        self.limit, self.total = limit, total
        self._n: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, user: str) -> bool:
        with self._lock:
            n = self._n.get(user, 0)
            if n >= self.limit or (self.total is not None and sum(self._n.values()) >= self.total):
                return False
            self._n[user] = n + 1
            return True

    def release(self, user: str) -> None:
        with self._lock:
            n = self._n.get(user, 0) - 1
            if n > 0:
                self._n[user] = n
            else:
                self._n.pop(user, None)

    def __len__(self) -> int:                          # all users' operations in flight
        with self._lock:
            return sum(self._n.values())


T = TypeVar("T")


class Bounded:
    """Any UserSchedulers with a per-user cap: a user's (USER_OPS + 1)th operation in flight is refused at once
    with JobsBusy, so one user's slow or hostile operations hold at most USER_OPS threads of the job pool."""

    def __init__(self, inner: UserSchedulers, per_user: int = USER_OPS) -> None:
        self.inner = inner
        self.name = inner.name
        self.flight = PerUser(per_user)

    def __getattr__(self, name: str) -> Any:          # pull_token_hours, ... of the inner one
        return getattr(self.inner, name)

    def available(self) -> bool:
        return self.inner.available()

    def for_user(self, user: str, login: PullLogin | None = None) -> Scheduler:
        return CappedScheduler(self.inner.for_user(user, login), self.flight, user)


class CappedScheduler:
    """One user's Scheduler whose every operation counts against that user's cap while it runs."""

    def __init__(self, inner: Scheduler, flight: PerUser, user: str) -> None:
        self.inner, self.flight, self.user = inner, flight, user
        self.name = inner.name

    def _do(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.flight.acquire(self.user):
            raise JobsBusy(BUSY)
        try:
            return fn(*args)
        finally:
            self.flight.release(self.user)

    def submit(self, spec: JobSpec) -> str:
        return self._do(self.inner.submit, spec)

    def status(self, job_id: str) -> JobInfo:
        return self._do(self.inner.status, job_id)

    def list(self, all_users: bool = False) -> list[JobInfo]:
        return self._do(self.inner.list, all_users)

    def cancel(self, job_id: str) -> None:
        self._do(self.inner.cancel, job_id)

    def suspend(self, job_id: str) -> None:
        self._do(self.inner.suspend, job_id)

    def resume(self, job_id: str) -> None:
        self._do(self.inner.resume, job_id)

    def hold(self, job_id: str) -> None:
        self._do(self.inner.hold, job_id)

    def release(self, job_id: str) -> None:
        self._do(self.inner.release, job_id)

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter([self._do(lambda: log_tail(self.inner, job_id).log.encode())])

    def usage(self, job_id: str) -> list[dict[str, Any]]:
        return self._do(self.inner.usage, job_id)

    def tail(self, job_id: str, limit: int = LOG_TAIL) -> LogTail:
        return self._do(log_tail, self.inner, job_id, limit)

    def __getattr__(self, name: str) -> Any:
        """What a backend offers beyond the protocol (the dispatcher's submit_app, request), capped alike."""
        fn = getattr(self.inner, name)
        if name.startswith("_") or not callable(fn):
            return fn
        return lambda *args: self._do(fn, *args)


def log_tail(sched: Scheduler, job_id: str, limit: int = LOG_TAIL) -> LogTail:
    """The last `limit` bytes of a job's output. A scheduler that can read just the end (`tail`) does so; any
    other gives its whole output, of which the end is kept."""
    tail = getattr(sched, "tail", None)
    if tail is not None:
        return tail(job_id, limit)             # type: ignore[no-any-return]
    sched.status(job_id)                       # NotFound for someone else's (or no) job
    data = b"".join(sched.logs(job_id, follow=False))
    return LogTail(log=data[-limit:].decode(errors="replace"), truncated=len(data) > limit)
