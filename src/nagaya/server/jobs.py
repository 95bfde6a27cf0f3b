"""Jobs from the portal, run AS THE USER, never in the server process: the dispatcher's `UserSchedulers`.

`Dispatched.for_user(user)` is a `Scheduler` (sched/__init__.py) like the CLI's backends: the portal calls it
with a typed JobSpec and gets JobInfo back. Underneath, each call crosses to the user's side as data.

The server runs as the service account and must not run user code, nor hold a way to become any user by
itself. It only writes a *request* (data: an operation, the logged-in user's name, a JobSpec's fields) into
a spool directory; a small root dispatcher (`python -m nagaya.server.jobs dispatch SPOOL`, the pattern of
JupyterHub's sudospawner and Open OnDemand's nginx_stage) checks it and runs one fixed entry point of
nagaya as that user (`setpriv` to the user's uid/gid/groups, a clean environment), which talks to the
user's own scheduler backend (`nagaya.sched.get_scheduler`: the local executor in the user's own state
dir, or Slurm's sbatch as the user). The reply comes back through the spool.

What the dispatcher refuses: unknown operations, unknown users, root and system accounts (uid below
UID_MIN), the service account itself, malformed specs. The trust it places in the service account is the
portal's unavoidable one (the portal decides who is logged in); it never runs a command line from the
request, only `nagaya.sched` calls with typed arguments: a spec crosses as its wire form (onbehalf.spec_to_wire),
checked by the dispatcher and again on the user's side (onbehalf.spec_from_wire) before it becomes a JobSpec.

Layout: SPOOL/requests/ID.json (written by the server, atomically), SPOOL/replies/ID.json (by the
dispatcher). SPOOL is root:SERVICE 0750, both subdirectories 0770.

The other `UserSchedulers`, for sites whose scheduler is Slurm, needs no root part at all: sched/slurmrest.py
submits through slurmrestd with a short-lived JWT per user (`[sched] portal_submit = "slurmrestd"`).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nagaya import safefs
from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError
from nagaya.sched.models import JobInfo, JobSpec
from nagaya.sched.onbehalf import (  # noqa: F401 - NOBODY, UID_MIN: this module's names before sched/onbehalf.py
    BUSY,
    LOG_TAIL,
    NOBODY,
    UID_MIN,
    USER_OPS,
    JobsBusy,
    JobsUnavailable,
    LogTail,
    PerUser,
    PullLogin,
    info_from_wire,
    spec_from_wire,
    spec_to_wire,
    target_user,
    user_env,
)

OPS = ("submit", "list", "status", "cancel", "suspend", "resume", "hold", "release", "logs", "app_submit", "usage",
       "terminal", "app_relay", "build_submit")
CONTROLS = {"cancel": "cancelled", "suspend": "suspended", "resume": "resumed", "hold": "held", "release": "released"}
# Seconds, not minutes: a server thread waits this long at most, whatever the user's files or processes do.
OP_TIMEOUT = 15.0                        # the user's operation, then its whole process group is killed
REPLY_TIMEOUT = OP_TIMEOUT + 5.0         # the server's wait for a reply (the dispatcher may queue it briefly)
MAX_OPS = 32                             # all users' operations in flight in the dispatcher
REQUEST_MAX = 64 * 1024                  # bytes of a request file (a job spec, a login token)
OUTPUT_MAX = 8 << 20                     # bytes the dispatcher reads of an operation's output
_RID = re.compile(r"^[0-9a-f]{32}$")
_KINDS: dict[str, type[NagayaError]] = {"NotFound": NotFound, "PermissionDenied": PermissionDenied,
                                        "Conflict": Conflict, "JobsBusy": JobsBusy,
                                        "JobsUnavailable": JobsUnavailable}


class SpoolGateway:
    """The server's side of the spool, the wire under SpoolScheduler: write a request, wait for its reply."""

    def __init__(self, spool: Path, timeout: float = REPLY_TIMEOUT) -> None:
        self.spool = spool
        self.timeout = timeout

    def available(self) -> bool:
        try:
            pid = int((self.spool / "dispatcher.pid").read_text())
            os.kill(pid, 0)
        except PermissionError:
            return True                  # root's process, alive
        except (OSError, ValueError):
            return False
        return True

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        if op not in OPS:
            raise UsageError(f"unknown job operation {op}")
        if not self.available():
            raise JobsUnavailable("the job service is not running on this site (ask your admins)")
        rid = secrets.token_hex(16)
        req = self.spool / "requests"
        tmp = req / f".{rid}.tmp"
        tmp.write_text(json.dumps({"id": rid, "user": user, "op": op, "args": args}))
        os.replace(tmp, req / f"{rid}.json")
        reply = self.spool / "replies" / f"{rid}.json"
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while not reply.exists():
            if time.monotonic() > deadline:
                (req / f"{rid}.json").unlink(missing_ok=True)      # not started yet: never start it
                raise JobsUnavailable("the job service did not answer in time; try again later")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        try:
            data = json.loads(reply.read_text())
        finally:
            reply.unlink(missing_ok=True)
        if "error" in data:
            kind = _KINDS.get(data.get("kind", ""), UsageError)
            raise kind(str(data["error"]))
        return data.get("result")


class SpoolScheduler:
    """The `Scheduler` protocol for one user, over the dispatcher: each call is one request through the spool,
    run as the user by their own backend (`get_scheduler`), its answer decoded back into typed values."""

    name = "dispatcher"

    def __init__(self, wire: Any, user: str, login: PullLogin | None = None) -> None:
        self.wire, self.user, self.login = wire, user, login      # wire: SpoolGateway (or a test's stand-in)

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        return self.wire.call(self.user, op, args)

    # ---- the dispatcher's operations beyond the protocol, typed like the rest ------------------------------
    def terminal(self, job_id: str, rows: int = 24, cols: int = 80) -> tuple[str, str]:
        """A terminal into the running job (server/job_terminal.py): the one-use socket's name in SPOOL/terms
        and the secret the server sends first."""
        out = self._call("terminal", {"job_id": job_id, "rows": rows, "cols": cols})
        name, secret = (str(out.get(k, "")) for k in ("socket", "secret")) if isinstance(out, dict) else ("", "")
        if not _socket_name(name) or not secret:
            raise NagayaError("the job service answered nonsense")
        return name, secret

    def app_relay(self, session: str, job_id: str, node: str) -> str:
        """A one-use relay to the session's app on `node` (server/app_relay.py): its socket's name in SPOOL/terms."""
        out = self._call("app_relay", {"session": session, "job_id": job_id, "node": node})
        name = str(out.get("socket", "")) if isinstance(out, dict) else ""
        if not _socket_name(name):
            raise NagayaError("the job service opened no relay")
        return name

    def submit_build(self, recipe: dict[str, Any], login: PullLogin, spec: JobSpec, upload: str = "",
                     rebuild_of: str = "") -> str:
        """A build job (server/build_launch.py): the user's side prepares its directory, then submits `spec`
        (its name, cpus, mem, time limit) with JobSpec.build set to the recipe."""
        args: dict[str, Any] = {"recipe": recipe, "login": login.to_dict(), "spec": spec_to_wire(spec)}
        if upload:
            args["upload"] = upload
        if rebuild_of:
            args["rebuild_of"] = rebuild_of
        out = self._call("build_submit", args)
        if not isinstance(out, dict) or not isinstance(out.get("id"), str):
            raise NagayaError("the job service answered nonsense")
        return str(out["id"])

    def _spec_args(self, spec: JobSpec) -> dict[str, Any]:
        args: dict[str, Any] = {"spec": spec_to_wire(spec)}
        if self.login is not None:
            args["login"] = self.login.to_dict()
        return args

    def submit(self, spec: JobSpec) -> str:
        return str(self._call("submit", self._spec_args(spec))["id"])

    def submit_app(self, spec: JobSpec, app: Any) -> str:
        """An interactive app (server/app_launch.py's AppRequest): the user's side wraps the command in its launcher."""
        return str(self._call("app_submit", {**app.to_dict(), **self._spec_args(spec)})["id"])

    def status(self, job_id: str) -> JobInfo:
        return info_from_wire(self._call("status", {"job_id": job_id}))

    def list(self, all_users: bool = False) -> list[JobInfo]:
        if all_users:
            raise PermissionDenied("the portal lists only your own jobs")
        out = self._call("list", {})
        if not isinstance(out, list):
            raise NagayaError("the job operation answered nonsense")
        return [info_from_wire(j) for j in out]

    def cancel(self, job_id: str) -> None:
        self._call("cancel", {"job_id": job_id})

    def suspend(self, job_id: str) -> None:
        self._call("suspend", {"job_id": job_id})

    def resume(self, job_id: str) -> None:
        self._call("resume", {"job_id": job_id})

    def hold(self, job_id: str) -> None:
        self._call("hold", {"job_id": job_id})

    def release(self, job_id: str) -> None:
        self._call("release", {"job_id": job_id})

    def tail(self, job_id: str, limit: int = LOG_TAIL) -> LogTail:
        out = self._call("logs", {"job_id": job_id})
        if not isinstance(out, dict) or not isinstance(out.get("log", ""), str):
            raise NagayaError("the job operation answered nonsense")
        return LogTail(log=out.get("log", "")[-limit:], truncated=bool(out.get("truncated")))

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]:
        return iter([self.tail(job_id).log.encode()])

    def usage(self, job_id: str) -> list[dict[str, Any]]:
        out = self._call("usage", {"job_id": job_id})
        return [x for x in out if isinstance(x, dict)] if isinstance(out, list) else []


def _socket_name(name: str) -> bool:
    return name.endswith(".sock") and "/" not in name and 5 < len(name) < 80


class Dispatched:
    """The site's `UserSchedulers` through the root dispatcher's spool (STATE_DIR/jobs-spool)."""

    name = "dispatcher"
    pull_token_hours = 0            # the user's side pulls at once: the portal's token lives minutes

    def __init__(self, wire: Any) -> None:
        self.wire = wire

    def available(self) -> bool:
        up = getattr(self.wire, "available", None)
        return bool(up()) if up is not None else True

    def for_user(self, user: str, login: PullLogin | None = None) -> SpoolScheduler:
        return SpoolScheduler(self.wire, user, login)

    def __getattr__(self, name: str) -> Any:          # the wire's spool, for the terminals beside it
        if name == "wire":
            raise AttributeError(name)
        return getattr(self.wire, name)


# ---- the dispatcher (root) -------------------------------------------------------------------------------
#
# The spool's directories are writable by the service account, so everything the dispatcher does in them
# goes through safefs, relative to directory fds it opened once: requests are read O_NOFOLLOW|O_NONBLOCK,
# only regular single-link files of the service account's, size-capped, then unlinked (unlinkat); replies
# are fresh O_EXCL temp files renamed into place. A link or FIFO planted by the service account is refused
# or replaced, never followed. Operations are capped per user and in total, and killed (their whole
# process group) after OP_TIMEOUT.

def _check(req: dict[str, Any], service_account: str) -> tuple[pwd.struct_passwd, str, dict[str, Any]]:
    op, user, args = req.get("op"), req.get("user"), req.get("args")
    if op not in OPS or not isinstance(user, str) or not isinstance(args, dict):
        raise PermissionDenied("malformed request")
    pw = target_user(user, service_account)
    if op == "app_submit":
        from nagaya.server.app_launch import check_app_args

        check_app_args(args)
    if op == "build_submit":             # a build job (server/build_launch.py)
        from nagaya.server.build_launch import check_build_args

        check_build_args(args)
    if op == "terminal":                 # a long-lived pty as the user (server/job_terminal.py)
        from nagaya.server.job_terminal import check_args

        check_args(args)
    if op == "app_relay":                # to an app on another node, through the scheduler (server/app_relay.py)
        from nagaya.server.app_relay import check_relay_args

        check_relay_args(args)
    if op in ("submit", "app_submit", "build_submit"):
        spec_from_wire(args.get("spec"))           # the user's side checks it again before it becomes a JobSpec
    elif op != "list" and not isinstance(args.get("job_id"), str):
        raise UsageError("job_id missing")
    return pw, op, args


def _collect(p: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bytes] | None:
    """The process's output, at most OUTPUT_MAX bytes; None when it ran past `timeout` or wrote too much
    (then its process group is killed). Never waits for a grandchild that keeps the pipes open."""
    assert p.stdout is not None and p.stderr is not None
    out: dict[int, bytearray] = {p.stdout.fileno(): bytearray(), p.stderr.fileno(): bytearray()}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for f in (p.stdout, p.stderr):
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0 or sum(map(len, out.values())) > OUTPUT_MAX:
                return None
            for key, _ in sel.select(min(left, 1.0)):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    out[key.fd] += chunk
                else:
                    sel.unregister(key.fileobj)
    try:
        p.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None
    return bytes(out[p.stdout.fileno()]), bytes(out[p.stderr.fileno()])


def _run_as(pw: pwd.struct_passwd, op: str, args: dict[str, Any], timeout: float = OP_TIMEOUT) -> dict[str, Any]:
    env = user_env(pw)                    # the site's SLURM_CONF etc. as the dispatcher got them, nothing else
    argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--",
            sys.executable, "-I", "-m", "nagaya.server.jobs", "op"]
    # Its own process group (a new session), so that a timeout kills everything the operation started.
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         cwd="/", start_new_session=True, close_fds=True)
    try:
        assert p.stdin is not None
        try:
            p.stdin.write(json.dumps({"op": op, "args": args}).encode())
            p.stdin.close()
        except BrokenPipeError:
            pass
        got = _collect(p, timeout)
    finally:
        _kill_group(p)              # also after a normal exit: nothing the operation started outlives it
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
    if got is None:
        return {"error": "the scheduler did not answer in time (or answered too much); try again later",
                "kind": "JobsUnavailable"}
    stdout, stderr = (x.decode(errors="replace") for x in got)
    try:
        out: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        if not isinstance(out, dict):
            raise ValueError
        return out
    except (ValueError, IndexError):
        return {"error": (stderr.strip().splitlines() or ["the job operation failed"])[-1][:500]}


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    """SIGKILL the operation's process group (it may have left children), then reap the leader."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _stamp(out: dict[str, Any], pw: pwd.struct_passwd, op: str) -> dict[str, Any]:
    """A job's owner is the account its operation ran as, never what the user's own jobs database says."""
    res = out.get("result")
    items = res if op == "list" and isinstance(res, list) else [res] if op == "status" else []
    for j in items:
        if isinstance(j, dict):
            j["user"] = pw.pw_name
    if op == "list" and not isinstance(res, list) and "error" not in out:
        return {"error": "the job operation answered nonsense"}
    return out


class Dispatcher:
    """The root dispatcher over one spool: reads requests through directory fds, caps work, writes replies."""

    def __init__(self, spool: Path, service_account: str = "nagaya") -> None:
        import grp

        self.service_account = service_account
        self.svc_uid = pwd.getpwnam(service_account).pw_uid
        self.gid = grp.getgrnam(service_account).gr_gid
        self.flight = PerUser(USER_OPS, MAX_OPS)
        self.refused: set[str] = set()
        self.apps_error = ""
        # STATE_DIR belongs to the service account: open it (and everything above) without following links,
        # then create or open jobs-spool in it, refusing one that the service account made or swapped in.
        sfd = safefs.open_dir(spool.parent, (self.svc_uid,))
        try:
            self.spool = safefs.mkdir_at(sfd, spool.name, 0o750, 0, self.gid, owners=(0,))
        finally:
            os.close(sfd)
        self.requests = safefs.mkdir_at(self.spool, "requests", 0o770, 0, self.gid, owners=(0,))
        self.replies = safefs.mkdir_at(self.spool, "replies", 0o770, 0, self.gid, owners=(0,))
        # Interactive apps' sockets (server/app_launch.py): STATE_DIR-apps/USER/SESSION/, each user's own.
        from nagaya.server.app_launch import apps_root

        self.apps_path, self.apps = apps_root(spool.parent), -1
        try:
            pfd = safefs.open_dir(self.apps_path.parent)
            try:
                self.apps = safefs.mkdir_at(pfd, self.apps_path.name, 0o755, 0, 0, owners=(0,))
            finally:
                os.close(pfd)
        except (OSError, safefs.UnsafePath) as e:          # jobs still run; apps answer why they cannot
            self.apps_error = f"{self.apps_path}: {e}"
        # Terminals into running jobs (server/job_terminal.py): one-use sockets in SPOOL/terms/.
        from nagaya.server.job_terminal import Terminals

        self.terminals = Terminals(self.spool, spool, self.svc_uid, self.gid)

        # Uploaded build contexts on their way to the user (server/build_launch.py): STATE_DIR-builds/.
        from nagaya.server.build_launch import make_uploads_dir

        self.uploads_path = make_uploads_dir(spool.parent, self.gid)

    def reply(self, rid: str, out: dict[str, Any]) -> None:
        try:
            safefs.write_at(self.replies, f"{rid}.json", json.dumps(out).encode(), 0o640, 0, self.gid)
        except (OSError, safefs.UnsafePath) as e:
            sys.stderr.write(f"nagaya jobs dispatcher: reply {rid}: {e}\n")

    def take(self, name: str) -> dict[str, Any] | None:
        """Read and remove one request; None for anything that is not a well-formed, fresh request file
        of the service account's (removed all the same: unlinkat removes a planted link, not its target)."""
        try:
            if not (name.endswith(".json") and _RID.match(name[:-5])):
                return None
            fd = safefs.open_at(self.requests, name, owners=(self.svc_uid,))
            try:
                st = os.fstat(fd)
                if time.time() - st.st_mtime > REPLY_TIMEOUT:
                    return None                          # its server gave up waiting long ago
                if st.st_size > REQUEST_MAX:
                    raise safefs.UnsafePath(f"{name} is larger than {REQUEST_MAX} bytes")
                raw = os.read(fd, REQUEST_MAX + 1)
            finally:
                os.close(fd)
            req = json.loads(raw)
            if not isinstance(req, dict) or req.get("id") != name[:-5]:
                return None
            return req
        except (OSError, ValueError, safefs.UnsafePath) as e:
            sys.stderr.write(f"nagaya jobs dispatcher: {name[:80]!r} refused: {e}\n")
            return None
        finally:
            try:
                safefs.remove_at(self.requests, name)
            except OSError:
                try:
                    os.rmdir(name, dir_fd=self.requests)
                except OSError:
                    if len(self.refused) > 10000:
                        self.refused.clear()
                    self.refused.add(name)                   # cannot be removed (a full directory): skipped

    def handle(self, req: dict[str, Any]) -> None:
        rid = str(req["id"])
        try:
            pw, op, args = _check(req, self.service_account)
        except NagayaError as e:
            self.reply(rid, {"error": e.message, "kind": type(e).__name__})
            return
        if op == "terminal":                             # its own caps: a terminal lives long
            self.reply(rid, self.terminals.start(pw, args))
            return
        if op == "app_relay":                            # the session's directory is ours to name, never the request's
            from nagaya.server.app_relay import run_relay

            args["dir"] = str(self.apps_path / pw.pw_name / args["session"])
            self.reply(rid, self.terminals.start(pw, args, run=run_relay))
            return
        if not self.flight.acquire(pw.pw_name):
            self.reply(rid, {"error": BUSY, "kind": "JobsBusy"})
            return

        if op == "app_submit":
            from nagaya.server.app_launch import user_app_dir

            try:
                if self.apps < 0:
                    raise OSError(self.apps_error)
                args["dir"] = str(user_app_dir(self.apps, self.apps_path, pw, self.gid))
            except (OSError, NagayaError) as e:
                self.flight.release(pw.pw_name)
                self.reply(rid, {"error": f"cannot prepare the app directory: {e}"})
                return

        if op == "build_submit":                          # where the server left the uploaded context
            args.update(upload_dir=str(self.uploads_path), upload_uid=self.svc_uid)

        def work() -> None:
            try:
                self.reply(rid, _stamp(_run_as(pw, op, args), pw, op))
            except Exception as e:                       # a reply always, so the server never waits in vain
                self.reply(rid, {"error": f"the job operation failed: {e}"})
            finally:
                self.flight.release(pw.pw_name)
        threading.Thread(target=work, daemon=True).start()

    def prune_replies(self) -> None:
        """Replies nobody collected (their server gave up): removed after a while, links included."""
        now = time.time()
        for name in os.listdir(self.replies):
            try:
                if now - safefs.lstat_at(self.replies, name).st_mtime > 10 * REPLY_TIMEOUT:
                    safefs.remove_at(self.replies, name)
            except OSError:
                continue

    def serve(self) -> None:
        safefs.write_at(self.spool, "dispatcher.pid", f"{os.getpid()}\n".encode(), 0o644)
        last_prune = 0.0
        try:
            while True:
                for name in sorted(os.listdir(self.requests)):
                    if name.startswith(".") or name in self.refused:
                        continue                          # the server's temp files, renamed when complete
                    req = self.take(name)
                    if req is not None:
                        self.handle(req)
                if time.monotonic() - last_prune > 60:
                    self.prune_replies()
                    last_prune = time.monotonic()
                time.sleep(0.05)
        finally:
            safefs.remove_at(self.spool, "dispatcher.pid")


def dispatch(spool: Path, service_account: str = "nagaya") -> None:
    """Serve requests until killed. Run as root; creates the spool with the modes above."""
    if os.geteuid() != 0:
        raise SystemExit("nagaya jobs dispatcher: run as root (it starts job operations as each user)")
    try:
        d = Dispatcher(spool, service_account)
    except (OSError, NagayaError) as e:
        raise SystemExit(f"nagaya jobs dispatcher: {spool}: {e}") from None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))       # so the pid file goes with us
    d.serve()


# ---- the user's side (runs as the user, started by the dispatcher) -----------------------------------------

def _user_op(op: str, args: dict[str, Any]) -> Any:
    """One operation on the user's own backend, the same `Scheduler` the CLI uses; answers JSON."""
    from nagaya.config import load
    from nagaya.sched import get_scheduler
    from nagaya.sched.onbehalf import log_tail

    cfg = load()
    sched = get_scheduler(cfg)
    if op == "list":
        return [j.to_json() for j in sched.list()]
    if op == "build_submit":                # the build's directory, then a job of `nagaya build --recipe`
        from nagaya.server.build_launch import submit_build_as_me

        return submit_build_as_me(sched, args)
    if op in ("submit", "app_submit"):
        spec = spec_from_wire(args.get("spec"))              # checked again here: this side trusts no one
        spec.cwd = os.path.expanduser("~")
        if op == "app_submit":
            from nagaya.server.app_launch import prepare_app

            spec = prepare_app(args, spec)                   # the launcher around the command, its own cwd
        return {"id": _submit_as_me(cfg, sched, spec, args.get("login"))}
    job_id = str(args["job_id"])
    if op == "status":
        return sched.status(job_id).to_json()
    if op in CONTROLS:
        control = getattr(sched, op, None)
        if control is None:
            raise UsageError(f"the {sched.name} backend cannot {op} jobs")
        control(job_id)
        return {CONTROLS[op]: job_id}
    if op == "usage":                       # the job page's charts (sched/usage.py)
        return sched.usage(job_id)
    if op == "logs":
        return log_tail(sched, job_id).to_dict()
    raise UsageError(f"unknown operation {op}")


def _submit_as_me(cfg: Any, sched: Any, spec: JobSpec, login: Any) -> str:
    """Pin the image as this user (with the portal's short-lived token for it, if any), then submit."""
    from nagaya.image.resolve import pin as pin_image

    with tempfile.TemporaryDirectory(prefix="nagaya-portal-") as tmp:
        if isinstance(login, dict):
            # A short-lived personal token minted by the portal: pulls the image as this user, then gone.
            from nagaya.client import authfile

            try:
                who = PullLogin(**{k: str(login[k]) for k in ("registry", "server", "username", "secret")})
            except KeyError:
                raise UsageError("malformed pull login") from None
            basic = base64.b64encode(f"{who.username}:{who.secret}".encode()).decode()
            data: dict[str, Any] = {"auths": {who.registry: {"auth": basic}}, "nagaya": {}}
            path = Path(tmp) / "auth.json"
            authfile.save(data, path)
            os.environ["NAGAYA_AUTH_FILE"] = str(path)
        spec.ref, spec.digest = pin_image(cfg, spec.image)
        spec.user = pwd.getpwuid(os.getuid()).pw_name
        return sched.submit(spec)


def _op_main() -> int:
    req = json.loads(sys.stdin.read())
    try:
        out: dict[str, Any] = {"result": _user_op(req["op"], req.get("args") or {})}
    except NagayaError as e:
        out = {"error": e.message, "kind": type(e).__name__}
    except ImportError as e:
        out = {"error": f"the scheduler is not installed on this site: {e}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["op"]:
        sys.exit(_op_main())
    if len(sys.argv) >= 3 and sys.argv[1] == "dispatch":
        dispatch(Path(sys.argv[2]), *(sys.argv[3:4]))
        sys.exit(0)
    sys.stderr.write("usage: python -m nagaya.server.jobs dispatch SPOOL [SERVICE_ACCOUNT]\n")
    sys.exit(2)
