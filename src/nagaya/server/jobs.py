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
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError

OPS = ("submit", "list", "status", "cancel", "logs")
UID_MIN = 1000
NOBODY = (65534, 4294967294)             # the overflow ids (nobody, nfsnobody): above UID_MIN, yet no one's
REPLY_TIMEOUT = 120.0
OP_TIMEOUT = 110.0
LOG_TAIL = 64 * 1024
_SPEC_FIELDS = {"image": str, "ref": str, "digest": str, "command": list, "nodes": int, "ntasks": int, "cpus": int,
                "mem": str, "gpus": str, "time_limit": int, "name": str}


class JobsUnavailable(NagayaError):
    """No job service on this site (no dispatcher running, or no scheduler backend)."""


class JobGateway(Protocol):
    """What the portal needs of a scheduler, always on behalf of one named user."""

    def call(self, user: str, op: str, args: dict[str, Any]) -> Any: ...


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
                raise JobsUnavailable("the job service did not answer in time")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        try:
            data = json.loads(reply.read_text())
        finally:
            reply.unlink(missing_ok=True)
        if "error" in data:
            kinds = {"NotFound": NotFound, "PermissionDenied": PermissionDenied, "Conflict": Conflict}
            kind = kinds.get(data.get("kind", ""), UsageError)
            raise kind(str(data["error"]))
        return data.get("result")


# ---- the dispatcher (root) -------------------------------------------------------------------------------

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


def _run_as(pw: pwd.struct_passwd, op: str, args: dict[str, Any]) -> dict[str, Any]:
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "LANG": "C.UTF-8",
           "PATH": "/usr/local/bin:/usr/bin:/bin"}
    argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--",
            sys.executable, "-I", "-m", "nagaya.server.jobs", "op"]
    try:
        r = subprocess.run(argv, input=json.dumps({"op": op, "args": args}), capture_output=True, text=True,
                           env=env, cwd=pw.pw_dir if os.path.isdir(pw.pw_dir) else "/", timeout=OP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": "the scheduler did not answer in time"}
    try:
        out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        return out
    except (ValueError, IndexError):
        return {"error": (r.stderr.strip().splitlines() or ["the job operation failed"])[-1][:500]}


def _handle(path: Path, replies: Path, service_account: str, gid: int) -> None:
    try:
        req = json.loads(path.read_text())
        rid = str(req.get("id", ""))
        if not rid.isalnum():
            return
        try:
            pw, op, args = _check(req, service_account)
            out = _run_as(pw, op, args)
        except NagayaError as e:
            out = {"error": e.message, "kind": type(e).__name__}
        tmp = replies / f".{rid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        os.fchown(fd, 0, gid)
        with os.fdopen(fd, "w") as f:
            json.dump(out, f)
        os.replace(tmp, replies / f"{rid}.json")
    except (OSError, ValueError) as e:
        sys.stderr.write(f"nagaya jobs dispatcher: {path.name}: {e}\n")
    finally:
        path.unlink(missing_ok=True)


def dispatch(spool: Path, service_account: str = "nagaya") -> None:
    """Serve requests until killed. Run as root; creates the spool with the modes above."""
    import grp

    if os.geteuid() != 0:
        raise SystemExit("nagaya jobs dispatcher: run as root (it starts job operations as each user)")
    gid = grp.getgrnam(service_account).gr_gid
    spool.mkdir(parents=True, exist_ok=True)
    os.chown(spool, 0, gid)
    spool.chmod(0o750)
    reqs, replies = spool / "requests", spool / "replies"
    for d in (reqs, replies):
        d.mkdir(exist_ok=True)
        os.chown(d, 0, gid)
        d.chmod(0o770)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))       # so the pid file goes with us
    (spool / "dispatcher.pid").write_text(f"{os.getpid()}\n")
    (spool / "dispatcher.pid").chmod(0o644)
    busy: set[str] = set()
    try:
        while True:
            for p in sorted(reqs.glob("*.json")):
                if p.name in busy:
                    continue
                busy.add(p.name)

                def work(p: Path = p) -> None:
                    try:
                        _handle(p, replies, service_account, gid)
                    finally:
                        busy.discard(p.name)
                threading.Thread(target=work, daemon=True).start()
            time.sleep(0.05)
    finally:
        (spool / "dispatcher.pid").unlink(missing_ok=True)


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
