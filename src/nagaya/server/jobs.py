"""Jobs from the portal, run AS THE USER, never in the server process.

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
request, only `nagaya.sched` calls with typed arguments.

Layout: SPOOL/requests/ID.json (written by the server, atomically), SPOOL/replies/ID.json (by the
dispatcher). SPOOL is root:SERVICE 0750, both subdirectories 0770.

The other gateway, for sites whose scheduler is Slurm, needs no root part at all: slurmrest.py submits
through slurmrestd with a short-lived JWT per user (`[sched] portal_submit = "slurmrestd"`).
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
from pathlib import Path
from typing import Any, Protocol

from nagaya import safefs
from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError

OPS = ("submit", "list", "status", "cancel", "logs")
UID_MIN = 1000
NOBODY = (65534, 4294967294)             # the overflow ids (nobody, nfsnobody): above UID_MIN, yet no one's
# Seconds, not minutes: a server thread waits this long at most, whatever the user's files or processes do.
OP_TIMEOUT = 15.0                        # the user's operation, then its whole process group is killed
REPLY_TIMEOUT = OP_TIMEOUT + 5.0         # the server's wait for a reply (the dispatcher may queue it briefly)
USER_OPS = 4                             # one user's operations in flight: per server process, and in the dispatcher
MAX_OPS = 32                             # all users' operations in flight in the dispatcher
REQUEST_MAX = 64 * 1024                  # bytes of a request file (a job spec, a login token)
OUTPUT_MAX = 8 << 20                     # bytes the dispatcher reads of an operation's output
LOG_TAIL = 64 * 1024
_RID = re.compile(r"^[0-9a-f]{32}$")
_SPEC_FIELDS = {"image": str, "ref": str, "digest": str, "command": list, "nodes": int, "ntasks": int, "cpus": int,
                "mem": str, "gpus": str, "time_limit": int, "name": str}


class JobsUnavailable(NagayaError):
    """No job service on this site (no dispatcher running, or no scheduler backend)."""


class JobsBusy(NagayaError):
    """Too many of this user's job operations in flight (HTTP 429): answered at once, never queued."""


BUSY = "too many of your job operations are in flight; wait for them to finish and try again"
_KINDS: dict[str, type[NagayaError]] = {"NotFound": NotFound, "PermissionDenied": PermissionDenied,
                                        "Conflict": Conflict, "JobsBusy": JobsBusy,
                                        "JobsUnavailable": JobsUnavailable}


class JobGateway(Protocol):
    """What the portal needs of a scheduler, always on behalf of one named user."""

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any: ...


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


class BoundedGateway:
    """Any gateway with a per-user cap: a user's (USER_OPS + 1)th operation in flight is refused at once
    with JobsBusy, so one user's slow or hostile operations hold at most USER_OPS threads of the job pool."""

    def __init__(self, inner: JobGateway, per_user: int = USER_OPS) -> None:
        self.inner = inner
        self.flight = PerUser(per_user)

    def __getattr__(self, name: str) -> Any:          # available(), pull_token_hours, ... of the inner one
        return getattr(self.inner, name)

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any:
        if not self.flight.acquire(user):
            raise JobsBusy(BUSY)
        try:
            return self.inner.call(user, op, args)
        finally:
            self.flight.release(user)


class SpoolGateway:
    """The server's side of the spool: write a request, wait for its reply."""

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


# ---- the dispatcher (root) -------------------------------------------------------------------------------
#
# The spool's directories are writable by the service account, so everything the dispatcher does in them
# goes through safefs, relative to directory fds it opened once: requests are read O_NOFOLLOW|O_NONBLOCK,
# only regular single-link files of the service account's, size-capped, then unlinked (unlinkat); replies
# are fresh O_EXCL temp files renamed into place. A link or FIFO planted by the service account is refused
# or replaced, never followed. Operations are capped per user and in total, and killed (their whole
# process group) after OP_TIMEOUT.

def target_user(user: str, service_account: str) -> pwd.struct_passwd:
    """The account a job runs as: a real user, never root, a system account or the service account."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PermissionDenied(f"no such user {user}") from None
    if pw.pw_uid < UID_MIN or pw.pw_uid in NOBODY or user == service_account:
        raise PermissionDenied(f"jobs are not run for {user}")
    return pw


def _check(req: dict[str, Any], service_account: str) -> tuple[pwd.struct_passwd, str, dict[str, Any]]:
    op, user, args = req.get("op"), req.get("user"), req.get("args")
    if op not in OPS or not isinstance(user, str) or not isinstance(args, dict):
        raise PermissionDenied("malformed request")
    pw = target_user(user, service_account)
    if op == "submit":
        spec = args.get("spec")
        if not isinstance(spec, dict) or set(spec) - set(_SPEC_FIELDS):
            raise UsageError("malformed job spec")
        for k, v in spec.items():
            if not isinstance(v, _SPEC_FIELDS[k]) or (k == "command" and not all(isinstance(x, str) for x in v)):
                raise UsageError(f"malformed job spec field {k}")
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
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "LANG": "C.UTF-8",
           "PATH": "/usr/local/bin:/usr/bin:/bin"}
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
        # STATE_DIR belongs to the service account: open it (and everything above) without following links,
        # then create or open jobs-spool in it, refusing one that the service account made or swapped in.
        sfd = safefs.open_dir(spool.parent, (self.svc_uid,))
        try:
            self.spool = safefs.mkdir_at(sfd, spool.name, 0o750, 0, self.gid, owners=(0,))
        finally:
            os.close(sfd)
        self.requests = safefs.mkdir_at(self.spool, "requests", 0o770, 0, self.gid, owners=(0,))
        self.replies = safefs.mkdir_at(self.spool, "replies", 0o770, 0, self.gid, owners=(0,))

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
        if not self.flight.acquire(pw.pw_name):
            self.reply(rid, {"error": BUSY, "kind": "JobsBusy"})
            return

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
    from nagaya.config import load
    from nagaya.sched import JobSpec, get_scheduler, pin_image

    cfg = load()
    sched = get_scheduler(cfg)
    if op == "list":
        return [j.to_json() for j in sched.list()]
    if op == "submit":
        spec = dict(args["spec"])
        with tempfile.TemporaryDirectory(prefix="nagaya-portal-") as tmp:
            login = args.get("login")
            if isinstance(login, dict):
                # A short-lived personal token minted by the portal: pulls the image as this user, then gone.
                from nagaya.client import authfile

                basic = base64.b64encode(f"{login['username']}:{login['secret']}".encode()).decode()
                data: dict[str, Any] = {"auths": {login["registry"]: {"auth": basic}}, "nagaya": {}}
                path = Path(tmp) / "auth.json"
                authfile.save(data, path)
                os.environ["NAGAYA_AUTH_FILE"] = str(path)
            ref, digest = pin_image(cfg, spec["image"])
            spec.update(ref=ref, digest=digest, user=pwd.getpwuid(os.getuid()).pw_name, cwd=os.path.expanduser("~"))
            return {"id": sched.submit(JobSpec(**spec))}
    job_id = str(args["job_id"])
    if op == "status":
        return sched.status(job_id).to_json()
    if op == "cancel":
        sched.cancel(job_id)
        return {"cancelled": job_id}
    if op == "logs":
        sched.status(job_id)                # NotFound for someone else's (or no) job
        data = b"".join(sched.logs(job_id, follow=False))
        return {"log": data[-LOG_TAIL:].decode(errors="replace"), "truncated": len(data) > LOG_TAIL}
    raise UsageError(f"unknown operation {op}")


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
