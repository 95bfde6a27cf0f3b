"""The server's settings: one JSON file in the site's state dir, written by `nagaya site up` (mode 0600,
owned by the service account: it holds the notification secret and the database URL)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_AUTO_WORKERS = 4          # beyond this the database, not Python, is what a portal waits for


@dataclass
class ServerSettings:
    database: str
    host: str = "127.0.0.1"
    port: int = 0
    registry: str = ""                    # HOST:PORT of the registry this server issues tokens for
    service: str = "nagaya-registry"
    issuer: str = "nagaya"
    token_ttl: int = 300
    login_ttl_days: int = 90
    signing_key: str = ""                 # PEM, EC P-256
    signing_cert: str = ""                # PEM leaf certificate, signed by the CA
    ca_cert: str = ""                     # PEM CA: the registry's rootcertbundle
    notify_secret: str = ""               # the registry sends `Authorization: Bearer <secret>`
    auth: str = "pam"                     # pam | ldap
    pam_service: str = "nagaya"
    admin_users: list[str] = field(default_factory=list)
    admin_groups: list[str] = field(default_factory=list)
    ldap: dict[str, Any] = field(default_factory=dict)
    expiry_warn_days: int = 14            # warn an account this long before it expires
    expiry_grace_days: int = 30           # after expiry, this long before its images are archived and removed
    archive_dir: str = ""                 # where expired users' images go (default: STATE_DIR/archive)
    workers: int = 0                      # server processes; 0: one per CPU, at most MAX_AUTO_WORKERS
    portal_submit: str = "dispatcher"     # dispatcher | slurmrestd (see [sched] in config.py)
    slurmrestd_url: str = ""
    slurmrestd_jwt_key: str = ""          # a secret: it lets the server act as any user in Slurm
    job_nagaya: str = ""                  # the nagaya executable jobs run
    job_partition: str = ""
    portal_pull_hours: int = 24
    vulndb: str = ""                      # the site's vulnerability database: pushed images are scanned against it
    keys_dir: str = ""                    # [image] keys_dir and policy: the portal shows signature states with them
    image_policy: list[Any] = field(default_factory=list)
    build_upload_max: int = 256 << 20     # [builds]: the Build page (server/builds.py): an upload's bytes at most,
    build_unpacked_max: int = 2 << 30     # ... the context unpacked (checked by the job),
    build_git_hosts: str = ""             # ... HOST or HOST:PORT builds may clone from (comma-separated; none: off),
    build_git_schemes: str = "https"      # ... the git URL schemes allowed,
    build_max_running: int = 2            # ... one user's builds at once,
    build_hours: int = 2                  # ... a build job's time limit
    app_idle_minutes: int = 60            # [apps]: interactive sessions' idle limit, whole life, warning
    app_max_hours: int = 12
    app_warn_minutes: int = 10

    @property
    def process_count(self) -> int:
        """Server processes: the token service is CPU-bound Python, so one process per core (several
        processes are safe: sessions, login rate limits and everything else shared live in the database)."""
        if self.workers > 0:
            return self.workers
        return max(1, min(os.cpu_count() or 1, MAX_AUTO_WORKERS))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def dumps(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ServerSettings:
        return cls(**json.loads(path.read_text()))
