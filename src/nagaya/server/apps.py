"""Interactive app sessions (Jupyter, a web app in the user's image): started as batch jobs as the user
through the job service (server/app_launch.py has the launcher), listed, extended, ended, and culled when
idle or past their time. One implementation for the Sessions page, /api/sessions and the cull pass.

A session's record is the server's own (STATE_DIR/app-sessions/ID.json, 0600, the service account's): the
owner, the job, the digest, the Jupyter token (sent only by the proxy, never shown), the deadline and the
last proxy traffic. Every operation checks the owner; another user's session answers like a missing one.

Culling runs in `maintain(now)`, with the time passed in (tests move the clock, nobody sleeps): a session
with no proxy traffic and (for Jupyter) no kernel activity for `idle` seconds, or past its deadline, is
cancelled through the scheduler as its user. `python -m nagaya.server.apps cull SETTINGS [--now EPOCH]`
runs one pass (a timer on the site host, as the service account); the server also runs one a minute."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from nagaya import safefs
from nagaya.errors import NagayaError, NotFound, UsageError
from nagaya.sched.onbehalf import JobsBusy
from nagaya.server.app_launch import KINDS, SESSION_RE, apps_root, base_url
from nagaya.server.job_service import JobService
from nagaya.sitedb import Principal

# Defaults of the site's [apps] settings (config.py AppsConfig, written into server.json by `nagaya site up`).
IDLE_TIMEOUT = 3600.0            # seconds with no proxy traffic and no kernel activity, then the session ends
WARN_BEFORE = 600.0              # the page warns this long before an idle session is ended
DEFAULT_HOURS = 2.0
MAX_HOURS = 12.0                 # a session's deadline, extensions included; also the job's time limit
EXTEND_STEP = 3600.0
TOUCH_RESOLUTION = 30.0          # proxy traffic is written at most this often per session
RELAY_TRIES = 30                 # an app on another node: tries at a relay while the user's job operations are busy
ACTIVE = ("PENDING", "RUNNING", "SUSPENDED", "CONFIGURING", "REQUEUED")


@dataclass
class AppSession:
    id: str
    user: str
    kind: str
    image: str
    job: str
    token: str
    created: float
    deadline: float
    last_seen: float
    digest: str = ""
    command: str = ""
    cpus: int = 1
    mem: str = ""
    gpus: str = ""
    ended: float = 0.0
    ended_why: str = ""
    state: str = ""              # the job's, as last seen
    node: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self, now: float, idle: float, warn_before: float = WARN_BEFORE) -> dict[str, Any]:
        """What pages and the API show: never the token."""
        d = asdict(self)
        d.pop("token")
        d.update(time_left=max(0, int(self.deadline - now)) if not self.ended else 0,
                 idle_left=max(0, int(self.last_seen + idle - now)) if not self.ended else 0,
                 warn=not self.ended and (self.last_seen + idle - now < warn_before
                                          or self.deadline - now < warn_before),
                 url=base_url(self.id) + ("tree" if self.kind == "jupyter" else ""))
        return d


class AppSessions:
    def __init__(self, jobs: JobService, state_dir: Path, idle: float = IDLE_TIMEOUT, max_hours: float = MAX_HOURS,
                 clock: Callable[[], float] = time.time, warn_before: float = WARN_BEFORE) -> None:
        self.jobs, self.state_dir, self.idle, self.max_hours, self.clock = jobs, state_dir, idle, max_hours, clock
        self.warn_before = warn_before
        self.dir = state_dir / "app-sessions"
        self.apps = apps_root(state_dir)
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    # ---- records ------------------------------------------------------------------------------------------
    def _dir_fd(self) -> int:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        return safefs.open_dir(self.dir, (os.geteuid(),))

    def _save(self, rec: AppSession) -> None:
        fd = self._dir_fd()
        try:
            safefs.write_at(fd, f"{rec.id}.json", json.dumps(asdict(rec)).encode(), 0o600)
        finally:
            os.close(fd)

    def _load(self, sid: str) -> AppSession | None:
        if not SESSION_RE.match(sid):
            return None
        fd = self._dir_fd()
        try:
            f = safefs.open_at(fd, f"{sid}.json", owners=(os.geteuid(),))
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)
        with os.fdopen(f, "rb") as fh:
            return AppSession(**json.loads(fh.read()))

    def _all(self) -> list[AppSession]:
        if not self.dir.is_dir():
            return []
        out = [self._load(n[:-5]) for n in sorted(os.listdir(self.dir)) if n.endswith(".json")]
        return [r for r in out if r is not None]

    def get(self, user: str, sid: str) -> AppSession:
        """The user's own session; someone else's is NotFound, exactly like a missing one."""
        rec = self._load(sid)
        if rec is None or rec.user != user:
            raise NotFound(f"no session {sid[:40]}")
        return rec

    # ---- operations ---------------------------------------------------------------------------------------
    def start(self, p: Principal, kind: str, image: str, command: list[str] | None = None, cpus: int = 1,
              mem: str = "", gpus: str = "", hours: float = DEFAULT_HOURS, via: str = "portal") -> AppSession:
        if kind not in KINDS:
            raise UsageError(f"unknown app {kind!r} (one of: {', '.join(KINDS)})")
        if kind == "web" and not command:
            raise UsageError("a web app needs the command that serves it (on the socket $NAGAYA_APP_SOCKET)")
        if not 0 < hours <= self.max_hours:
            raise UsageError(f"a session lasts at most {self.max_hours:g} hours")
        sid, token = secrets.token_hex(16), secrets.token_hex(32)
        limit = f"{int(self.max_hours * 60)}"               # minutes; the deadline below ends it earlier
        job = self.jobs.submit(p, image, list(command or []), 1, cpus, mem, gpus, limit, f"app-{kind}", via=via,
                               app={"session": sid, "kind": kind, "token": token})
        now = self.clock()
        digest = ""
        try:
            digest = self.jobs.status(p.name, job).digest
        except NagayaError:
            pass
        rec = AppSession(id=sid, user=p.name, kind=kind, image=image, job=job, token=token, created=now,
                         deadline=now + hours * 3600, last_seen=now, digest=digest,
                         command=" ".join(command or []), cpus=cpus, mem=mem, gpus=gpus, state="PENDING")
        self._save(rec)
        return rec

    def list(self, user: str, refresh: bool = True) -> list[AppSession]:
        mine = [r for r in self._all() if r.user == user]
        if refresh and any(not r.ended for r in mine):
            try:
                jobs = {j.id: j for j in self.jobs.list(user)}
            except NagayaError:
                jobs = {}
            for r in mine:
                j = jobs.get(r.job)
                if j and not r.ended and (j.state != r.state or j.nodes != r.node):
                    r.state, r.node = j.state, j.nodes
                    r.digest = r.digest or j.digest
                    if r.state not in ACTIVE:
                        r.ended, r.ended_why = self.clock(), f"the job ended ({r.state})"
                    self._save(r)
        return sorted(mine, key=lambda r: -r.created)

    def end(self, user: str, sid: str, why: str = "ended by you", via: str = "portal") -> AppSession:
        rec = self.get(user, sid)
        if not rec.ended:
            try:
                self.jobs.cancel(user, rec.job, via=via)
            except NotFound:
                pass                                        # the job is gone already
            rec.ended, rec.ended_why, rec.state = self.clock(), why, "CANCELLED"
            self._save(rec)
        return rec

    def extend(self, user: str, sid: str, seconds: float = EXTEND_STEP) -> AppSession:
        rec = self.get(user, sid)
        if rec.ended:
            raise UsageError("this session has ended")
        cap = rec.created + self.max_hours * 3600
        if rec.deadline >= cap:
            raise UsageError(f"a session lasts at most {self.max_hours:g} hours on this site")
        now = self.clock()
        rec.deadline, rec.last_seen = min(cap, rec.deadline + seconds), now
        self._save(rec)
        return rec

    def touch(self, rec: AppSession) -> None:
        """Proxy traffic: the session is in use (written at most every TOUCH_RESOLUTION seconds)."""
        now = self.clock()
        with self._lock:
            if now - self._touched.get(rec.id, 0.0) < TOUCH_RESOLUTION:
                return
            self._touched[rec.id] = now
        fresh = self._load(rec.id)
        if fresh is not None and not fresh.ended:
            fresh.last_seen = max(fresh.last_seen, now)
            self._save(fresh)

    # ---- the app's socket -----------------------------------------------------------------------------------
    def open_socket(self, rec: AppSession) -> int:
        """An O_PATH fd of the session's socket, reached without following links, the socket and its
        directories the session owner's: connect through /proc/self/fd/N. Another user's socket, a link or a
        file planted in its place is refused (FileNotFoundError: the app is not up)."""
        uid = pwd.getpwnam(rec.user).pw_uid
        afd = os.open(self.apps, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            ufd = safefs.open_dir_at(afd, rec.user, (uid,))
            try:
                sfd = safefs.open_dir_at(ufd, rec.id, (uid,))
            finally:
                os.close(ufd)
        except (OSError, safefs.UnsafePath) as e:         # a link (ELOOP, ENOTDIR), someone else's: not up
            raise FileNotFoundError(str(e)) from None
        finally:
            os.close(afd)
        try:
            fd = os.open("sock", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
        except OSError as e:
            raise FileNotFoundError(str(e)) from None
        finally:
            os.close(sfd)
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            os.close(fd)
            raise FileNotFoundError("the session's socket is not its owner's")
        return fd

    # ---- an app on another node (server/app_relay.py) -------------------------------------------------------
    def node_of(self, rec: AppSession) -> str:
        """The app's node when it is not this host (its socket is then reached through a relay), else ""."""
        from nagaya.server.app_relay import NODE_RE, is_here

        node = rec.node.split(",")[0]
        return node if node and NODE_RE.match(node) and not is_here(node) else ""

    def connect_path(self, rec: AppSession) -> tuple[str, Callable[[], None]]:
        """Where the proxy connects for `rec`, and what to call when done: the app's own socket on this host
        (an O_PATH fd, `open_socket`), or, for an app on another node, a one-use relay the root dispatcher opens
        as the session's owner through the scheduler. OSError (FileNotFoundError) when the app is not reachable."""
        node = self.node_of(rec)
        if not node:
            fd = self.open_socket(rec)
            return f"/proc/self/fd/{fd}", lambda: os.close(fd)
        terms = self.jobs.terms_dir()
        if terms is None:
            raise FileNotFoundError("apps on other nodes need the site's job dispatcher")
        name = ""
        for _ in range(RELAY_TRIES):                   # a page's parallel requests meet the per-user cap
            try:
                name = self.jobs.app_relay(rec.user, rec.id, rec.job, node)
                break
            except JobsBusy:
                time.sleep(0.1)
            except NagayaError as e:
                raise FileNotFoundError(e.message) from None
        if not name:
            raise FileNotFoundError("the job service opened no relay")
        dfd = os.open(terms, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # sun_path stays short
        return f"/proc/self/fd/{dfd}/{name}", lambda: os.close(dfd)

    def ready(self, rec: AppSession) -> bool:
        if self.node_of(rec):
            return rec.state == "RUNNING"              # a relay per look would cost a step: the proxy says 503
        try:
            os.close(self.open_socket(rec))
            return True
        except OSError:
            return False

    def kernel_activity(self, rec: AppSession) -> float:
        """Jupyter's own last activity (kernels included), as epoch seconds; 0 if unknown."""
        if rec.kind != "jupyter" or self.node_of(rec):  # another node: proxy traffic alone counts
            return 0.0
        try:
            fd = self.open_socket(rec)
        except OSError:
            return 0.0
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=f"/proc/self/fd/{fd}"), timeout=5) as c:
                r = c.get(f"http://localhost{base_url(rec.id)}api/status",
                          headers={"Authorization": f"token {rec.token}"})
                r.raise_for_status()
                last = r.json().get("last_activity", "")
            return datetime.fromisoformat(last.replace("Z", "+00:00")).timestamp() if last else 0.0
        except (httpx.HTTPError, ValueError, OSError):
            return 0.0
        finally:
            os.close(fd)

    # ---- culling ------------------------------------------------------------------------------------------
    def maintain(self, now: float | None = None) -> list[dict[str, str]]:
        """One pass at `now`: sessions idle for `idle` seconds or past their deadline are ended through the
        scheduler as their user. Returns what it ended."""
        now = self.clock() if now is None else now
        done: list[dict[str, str]] = []
        for rec in self._all():
            if rec.ended:
                continue
            seen = max(rec.last_seen, min(self.kernel_activity(rec), now))
            why = ("past its time limit" if now >= rec.deadline else
                   f"idle for {int((now - seen) // 60)} minutes" if now - seen >= self.idle else "")
            if seen > rec.last_seen:
                rec.last_seen = seen
                self._save(rec)
            if not why:
                continue
            try:
                self.end(rec.user, rec.id, why=f"ended: {why}", via="cull")
                done.append({"session": rec.id, "user": rec.user, "job": rec.job, "why": why})
            except NagayaError as e:
                sys.stderr.write(f"nagaya apps: cull {rec.id}: {e.message}\n")
        return done


def from_settings(jobs: JobService, state_dir: Path) -> AppSessions:
    """The site's sessions with its [apps] limits (server.json, from config.py's AppsConfig)."""
    st = jobs.site.settings
    idle = float(getattr(st, "app_idle_minutes", 0) or IDLE_TIMEOUT / 60) * 60
    hours = float(getattr(st, "app_max_hours", 0) or MAX_HOURS)
    warn = float(getattr(st, "app_warn_minutes", 0) or WARN_BEFORE / 60) * 60
    return AppSessions(jobs, state_dir, idle=idle, max_hours=hours, warn_before=min(warn, idle))


def state_dir_of(jobs: JobService) -> Path | None:
    key = jobs.site.settings.signing_key
    return Path(key).parent.parent if key else None


def start_culler(apps: AppSessions, every: float = 60.0) -> None:
    """The server's own cull pass, once a minute with the real clock (a daemon thread)."""
    def loop() -> None:
        while True:
            time.sleep(every)
            try:
                apps.maintain()
            except Exception as e:                      # never let one bad record stop the culler
                sys.stderr.write(f"nagaya apps: cull pass: {e}\n")
    threading.Thread(target=loop, name="nagaya-app-culler", daemon=True).start()


def _main(argv: list[str]) -> int:
    from nagaya.server.base import Site
    from nagaya.server.job_service import default_jobs
    from nagaya.server.settings import ServerSettings

    if len(argv) < 2 or argv[0] != "cull":
        sys.stderr.write("usage: python -m nagaya.server.apps cull SETTINGS [--now EPOCH] [--idle SECONDS]\n")
        return 2
    now = float(argv[argv.index("--now") + 1]) if "--now" in argv else None
    jobs = default_jobs(Site(ServerSettings.load(Path(argv[1]))))
    sd = state_dir_of(jobs)
    if sd is None:
        sys.stderr.write("nagaya apps: this site has no state directory\n")
        return 1
    apps = from_settings(jobs, sd)                   # the site's [apps] limits; --idle overrides for one pass
    if "--idle" in argv:
        apps.idle = float(argv[argv.index("--idle") + 1])
    print(json.dumps(apps.maintain(now)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
