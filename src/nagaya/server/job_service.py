"""Job operations on behalf of one logged-in user, over a gateway (jobs.py: the root dispatcher's spool, or
slurmrestd): one implementation for the Jobs pages and /api/jobs."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from nagaya.errors import NotFound, UsageError
from nagaya.server.base import Site
from nagaya.server.jobs import BoundedGateway, JobGateway, JobsUnavailable, SpoolGateway
from nagaya.store import Principal
from nagaya.store.service import SiteService


class JobService:
    """The portal's job operations over a gateway (jobs.py), always on behalf of one logged-in user."""

    SEEN_UP_TTL = 2.0               # the dashboard asks on every view; the dispatcher's pid file changes rarely

    def __init__(self, site: Site, gateway: JobGateway | None) -> None:
        self.site, self.gateway = site, gateway
        self._seen_up = -self.SEEN_UP_TTL

    def available(self, recent: bool = False) -> bool:
        """Whether jobs can run; `recent` accepts a positive answer up to SEEN_UP_TTL old (the dashboard's
        tile), operations always look afresh. A negative answer is never reused: a dispatcher just started
        shows at once."""
        inner = self.gateway.inner if isinstance(self.gateway, BoundedGateway) else self.gateway
        if inner is None or not isinstance(inner, SpoolGateway):
            return inner is not None
        now = time.monotonic()
        if recent and now - self._seen_up < self.SEEN_UP_TTL:
            return True
        ok = self.gateway.available()
        if ok:
            self._seen_up = now
        return ok

    def gw(self) -> JobGateway:
        if self.gateway is None or not self.available():
            raise JobsUnavailable("Jobs are not enabled on this site yet: the job service is not running. "
                                  "Ask your admins to start it.")
        return self.gateway

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        """One operation as `user`. The jobs' owner shown is that user, whom the server asked for, never
        what the user's own scheduler state claims."""
        out = self.gw().call(user, op, args)
        for j in (out if op == "list" and isinstance(out, list) else [out] if op == "status" else []):
            if isinstance(j, dict):
                j["user"] = user
        return out

    def images(self, svc: SiteService, p: Principal) -> list[str]:
        """What a job may run: every tag the user may list (their own, their groups', the site's)."""
        reg = self.site.settings.registry
        return [f"{reg}/{repo.name}:{t.tag}" for repo in svc.repositories(p) for t in svc.tags(p, repo.name)]

    def submit(self, p: Principal, image: str, command: list[str], nodes: int = 1, cpus: int = 1, mem: str = "",
               gpus: str = "", time_limit: str = "", name: str = "", via: str = "portal") -> str:
        from nagaya.sched.models import parse_time

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
            hours = getattr(self.gateway, "pull_token_hours", 0)
            new = svc.issue_user_token(user, "portal-job", timedelta(hours=hours) if hours else timedelta(minutes=15))
        spec = {"image": image, "digest": digest, "command": command, "nodes": nodes, "cpus": cpus,
                "mem": mem.strip()[:32], "gpus": gpus.strip()[:32], "time_limit": limit, "name": name.strip()[:64]}
        out = self.gw().call(p.name, "submit", {"spec": spec, "login": {
            "registry": settings.registry, "server": settings.url, "username": p.name, "secret": new.secret}})
        job_id = str(out["id"])
        with self.site.db.session() as db:
            SiteService(db).audit("job.submit", p.name, digest=digest, details={
                "job": job_id, "image": image, "via": via, "backend": settings.portal_submit, "command": command,
                "nodes": nodes, "cpus": cpus, "mem": spec["mem"], "gpus": spec["gpus"], "time_limit": limit})
        return job_id

    def cancel(self, user: str, job_id: str, via: str = "portal") -> None:
        self.gw().call(user, "cancel", {"job_id": job_id})
        with self.site.db.session() as db:
            SiteService(db).audit("job.cancel", user, details={"job": job_id, "via": via})


def default_jobs(site: Site) -> JobService:
    """slurmrestd with a JWT per user (server/slurmrest.py), or the site's spool (STATE_DIR/jobs-spool), served
    by `python -m nagaya.server.jobs dispatch` as root."""
    key = site.settings.signing_key
    if not key:
        return JobService(site, None)
    state_dir = Path(key).parent.parent
    if site.settings.portal_submit == "slurmrestd":
        from nagaya.server.slurmrest import from_settings

        return JobService(site, BoundedGateway(from_settings(site.settings, state_dir)))
    return JobService(site, BoundedGateway(SpoolGateway(state_dir / "jobs-spool")))
