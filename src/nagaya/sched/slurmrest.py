"""The slurmrestd backend: the `Scheduler` protocol for one named user, with no root part (the portal's jobs
at sites with `[sched] portal_submit = "slurmrestd"`; `SlurmRest.for_user` gives it, sched/onbehalf.py says why).

The server (the service account) holds Slurm's JWT key (`AuthAltParameters=jwt_key=...`, HS256) and mints a
token per request for the logged-in user: `sun` = the user name, valid for TOKEN_TTL seconds. slurmctld
checks the signature and treats the request exactly like that user's own sbatch/squeue/scancel: the job
runs with the user's uid, and Slurm refuses to cancel anyone else's. This is Open OnDemand's pattern and
its price: the key lets its holder act as ANY user in Slurm, so it is a secret of the site's (readable by
the service account only; the server refuses a world-readable key). Root, system accounts and the service
account itself are refused as targets before a token is minted (onbehalf.target_user).

The job is the CLI's: the batch script of sched/slurm.py (`srun nagaya run NAME@DIGEST ...`, the digest
pinned now from the site's own tag table) with the same comment, so `nagaya job show` reads it too. Before
its first step, the job pulls the image as the user, with a personal token of the user's made for this job
(in the job's environment, visible to the user and Slurm's admins only, and dropped before any step).

Logs: the job's output cannot go to the user's home, which the service account cannot read. It goes to
LOG_ROOT/USER/slurm-ID.out: LOG_ROOT (the site's state dir, owned by the service account) is 0711, each
user's directory 0700 plus POSIX ACLs: the user may write and read it, and files created in it give the
service account read access (a default ACL). Nobody else can look in. Reading is careful, since the user
owns the files: no symlinks, no FIFOs, only files owned by the user themselves.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import shlex
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError
from nagaya.sched.models import ACTIVE, JobInfo, JobSpec
from nagaya.sched.onbehalf import LOG_TAIL, JobsUnavailable, LogTail, PullLogin, target_user
from nagaya.sched.slurm import batch_script, comment, job_info

API = "/slurm/v0.0.38"           # Slurm 22.05's newest (slurmrestd -s list); the JSON squeue --json prints
TOKEN_TTL = 60                   # seconds: one request's worth
PATH = "/usr/local/bin:/usr/bin:/bin"
_NOT_FOUND = (2017,)             # ESLURM_INVALID_JOB_ID
_DENIED = (2002, 1007)           # ESLURM_ACCESS_DENIED, ESLURM_USER_ID_MISSING


def mint(user: str, key: bytes, ttl: int = TOKEN_TTL, now: float | None = None) -> str:
    """An HS256 JWT as Slurm's auth/jwt expects it (`scontrol token` makes the same)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    t = int(now if now is not None else time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps({"iat": t, "exp": t + ttl, "sun": user}, separators=(",", ":")).encode())
    sig = b64(hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


def mem_mb(text: str) -> int:
    """Slurm's --mem forms (N, NK, NM, NG, NT; MB by default) as the MB the REST API takes."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    mult = scale.get(t[-1:]) if t else None
    digits = t[:-1] if mult is not None else t
    if not digits.isdigit():
        raise UsageError(f"invalid memory {text!r} (e.g. 500M, 4G)")
    return max(1, int(int(digits) * (mult or 1)))


def check_key(path: Path) -> bytes:
    """Read the JWT key, refusing one that others could read too."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as e:
        raise JobsUnavailable(f"cannot read the Slurm JWT key {path}: {e.strerror}") from None
    if st.st_mode & 0o007:
        raise JobsUnavailable(f"the Slurm JWT key {path} is readable by every user: chmod o-rwx it")
    if not data:
        raise JobsUnavailable(f"the Slurm JWT key {path} is empty")
    return data


class SlurmRest:
    """One site's slurmrestd (the key, the URL, the log root): `for_user` gives a Scheduler acting as a user."""

    name = "slurmrestd"
    timeout = 10.0                   # seconds for slurmrestd to answer: a portal request waits no longer

    def __init__(self, url: str, jwt_key: Path, log_root: Path, nagaya: str = "nagaya", partition: str = "",
                 service_account: str = "", pull_hours: int = 24) -> None:
        self.url, self.jwt_key, self.log_root = url, jwt_key, log_root
        self.nagaya, self.partition, self.pull_hours = nagaya, partition, pull_hours
        self.service_account = service_account or pwd.getpwuid(os.getuid()).pw_name
        if url.startswith("unix:"):
            self.base = "http://slurmrestd"
            self.transport: httpx.BaseTransport = httpx.HTTPTransport(uds=url[5:])
        else:
            self.base = url.rstrip("/")
            self.transport = httpx.HTTPTransport()

    @property
    def pull_token_hours(self) -> int:
        return self.pull_hours

    def available(self) -> bool:
        return os.access(self.jwt_key, os.R_OK)

    def for_user(self, user: str, login: PullLogin | None = None) -> SlurmRestScheduler:
        """Refuses root, system accounts and the service account before any token is minted."""
        return SlurmRestScheduler(self, target_user(user, self.service_account), login)

    def log_dir(self, pw: pwd.struct_passwd) -> Path:
        """LOG_ROOT/USER: the user writes and reads, the service account reads, nobody else sees."""
        d = self.log_root / pw.pw_name
        if not d.exists() and not d.is_symlink():
            self.log_root.mkdir(exist_ok=True)
            self.log_root.chmod(0o711)              # the server's umask would leave users outside
            # Made complete under a temporary name, then renamed: a server process next door may be doing
            # the same for this user's first job, and neither must see a directory without its ACLs.
            tmp = Path(tempfile.mkdtemp(prefix=f".{pw.pw_name}.", dir=self.log_root))
            r = subprocess.run(["setfacl", "-m", f"u:{pw.pw_uid}:rwx", "-m",
                                f"d:u::rw,d:g::-,d:o::-,d:u:{os.getuid()}:r,d:m::r", str(tmp)],
                               capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                tmp.rmdir()
                raise NagayaError(f"cannot give {pw.pw_name} their job log directory {d}: "
                                  f"{r.stderr.strip() or 'setfacl failed'} (does the file system support ACLs?)")
            try:
                os.rename(tmp, d)
            except OSError:                         # theirs won, and already holds a log
                tmp.rmdir()
        st = d.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise NagayaError(f"{d} is not the portal's job log directory")
        return d

    # -- HTTP -------------------------------------------------------------------------------------------------
    def _request(self, user: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        headers = {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": mint(user, check_key(self.jwt_key))}
        try:
            with httpx.Client(transport=self.transport, base_url=self.base, timeout=self.timeout) as c:
                r = c.request(method, API + path, headers=headers, json=body)
        except httpx.HTTPError as e:
            raise JobsUnavailable(f"slurmrestd at {self.url} did not answer: {e}") from None
        try:
            data: dict[str, Any] = r.json()
        except ValueError:
            data = {}
        errors = [e for e in data.get("errors") or [] if isinstance(e, dict)]
        if r.status_code in (401, 403):
            raise JobsUnavailable("slurmrestd refused the portal's token (is Slurm's jwt_key the same file?)")
        if errors or r.status_code >= 400:
            num = int(errors[0].get("error_number") or 0) if errors else 0
            msg = str(errors[0].get("description") or errors[0].get("error")) if errors else f"HTTP {r.status_code}"
            if num in _NOT_FOUND:
                raise NotFound(msg)
            if num in _DENIED:
                raise PermissionDenied(f"Slurm: {msg}")
            raise NagayaError(f"Slurm: {msg}")
        return data


class SlurmRestScheduler:
    """The `Scheduler` protocol through slurmrestd, as one user (made by SlurmRest.for_user)."""

    name = "slurmrestd"

    def __init__(self, site: SlurmRest, pw: pwd.struct_passwd, login: PullLogin | None = None) -> None:
        self.site, self.pw, self.user, self.login = site, pw, pw.pw_name, login

    def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return self.site._request(self.user, method, path, body)

    def list(self, all_users: bool = False) -> list[JobInfo]:
        if all_users:
            raise PermissionDenied("the portal lists only your own jobs")
        jobs = self._request("GET", "/jobs").get("jobs") or []
        return [job_info(j) for j in sorted(jobs, key=lambda j: int(j.get("job_id") or 0))
                if j.get("user_name") == self.user]

    def status(self, job_id: str) -> JobInfo:
        return job_info(self._job(job_id))

    def cancel(self, job_id: str) -> None:
        info = job_info(self._job(job_id))
        if info.state not in ACTIVE:
            raise Conflict(f"job {job_id} has already finished ({info.state})")
        self._request("DELETE", f"/job/{job_id}")

    def suspend(self, job_id: str) -> None:
        raise UsageError("slurmrestd cannot suspend a job (Slurm lets only its operators suspend)")

    def resume(self, job_id: str) -> None:
        raise UsageError("slurmrestd cannot resume a job (Slurm lets only its operators resume)")

    def hold(self, job_id: str) -> None:
        raise UsageError("the portal cannot hold a job through slurmrestd yet (scontrol hold does, as you)")

    def release(self, job_id: str) -> None:
        raise UsageError("the portal cannot release a job through slurmrestd yet (scontrol release does, as you)")

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter([self.tail(job_id).log.encode()])

    def tail(self, job_id: str, limit: int = LOG_TAIL) -> LogTail:
        raw = self._job(job_id)
        return self._log(job_id, str(raw.get("standard_output") or ""), limit)

    def usage(self, job_id: str) -> list[dict[str, Any]]:
        self._job(job_id)                   # NotFound for someone else's (or no) job
        return []                           # slurmrestd has no per-step samples: the charts stay empty

    def _job(self, job_id: str) -> dict[str, Any]:
        if not job_id.isdigit():
            raise NotFound(f"job {job_id} not found")
        jobs = self._request("GET", f"/job/{job_id}").get("jobs") or []
        # Slurm shows other users' jobs unless PrivateData=jobs; the portal shows only the caller's own, and
        # reports another's exactly like a missing one.
        if not jobs or jobs[0].get("user_name") != self.user:
            raise NotFound(f"job {job_id} not found")
        return dict(jobs[0])

    def submit(self, spec: JobSpec) -> str:
        """Submit the server-chosen part of `spec` (spec_to_wire's fields; the image pinned to `digest`): where
        it runs, as whom and in which partition is this backend's to say, never the caller's."""
        pw, site = self.pw, self.site
        if not spec.digest or not spec.image:
            raise UsageError("malformed job spec (no pinned digest)")
        name, _, _ = spec.image.partition("@")
        repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        spec = JobSpec(image=spec.image, ref=f"{repo}@{spec.digest}", digest=spec.digest,
                       command=[str(x) for x in spec.command], nodes=int(spec.nodes or 1),
                       ntasks=int(spec.ntasks or 1), cpus=int(spec.cpus or 1), mem=spec.mem, gpus=spec.gpus,
                       time_limit=int(spec.time_limit or 0), name=spec.name or repo.rsplit("/", 1)[-1],
                       cwd=pw.pw_dir, user=pw.pw_name, partition=site.partition)
        env = {"PATH": PATH, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "LANG": "C.UTF-8"}
        prologue: tuple[str, ...] = ()
        if self.login is not None:
            basic = base64.b64encode(f"{self.login.username}:{self.login.secret}".encode()).decode()
            env["NAGAYA_PORTAL_AUTH"] = json.dumps({"auths": {self.login.registry: {"auth": basic}}, "nagaya": {}})
            prologue = _pull_prologue(site.nagaya, spec.ref)
        job: dict[str, Any] = {
            "name": spec.name[:64], "comment": comment(spec), "current_working_directory": pw.pw_dir,
            "standard_output": str(site.log_dir(pw) / "slurm-%j.out"), "environment": env,
            "nodes": [spec.nodes, spec.nodes], "tasks": spec.ntasks, "cpus_per_task": spec.cpus,
            "requeue": False}
        if spec.mem:
            job["memory_per_node"] = mem_mb(spec.mem)
        if spec.gpus:
            job["gpus"] = spec.gpus
        if spec.time_limit:
            job["time_limit"] = -(-spec.time_limit // 60)          # minutes, rounded up as Slurm does
        if spec.partition:
            job["partition"] = spec.partition
        out = self._request("POST", "/job/submit", {"script": batch_script(spec, site.nagaya, prologue), "job": job})
        if not out.get("job_id"):
            raise NagayaError("slurmrestd accepted the job but returned no job id")
        return str(out["job_id"])

    # -- logs -------------------------------------------------------------------------------------------------
    def _log(self, job_id: str, out: str, limit: int = LOG_TAIL) -> LogTail:
        pw = self.pw
        path = Path(out.replace("%j", job_id))
        if path.parent != self.site.log_root / pw.pw_name:
            return LogTail(log=f"(this job writes its output to {out}, which the portal does not read)\n")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return LogTail()
        except OSError as e:
            raise PermissionDenied(f"cannot read the log of job {job_id}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            # The user owns the directory's files: only their own regular files are read, so no link can
            # make the portal show what only the service account may read.
            if not stat.S_ISREG(st.st_mode) or st.st_uid != pw.pw_uid or st.st_nlink != 1:
                raise PermissionDenied(f"the log of job {job_id} is not a plain file of {pw.pw_name}'s")
            size = st.st_size
            f.seek(max(0, size - limit))
            data = f.read(limit)
        return LogTail(log=data.decode(errors="replace"), truncated=size > limit)


def _pull_prologue(nagaya: str, ref: str) -> tuple[str, ...]:
    """Pull the pinned image once, as the user, before any step: the steps then find it in the user's cache
    (shared home, as for CLI jobs). The token reaches nagaya as a private file and leaves the environment."""
    q = shlex.quote
    return ('_auth="${TMPDIR:-/tmp}/nagaya-portal-auth-$SLURM_JOB_ID.json"',
            '(umask 077 && printf \'%s\\n\' "$NAGAYA_PORTAL_AUTH" > "$_auth")',
            "unset NAGAYA_PORTAL_AUTH",
            f'NAGAYA_AUTH_FILE="$_auth" {q(nagaya)} pull {q(ref)} >/dev/null || {{ rm -f "$_auth"; exit 1; }}',
            'rm -f "$_auth"')


def from_settings(settings: Any, state_dir: Path) -> SlurmRest:
    if not settings.slurmrestd_url or not settings.slurmrestd_jwt_key:
        raise UsageError("portal_submit = slurmrestd needs [sched] slurmrestd_url and slurmrestd_jwt_key")
    return SlurmRest(settings.slurmrestd_url, Path(settings.slurmrestd_jwt_key), state_dir / "job-logs",
                     nagaya=settings.job_nagaya or "nagaya", partition=settings.job_partition,
                     pull_hours=settings.portal_pull_hours)
