"""The way to an interactive app on another node than the portal's (a Slurm job on a compute node): a unix
socket does not cross hosts, so each connection of the portal's proxy to such an app goes through the
scheduler, as the app's owner, and never through an open port.

- the server (service account) asks the root dispatcher for a relay (op `app_relay`: the session, its job and
  node); the dispatcher makes a one-use socket beside the terminals' (server/job_terminal.py: root:SERVICE
  0750 directory, SO_PEERCRED = the service account, removed at the first connection or after 20 s) and the
  server's HTTP client or websocket connects to it by path, as it would to the app's own socket;
- the dispatcher then starts, as the user (`setpriv`, a clean environment, a new session), `python -I -m
  nagaya.server.app_relay via JOB NODE DIR` on a socket pair: the job is asked for as the user (someone
  else's: not found), and on Slurm the relay becomes an overlapping step of that job on that node (`srun
  --overlap --jobid J --nodelist N`: inside the job's allocation, never ssh);
- on the node, `app_relay node DIR` opens the session's socket as the session's owner (no-follow, a socket of
  their own, as the portal does on its host) and copies bytes between it and the step's stdin/stdout.

Each connection costs a step launch (a fraction of a second): fine for an app's pages and websockets, not a
bulk-transfer path. DIR is the dispatcher's choice (STATE_DIR-apps/USER/SESSION), never the request's; the app
directory must be where the job's node sees it (a shared file system, as the job's working directory is)."""

from __future__ import annotations

import os
import pwd
import re
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Any

from nagaya import safefs
from nagaya.errors import NagayaError, UsageError
from nagaya.sched.onbehalf import user_env
from nagaya.server.app_launch import SESSION_RE
from nagaya.server.job_terminal import JOB_RE

NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
IDLE = 3600.0                   # seconds a relay with no traffic in either direction lives, then it ends
HALF_CLOSED = 30.0              # seconds it waits for the app's answer once the portal stopped sending


def check_relay_args(args: dict[str, Any]) -> None:
    """The dispatcher's check of a relay request: a session id, a job id and a node name of plain forms."""
    if not isinstance(args.get("session"), str) or not SESSION_RE.match(args["session"]):
        raise UsageError("malformed app session id")
    if not isinstance(args.get("job_id"), str) or not JOB_RE.match(args["job_id"]):
        raise UsageError("malformed job id")
    if not isinstance(args.get("node"), str) or not NODE_RE.match(args["node"]):
        raise UsageError("malformed node name")


def is_here(node: str) -> bool:
    return node in ("", "localhost", socket.gethostname(), os.uname().nodename)


class End:
    """One side of a relay: a socket, or a pair of fds (a step's stdin and stdout)."""

    def __init__(self, sock: socket.socket | None = None, rfd: int = -1, wfd: int = -1) -> None:
        self.sock, self.rfd, self.wfd = sock, rfd, wfd
        if sock is not None:
            self.rfd = self.wfd = sock.fileno()

    def read(self) -> bytes:
        try:
            return self.sock.recv(65536) if self.sock is not None else os.read(self.rfd, 65536)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
            return
        while data:
            data = data[os.write(self.wfd, data):]

    def close_write(self) -> None:
        try:
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_WR)
            elif self.wfd >= 0:
                os.close(self.wfd)
                self.wfd = -1
        except OSError:
            pass


def copy(a: End, b: End, idle: float = IDLE) -> None:
    """Bytes between a and b until b ends (or nothing moves for `idle` seconds); a's end is passed on to b as
    a half-close, then b's answer is awaited HALF_CLOSED seconds at most."""
    deadline = time.monotonic() + idle
    with selectors.DefaultSelector() as sel:
        sel.register(a.rfd, selectors.EVENT_READ, a)
        sel.register(b.rfd, selectors.EVENT_READ, b)
        a_open = True
        while time.monotonic() < deadline:
            for key, _ in sel.select(max(0.1, deadline - time.monotonic())):
                src: End = key.data
                dst = b if src is a else a
                data = src.read()
                if data:
                    dst.write(data)
                    deadline = time.monotonic() + (idle if a_open else HALF_CLOSED)
                    continue
                if src is b:
                    return                                 # the far end is done
                a_open = False
                sel.unregister(a.rfd)
                b.close_write()
                deadline = time.monotonic() + HALF_CLOSED


# ---- the dispatcher's side (root) --------------------------------------------------------------------------

def run_relay(conn: socket.socket, pw: pwd.struct_passwd, args: dict[str, Any]) -> None:
    """(root) The user's relay on a socket pair, bytes copied to and from `conn`; then its process group is
    killed: nothing it started outlives the connection."""
    ours, theirs = socket.socketpair()
    argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--", sys.executable, "-I",
            "-m", "nagaya.server.app_relay", "via", str(args["job_id"]), str(args["node"]), str(args["dir"])]
    try:
        p = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL, env=user_env(pw),
                             cwd="/", close_fds=True, start_new_session=True)
    finally:
        theirs.close()
    try:
        copy(End(conn), End(ours))
    finally:
        ours.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                p.wait(2)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass


# ---- the user's side --------------------------------------------------------------------------------------

def via_main(job: str, node: str, d: str) -> int:
    """(as the user, on the dispatcher's host) To the session's socket on the job's node, through the
    scheduler: an overlapping step of the job on that node (Slurm), or straight here."""
    from nagaya.config import load
    from nagaya.sched import get_scheduler

    if not (JOB_RE.match(job) and NODE_RE.match(node)):
        raise UsageError("malformed relay request")
    cfg = load()
    sched = get_scheduler(cfg)
    info = sched.status(job)                     # the caller's own job, or not found
    if info.state != "RUNNING":
        raise UsageError(f"job {job} is not running ({info.state})")
    inner = [sys.executable, "-I", "-m", "nagaya.server.app_relay", "node", d]
    if is_here(node):
        return node_main(d)
    if sched.name != "slurm":
        raise UsageError(f"apps on other nodes are reached through Slurm, not {sched.name}")
    srun = sched._bin("srun")                    # type: ignore[attr-defined]
    os.execv(srun, [srun, "--overlap", f"--jobid={info.id}", f"--nodelist={node}", "--nodes=1", "--ntasks=1",
                    "--quiet", *inner])
    return 0                                     # not reached


def node_main(d: str) -> int:
    """(as the user, on the app's node) The session's socket, opened as the portal opens it on its host: the
    directory and the socket the caller's own, no link followed; then stdin/stdout to and from it."""
    me = os.getuid()
    dfd = safefs.open_dir(d, (me,))
    try:
        sfd = os.open("sock", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        st = os.fstat(sfd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != me:
            raise UsageError("the session's socket is not its owner's")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(f"/proc/self/fd/{sfd}")
    finally:
        os.close(sfd)
    with s:
        copy(End(rfd=0, wfd=1), End(s))
    return 0


def _main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["via"] and len(argv) == 4:
            return via_main(*argv[1:])
        if argv[:1] == ["node"] and len(argv) == 2:
            return node_main(argv[1])
    except (NagayaError, OSError) as e:
        sys.stderr.write(f"nagaya app relay: {getattr(e, 'message', e)}\n")
        return 1
    sys.stderr.write("usage: python -m nagaya.server.app_relay via JOB NODE DIR | node DIR\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
