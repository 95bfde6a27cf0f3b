"""`nagaya site up|down|status`: a complete single-machine site on loopback — Debian's docker-registry
(`auth: token`, notifications to the server) and nagaya's server under uvicorn — as daemons with pid
records in the state dir. Started by root, both run as the service account (never root); otherwise as
the invoking user. Stdlib only at import time: `site status` stays quick."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nagaya import safefs
from nagaya.config import Config
from nagaya.errors import SiteError

STATE_FILE = "site.json"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass
class SiteStatus:
    registry: str
    server: str
    state_dir: str
    running: bool = False
    run_as: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    alive: dict[str, bool] = field(default_factory=dict)
    started_at: str = ""
    service: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True          # another user's process (the service account's): alive
    # a zombie is not alive for our purposes
    with contextlib.suppress(OSError):
        st = Path(f"/proc/{pid}/stat").read_text()
        if st.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _ours(pid: int, marker: str, uid: int | None = None) -> bool:
    """The pid still runs the command we started (pids get reused) as the account we started it as: the
    pids come from site.json, which the service account can write, and root must not signal a process of
    someone else's because that file names it."""
    try:
        if marker not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return False
        if uid is None:
            return True
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return all(int(x) == uid for x in line.split()[1:4])
    except (OSError, ValueError):
        return False
    return False


def _http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return 0


def default_state_dir(cfg: Config) -> Path:
    return cfg.site_state_dir


def find_state_dir(cfg: Config, state_dir: Path | None) -> Path:
    """An explicit dir, else the configured/default one, else (for users) the machine's site."""
    if state_dir is not None:
        return state_dir
    d = default_state_dir(cfg)
    machine = Path("/var/lib/nagaya/site")
    if not (d / STATE_FILE).exists() and not cfg.server.state_dir and (machine / STATE_FILE).exists():
        return machine
    return d


def read_status(state_dir: Path) -> SiteStatus:
    try:
        # The service account writes this file; root reads it: never through a link, a FIFO or a huge file.
        data = json.loads(safefs.read_at(None, str(state_dir / STATE_FILE), max_size=1 << 20))
    except FileNotFoundError:
        raise SiteError(f"no site in {state_dir} (start one with `nagaya site up`)") from None
    except (OSError, ValueError, safefs.UnsafePath) as e:
        raise SiteError(f"cannot read {state_dir / STATE_FILE}: {e}") from None
    known = set(SiteStatus.__dataclass_fields__)
    st = SiteStatus(**{k: v for k, v in data.items() if k in known})
    st.alive = {name: _alive(pid) for name, pid in st.pids.items()}
    st.running = bool(st.pids) and all(st.alive.values())
    return st


def _write_status(state_dir: Path, st: SiteStatus, acct: _Account | None = None) -> None:
    """site.json, written as the account that owns the state dir (a link planted there leads nowhere that
    account could not write itself), atomically, world-readable: users discover the site's URLs from it."""
    d = st.to_dict()
    d.pop("alive", None)
    with _as(acct):
        fd = _state_fd(state_dir, acct)
        try:
            safefs.write_at(fd, STATE_FILE, (json.dumps(d, indent=2) + "\n").encode(), 0o644)
        finally:
            os.close(fd)


@dataclass
class _Account:
    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str


def _account(cfg: Config) -> _Account:
    """Who the daemons run as: the service account when we are root, else ourselves."""
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(cfg.server.user)
        except KeyError:
            raise SiteError(f"service account {cfg.server.user!r} does not exist; run deploy/install.sh "
                            "(the server never runs as root)") from None
        if pw.pw_uid == 0:
            raise SiteError(f"service account {cfg.server.user!r} is root; the server never runs as root")
    else:
        pw = pwd.getpwuid(os.geteuid())
    return _Account(pw.pw_name, pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid), pw.pw_dir)


def _as(acct: _Account | None) -> Any:
    """Root does its work in the state dir as the service account that owns it (safefs.as_account)."""
    if acct is None or os.geteuid() != 0:
        return contextlib.nullcontext()
    return safefs.as_account(acct.uid, acct.gid, acct.groups)


def _state_fd(state_dir: Path, acct: _Account | None) -> int:
    """The state dir as an fd. For root (acting as the service account) reached without following links
    and checked to be the service account's; a site of one's own in one's home needs no such walk."""
    if os.geteuid() == 0 or (acct is not None and acct.uid != os.getuid()):
        return safefs.open_dir(state_dir, (acct.uid,) if acct else ())
    return os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _status_account(st: SiteStatus) -> _Account | None:
    """The account a running site's state dir belongs to (from its record), for root's later writes."""
    if os.geteuid() != 0 or not st.run_as:
        return None
    try:
        pw = pwd.getpwnam(st.run_as)
    except KeyError:
        return None
    return _Account(pw.pw_name, pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid), pw.pw_dir)


def _own_state_dir(state_dir: Path, acct: _Account) -> None:
    """Root makes the state dir (its parents are root's) and hands it to the service account through an fd
    opened without following links; a directory that another account made first is refused. Files an older
    nagaya created there as root (single-link regular files only, reached by fd) are handed over too."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        state_dir.mkdir(exist_ok=True)
        return
    pfd = safefs.open_dir(state_dir.parent)
    try:
        fd = safefs.mkdir_at(pfd, state_dir.name, 0o755, acct.uid, acct.gid, owners=(0, acct.uid))
    finally:
        os.close(pfd)
    try:
        _adopt_legacy(fd, acct, depth=0)
    finally:
        os.close(fd)


def _adopt_legacy(dfd: int, acct: _Account, depth: int) -> None:
    for name in os.listdir(dfd):
        if depth == 0 and name in ("job-logs", "jobs-spool", "registry", "archive"):
            continue                   # users' job output, root's dispatcher spool, bulk data: not ours to chown
        st = safefs.lstat_at(dfd, name)
        if st.st_uid != 0:
            continue
        if stat.S_ISDIR(st.st_mode) and depth == 0:
            sub = safefs.open_dir_at(dfd, name, (0,))
            try:
                os.fchown(sub, acct.uid, acct.gid)
                _adopt_legacy(sub, acct, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            try:
                f = safefs.open_at(dfd, name, owners=(0,))
            except (OSError, safefs.UnsafePath):
                continue
            try:
                os.fchown(f, acct.uid, acct.gid)
            finally:
                os.close(f)


def _registry_config(state_dir: Path, reg_addr: str, server_url: str, service: str, issuer: str,
                     ca: Path, notify_secret: str) -> dict[str, Any]:
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {"filesystem": {"rootdirectory": str(state_dir / "registry")},
                    "delete": {"enabled": True}, "cache": {"blobdescriptor": "inmemory"}},
        "http": {"addr": reg_addr, "secret": secrets.token_hex(16),
                 "headers": {"X-Content-Type-Options": ["nosniff"]}},
        "auth": {"token": {"realm": f"{server_url}/token", "service": service, "issuer": issuer,
                           "rootcertbundle": str(ca), "autoredirect": False}},
        "notifications": {"endpoints": [{
            "name": "nagaya", "url": f"{server_url}/api/registry/events",
            "headers": {"Authorization": [f"Bearer {notify_secret}"]},
            "timeout": "5s", "threshold": 5, "backoff": "1s",
            "ignoredmediatypes": ["application/octet-stream"],
        }]},
    }


def _spawn(name: str, argv: list[str], state_dir: Path, acct: _Account, log_as: _Account | None = None,
           keep: tuple[str, ...] = ()) -> int:
    """Start a daemon as `acct`; its log is opened as the state dir's owner (`log_as`), so a link planted
    in logs/ cannot make root append to a file of its choosing. `keep`: variables of this command's own
    environment the daemon gets too."""
    with _as(log_as or acct):
        fd = os.open(state_dir / "logs" / f"{name}.log",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    log = os.fdopen(fd, "ab")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(state_dir), "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.update({k: os.environ[k] for k in keep if k in os.environ})
    kw: dict[str, Any] = {}
    if os.geteuid() == 0:
        kw = {"user": acct.uid, "group": acct.gid, "extra_groups": acct.groups}
    try:
        # A new session: the daemon outlives this command and gets no terminal signals.
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=state_dir,
                             env=env, start_new_session=True, close_fds=True, umask=0o027, **kw)
    except OSError as e:
        raise SiteError(f"cannot start {name}: {e}") from None
    finally:
        log.close()
    return p.pid


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()[-n:]
    except OSError:
        return ""
    return " | ".join(x.strip()[:200] for x in lines)


def up(cfg: Config, state_dir: Path | None = None) -> SiteStatus:
    from nagaya.server.pki import ensure_signing_files
    from nagaya.server.settings import ServerSettings

    state_dir = (state_dir or default_state_dir(cfg)).absolute()
    record = state_dir / STATE_FILE
    if record.is_symlink() or (record.exists() and not record.is_file()):
        print(f"nagaya: warning: {record} is not a regular file (planted?); it is replaced", file=sys.stderr)
    elif record.exists():
        st = read_status(state_dir)
        if st.running:
            return st
        if any(st.alive.values()):
            raise SiteError(f"the site in {state_dir} is half running; run `nagaya site down` first")
    if not Path(cfg.server.registry_bin).exists():
        raise SiteError(f"{cfg.server.registry_bin} not found (apt-get install docker-registry)")
    acct = _account(cfg)
    host = cfg.server.host
    jobs = _portal_jobs(cfg, acct)
    _own_state_dir(state_dir, acct)
    with _as(acct):                   # every file in the state dir is made as the service account that owns it
        for sub, mode in (("registry", 0o700), ("certs", 0o755), ("logs", 0o750)):   # logs name users and repos
            (state_dir / sub).mkdir(exist_ok=True)
            (state_dir / sub).chmod(mode)
        files = ensure_signing_files(state_dir / "certs")
    server_port = cfg.server.port or _free_port(host)
    reg_port = cfg.server.registry_port or _free_port(host)
    while reg_port == server_port:
        reg_port = _free_port(host)
    server_url = f"http://{host}:{server_port}"
    registry = f"{host}:{reg_port}"
    notify_secret = secrets.token_urlsafe(32)
    settings = ServerSettings(
        database=cfg.server.database or f"sqlite:///{state_dir / 'nagaya.db'}", host=host, port=server_port,
        registry=registry, service=cfg.server.service, issuer=cfg.server.issuer, token_ttl=cfg.server.token_ttl,
        login_ttl_days=cfg.server.login_ttl_days, signing_key=str(files.key), signing_cert=str(files.cert),
        ca_cert=str(files.ca_cert), notify_secret=notify_secret, auth=cfg.server.auth,
        pam_service=cfg.server.pam_service, admin_users=list(cfg.server.admin_users),
        admin_groups=list(cfg.server.admin_groups), ldap=cfg.ldap.to_dict(), **jobs)
    settings.workers = cfg.server.workers        # server processes (uvicorn workers); 0: one per CPU
    settings.vulndb = cfg.image.vulndb           # scan on push (nagaya.server.scans)
    settings.keys_dir, settings.image_policy = cfg.image.keys_dir, list(cfg.image.policy)   # signature states
    settings.app_idle_minutes, settings.app_max_hours, settings.app_warn_minutes = (      # [apps] limits
        cfg.apps.idle_minutes, cfg.apps.max_hours, cfg.apps.warn_minutes)
    from nagaya.units import parse_size

    b = cfg.builds                               # [builds]: the Build page's limits (server/builds.py)
    settings.build_upload_max, settings.build_unpacked_max = parse_size(b.upload_max), parse_size(b.unpacked_max)
    settings.build_git_hosts, settings.build_git_schemes = b.git_hosts, b.git_schemes
    settings.build_max_running, settings.build_hours = b.max_running, b.hours
    settings_path = state_dir / "server.json"
    reg_cfg = state_dir / "registry.yml"     # JSON is YAML: no YAML writer needed
    reg_doc = _registry_config(state_dir, registry, server_url, cfg.server.service, cfg.server.issuer,
                               files.ca_cert, notify_secret)
    with _as(acct):
        fd = _state_fd(state_dir, acct)
        try:
            safefs.write_at(fd, settings_path.name, settings.dumps().encode(), 0o600)
            safefs.write_at(fd, reg_cfg.name, json.dumps(reg_doc, indent=2).encode(), 0o600)
        finally:
            os.close(fd)
    st = SiteStatus(registry=registry, server=server_url, state_dir=str(state_dir), run_as=acct.name,
                    started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), service=cfg.server.service)
    st.pids["server"] = _spawn("server", [sys.executable, "-m", "nagaya.server", str(settings_path)], state_dir, acct)
    _write_status(state_dir, st, acct)
    st.pids["registry"] = _spawn("registry", [cfg.server.registry_bin, "serve", str(reg_cfg)], state_dir, acct)
    _write_status(state_dir, st, acct)
    if os.geteuid() == 0 and settings.portal_submit == "dispatcher":
        # The portal's job dispatcher: the only part that runs as root, and only to start each user's own
        # scheduler operations as that user (server/jobs.py). Without root the portal shows jobs as off.
        # Where the site's scheduler config is (SLURM_CONF...) as `site up` was given it: what the dispatcher
        # passes on to each user's operations (sched/onbehalf.py user_env).
        from nagaya.sched.onbehalf import SITE_ENV

        root = _Account("root", 0, 0, [], "/root")
        st.pids["jobs"] = _spawn("jobs", [sys.executable, "-m", "nagaya.server.jobs", "dispatch",
                                          str(state_dir / "jobs-spool"), acct.name], state_dir, root, acct,
                                 keep=SITE_ENV)
        _write_status(state_dir, st, acct)
    try:
        _wait_ready(st, state_dir)
    except SiteError:
        _stop(st, state_dir, acct)
        raise
    st.running = True
    st.alive = {k: True for k in st.pids}
    return st


def _portal_jobs(cfg: Config, acct: _Account) -> dict[str, Any]:
    """How the portal submits jobs ([sched] portal_submit): the root dispatcher, or slurmrestd with Slurm's
    JWT key, which must be the service account's to read and nobody else's (it can act as any user)."""
    how = cfg.sched.portal_submit
    if how not in ("dispatcher", "slurmrestd"):
        raise SiteError(f"[sched] portal_submit must be dispatcher or slurmrestd, not {how!r}")
    out: dict[str, Any] = {"portal_submit": how, "job_nagaya": cfg.sched.nagaya or shutil.which("nagaya") or "",
                           "job_partition": cfg.sched.partition, "portal_pull_hours": cfg.sched.portal_pull_hours}
    if how == "slurmrestd":
        key = Path(cfg.sched.slurmrestd_jwt_key)
        if not cfg.sched.slurmrestd_url or not cfg.sched.slurmrestd_jwt_key:
            raise SiteError("portal_submit = slurmrestd needs [sched] slurmrestd_url and slurmrestd_jwt_key")
        try:
            st = key.stat()
        except OSError as e:
            raise SiteError(f"Slurm JWT key {key}: {e.strerror}") from None
        if st.st_mode & 0o007:
            raise SiteError(f"Slurm JWT key {key} is readable by every user: chmod o-rwx it")
        readable = (st.st_uid == acct.uid and st.st_mode & 0o400) or \
            ((st.st_gid == acct.gid or st.st_gid in acct.groups) and st.st_mode & 0o040)
        if os.geteuid() == 0 and not readable:
            raise SiteError(f"Slurm JWT key {key} is not readable by {acct.name} (chgrp {acct.name} and chmod "
                            f"g+r it, or give {acct.name} a copy of its own, mode 0400)")
        out.update(slurmrestd_url=cfg.sched.slurmrestd_url, slurmrestd_jwt_key=str(key.absolute()))
    return out


def _wait_ready(st: SiteStatus, state_dir: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    checks = {"server": (f"{st.server}/api/info", {200}), "registry": (f"http://{st.registry}/v2/", {401})}
    pending = dict(checks)
    while pending:
        for name, (url, ok) in list(pending.items()):
            if not _alive(st.pids[name]):
                raise SiteError(f"{name} exited at start-up: {_tail(state_dir / 'logs' / f'{name}.log')}")
            if _http_status(url) in ok:
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise SiteError(f"{', '.join(pending)} did not answer within {START_TIMEOUT:.0f} s; see "
                            f"{state_dir / 'logs'}")
        time.sleep(0.1)


def _stop(st: SiteStatus, state_dir: Path, acct: _Account | None = None) -> list[str]:
    markers = {"server": str(state_dir / "server.json"), "registry": str(state_dir / "registry.yml"),
               "jobs": str(state_dir / "jobs-spool")}
    acct = acct or _status_account(st)
    owners = {"server": acct.uid if acct else None, "registry": acct.uid if acct else None,
              "jobs": 0 if acct else None}
    stopped = []
    # The registry first: it sends its last notifications to the server.
    for name in sorted(st.pids, key=lambda n: n != "registry"):
        pid = st.pids[name]
        if not _alive(pid) or not _ours(pid, markers.get(name, ""), owners.get(name) if acct else None):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)           # the daemon leads its own session/process group
        except PermissionError:
            raise SiteError(f"not allowed to stop the {name} (pid {pid}); run `site down` as root or "
                            f"{st.run_as}") from None
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while _alive(pid) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
        stopped.append(name)
    st.pids = {}
    st.running = False
    st.alive = {}
    _write_status(state_dir, st, acct)
    return stopped


def down(cfg: Config, state_dir: Path | None = None) -> tuple[SiteStatus, list[str]]:
    state_dir = find_state_dir(cfg, state_dir).absolute()
    st = read_status(state_dir)
    return st, _stop(st, state_dir)


def status(cfg: Config, state_dir: Path | None = None) -> SiteStatus:
    state_dir = find_state_dir(cfg, state_dir).absolute()
    st = read_status(state_dir)
    if st.running and _http_status(f"{st.server}/api/info") != 200:
        st.running = False
    return st
