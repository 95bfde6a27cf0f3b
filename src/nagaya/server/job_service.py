"""Job operations on behalf of one logged-in user: one implementation for the Jobs pages, /api/jobs and apps.

Each goes through the `Scheduler` protocol (sched/__init__.py) with typed values, JobSpec in and JobInfo out,
on a Scheduler that acts as the user: `UserSchedulers.for_user` of the site's dispatcher (server/jobs.py) or of
slurmrestd (sched/slurmrest.py), capped per user (sched/onbehalf.py's Bounded)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from nagaya.errors import NotFound, UsageError
from nagaya.sched import Scheduler
from nagaya.sched.models import JobInfo, JobSpec, parse_time
from nagaya.sched.onbehalf import Bounded, JobsUnavailable, LogTail, PullLogin, UserSchedulers, log_tail
from nagaya.server.app_launch import AppRequest
from nagaya.server.base import Site
from nagaya.server.jobs import Dispatched, SpoolGateway
from nagaya.sitedb import Principal
from nagaya.sitedb.service import SiteService


class JobService:
    """The portal's job operations, always on behalf of one logged-in user."""

    SEEN_UP_TTL = 2.0               # the dashboard asks on every view; the dispatcher's pid file changes rarely

    def __init__(self, site: Site, schedulers: UserSchedulers | Any | None) -> None:
        # A bare wire (`call(user, op, args)`, as a test's stand-in for the spool) goes through the dispatcher's
        # Scheduler like the spool itself.
        if schedulers is not None and not hasattr(schedulers, "for_user"):
            schedulers = Dispatched(schedulers)
        self.site, self.schedulers = site, schedulers
        self._seen_up = -self.SEEN_UP_TTL

    def terms_dir(self) -> Path | None:
        """SPOOL/terms, where the dispatcher opens a terminal's or an app relay's one-use socket; None on a site
        without the dispatcher's spool (slurmrestd)."""
        spool = getattr(self.schedulers, "spool", None)          # Bounded and Dispatched pass on the wire's
        return spool / "terms" if isinstance(spool, Path) else None

    def available(self, recent: bool = False) -> bool:
        """Whether jobs can run; `recent` accepts a positive answer up to SEEN_UP_TTL old (the dashboard's
        tile), operations always look afresh. A negative answer is never reused: a dispatcher just started
        shows at once."""
        inner = self.schedulers.inner if isinstance(self.schedulers, Bounded) else self.schedulers
        if inner is None or not isinstance(inner, Dispatched) or not isinstance(inner.wire, SpoolGateway):
            return inner is not None
        now = time.monotonic()
        if recent and now - self._seen_up < self.SEEN_UP_TTL:
            return True
        ok = inner.available()
        if ok:
            self._seen_up = now
        return ok

    def gw(self) -> UserSchedulers:
        if self.schedulers is None or not self.available():
            raise JobsUnavailable("Jobs are not enabled on this site yet: the job service is not running. "
                                  "Ask your admins to start it.")
        return self.schedulers

    def scheduler(self, user: str, login: PullLogin | None = None) -> Scheduler:
        """A Scheduler acting as `user` (refused for root, system accounts and the service account)."""
        return self.gw().for_user(user, login)

    # ---- the Scheduler protocol's operations, typed --------------------------------------------------------
    def list(self, user: str) -> list[JobInfo]:
        """The user's jobs. Their owner shown is `user`, whom the server asked for, never what the user's own
        scheduler state claims."""
        jobs = self.scheduler(user).list()
        for j in jobs:
            j.user = user
        return jobs

    def status(self, user: str, job_id: str) -> JobInfo:
        info = self.scheduler(user).status(job_id)
        info.user = user
        return info

    def logs(self, user: str, job_id: str) -> LogTail:
        return log_tail(self.scheduler(user), job_id)

    def usage(self, user: str, job_id: str) -> list[dict[str, Any]]:
        """UsageSample dicts, oldest first (sched/usage.py); [] where the backend samples none."""
        return self.scheduler(user).usage(job_id)

    # ---- the dispatcher's operations beyond the protocol (server/jobs.py SpoolScheduler), capped alike ------
    def _dispatcher(self, user: str, what: str) -> Any:
        sched = self.scheduler(user)
        if sched.name != "dispatcher":
            raise UsageError(f"{what} need the site's job dispatcher (this site's jobs go through {sched.name})")
        return sched

    def terminal(self, user: str, job_id: str, rows: int = 24, cols: int = 80) -> tuple[str, str]:
        """A terminal into the user's running job: the one-use socket's name in terms_dir() and its secret."""
        name, secret = self._dispatcher(user, "terminals").terminal(job_id, rows, cols)
        return str(name), str(secret)

    def app_relay(self, user: str, session: str, job_id: str, node: str) -> str:
        """A one-use relay to the user's app session on another node: its socket's name in terms_dir()."""
        return str(self._dispatcher(user, "apps on other nodes").app_relay(session, job_id, node))

    def submit_build(self, user: str, recipe: dict[str, Any], login: PullLogin, spec: JobSpec, upload: str = "",
                     rebuild_of: str = "") -> str:
        """A build job as the user (server/builds.py checked it; the dispatcher and the user's side again)."""
        return str(self._dispatcher(user, "builds").submit_build(recipe, login, spec, upload, rebuild_of))

    def images(self, svc: SiteService, p: Principal) -> list[str]:
        """What a job may run: every tag the user may list (their own, their groups', the site's)."""
        reg = self.site.settings.registry
        return [f"{reg}/{repo.name}:{t.tag}" for repo in svc.repositories(p) for t in svc.tags(p, repo.name)]

    def submit(self, p: Principal, image: str, command: list[str], nodes: int = 1, cpus: int = 1, mem: str = "",
               gpus: str = "", time_limit: str = "", name: str = "", via: str = "portal",
               app: AppRequest | dict[str, Any] | None = None) -> str:
        """Submit `image` (pinned to the digest its tag names now) as `p`; `app`: an interactive app's
        arguments (server/app_launch.py), the job then runs the app's launcher around `command`."""

        settings = self.site.settings
        if not (1 <= nodes <= 64 and 1 <= cpus <= 1024):
            raise UsageError("nodes must be 1–64 and CPUs 1–1024")
        limit = parse_time(time_limit)
        with self.site.db.session() as db:
            svc = SiteService(db)
            reg = settings.registry
            # The digest the tag points at now: what the job runs, whenever it starts.
            digest = next((t.digest for repo in svc.repositories(p) for t in svc.tags(p, repo.name)
                           if f"{reg}/{repo.name}:{t.tag}" == image), "")
            if not digest:
                raise NotFound(f"image {image} not found among yours")
            user = svc.user(p.name)
            assert user is not None
            # A personal token so the job's pull runs with the user's own rights, nobody else's: used at once
            # by the dispatcher, when the job starts by slurmrestd (which says how long it may wait).
            hours = getattr(self.schedulers, "pull_token_hours", 0)
            new = svc.issue_user_token(user, "portal-job", timedelta(hours=hours) if hours else timedelta(minutes=15))
        spec = JobSpec(image=image, ref="", digest=digest, command=list(command), nodes=nodes, cpus=cpus,
                       mem=mem.strip()[:32], gpus=gpus.strip()[:32], time_limit=limit, name=name.strip()[:64])
        login = PullLogin(registry=settings.registry, server=settings.url, username=p.name, secret=new.secret)
        sched = self.scheduler(p.name, login)
        if app:
            submit_app = getattr(sched, "submit_app", None)
            if submit_app is None:
                raise UsageError(f"interactive apps need the job dispatcher (this site's jobs go through {sched.name})")
            job_id = submit_app(spec, app if isinstance(app, AppRequest) else AppRequest(**app))
        else:
            job_id = sched.submit(spec)
        with self.site.db.session() as db:
            SiteService(db).audit("job.submit", p.name, digest=digest, details={
                "job": job_id, "image": image, "via": via, "app": _kind(app),
                "backend": settings.portal_submit, "command": command,
                "nodes": nodes, "cpus": cpus, "mem": spec.mem, "gpus": spec.gpus, "time_limit": limit})
        return job_id

    def cancel(self, user: str, job_id: str, via: str = "portal") -> None:
        self._control(user, job_id, "cancel", via)

    def suspend(self, user: str, job_id: str, via: str = "portal") -> None:
        self._control(user, job_id, "suspend", via)

    def resume(self, user: str, job_id: str, via: str = "portal") -> None:
        self._control(user, job_id, "resume", via)

    def hold(self, user: str, job_id: str, via: str = "portal") -> None:
        self._control(user, job_id, "hold", via)

    def release(self, user: str, job_id: str, via: str = "portal") -> None:
        self._control(user, job_id, "release", via)

    def controls(self, info: JobInfo) -> list[str]:
        """The controls beyond cancel the Jobs page offers for a job in this state. Through slurmrestd none:
        Slurm lets only its operators suspend, and its REST API has no user hold."""
        if self.schedulers is None or self.schedulers.name != "dispatcher":
            return []
        if info.state == "PENDING":
            return ["release"] if "held" in info.reason.lower() else ["hold"]
        return {"RUNNING": ["suspend"], "SUSPENDED": ["resume"]}.get(info.state, [])

    def _control(self, user: str, job_id: str, what: str, via: str) -> None:
        getattr(self.scheduler(user), what)(job_id)
        with self.site.db.session() as db:
            SiteService(db).audit(f"job.{what}", user, details={"job": job_id, "via": via})


def _kind(app: AppRequest | dict[str, Any] | None) -> str:
    return "" if app is None else app.kind if isinstance(app, AppRequest) else str(app.get("kind", ""))


def default_jobs(site: Site) -> JobService:
    """slurmrestd with a JWT per user (sched/slurmrest.py), or the site's spool (STATE_DIR/jobs-spool), served
    by `python -m nagaya.server.jobs dispatch` as root; either capped per user."""
    key = site.settings.signing_key
    if not key:
        return JobService(site, None)
    state_dir = Path(key).parent.parent
    if site.settings.portal_submit == "slurmrestd":
        from nagaya.sched.slurmrest import from_settings

        return JobService(site, Bounded(from_settings(site.settings, state_dir)))
    return JobService(site, Bounded(Dispatched(SpoolGateway(state_dir / "jobs-spool"))))
