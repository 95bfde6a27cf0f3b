"""The portal's terminal into a running job: `nagaya job shell JOB` run AS THE USER on a host-side pty, its
bytes carried between the browser's websocket and the pty, with the server never holding the user's process.

Who does what:
- the server (service account) checks the login owns the job (a `status` call as the user: anyone else's is
  NotFound, like a missing one) and asks the root dispatcher for a terminal (op `terminal`, through the spool);
- the dispatcher (root, jobs.py) makes a one-use unix socket SPOOL/terms/ID.sock (root:SERVICE 0660, in a
  root:SERVICE 0750 directory that nobody else may enter), replies with its name and a one-use secret, and
  waits `ACCEPT_TIMEOUT` for the server: the peer must be the service account (SO_PEERCRED) and send the
  secret first. Only then it opens a pty (its slave the user's, as login(1) does) and starts, as the user, in
  a new session whose controlling terminal is that pty: `setpriv` to the user's uid/gids, a clean
  environment, `python -I -m nagaya.server.job_terminal user JOB` -> sched/interactive.exec_in_job (the same
  code as `nagaya job shell`: on Slurm an overlapping `srun --pty` step of the job, never ssh);
- it relays bytes until either side ends, then hangs the session up (SIGHUP to every process of the session,
  SIGKILL to what is left after a grace period): nothing it started outlives the websocket.

Wire format server -> dispatcher: frames of 1 type byte + 4-byte big-endian length + payload: b"d" keystrokes,
b"r" a resize (rows, cols as two big-endian 16-bit numbers). Dispatcher -> server: the pty's raw output."""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import re
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

from nagaya import safefs
from nagaya.errors import NagayaError, UsageError
from nagaya.sched.onbehalf import PerUser, user_env

ACCEPT_TIMEOUT = 20.0          # seconds the dispatcher waits for the server to connect, then gives up
HANGUP_GRACE = 3.0             # seconds between SIGHUP and SIGKILL for what the terminal started
USER_TERMS = 4                 # one user's open terminals
MAX_TERMS = 64                 # all users' open terminals
USER_RELAYS = 16               # one user's connections to apps on other nodes (a browser opens several)
MAX_RELAYS = 128
FRAME_MAX = 1 << 20
PENDING_MAX = 1 << 20           # keystrokes the terminal has not read yet
JOB_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"]


def check_args(args: dict[str, Any]) -> None:
    """The dispatcher's check of a terminal request: a job id of the plain form, a sane window size."""
    if not isinstance(args.get("job_id"), str) or not JOB_RE.match(args["job_id"]):
        raise UsageError("malformed job id")
    for k in ("rows", "cols"):
        v = args.get(k, 24 if k == "rows" else 80)
        if not isinstance(v, int) or not 1 <= v <= 1000:
            raise UsageError(f"malformed terminal {k}")


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def resize_frame(rows: int, cols: int) -> bytes:
    return frame(b"r", struct.pack(">HH", max(1, min(rows, 1000)), max(1, min(cols, 1000))))


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# ---- the dispatcher's side (root) ------------------------------------------------------------------------

class Terminals:
    """The dispatcher's open terminals: one directory fd, the caps, a thread per terminal."""

    def __init__(self, spool_fd: int, spool: Path, svc_uid: int, svc_gid: int) -> None:
        self.svc_uid, self.svc_gid = svc_uid, svc_gid
        self.fd = safefs.mkdir_at(spool_fd, "terms", 0o750, 0, svc_gid, owners=(0,))
        self.path = spool / "terms"
        for name in os.listdir(self.fd):                 # a previous dispatcher's leftovers
            safefs.remove_at(self.fd, name)
        self.open = PerUser(USER_TERMS, MAX_TERMS)
        self.relays = PerUser(USER_RELAYS, MAX_RELAYS)      # app relays (server/app_relay.py): counted apart

    def start(self, pw: pwd.struct_passwd, args: dict[str, Any], run: Any = None) -> dict[str, Any]:
        """Listen on a fresh socket for the server; returns the reply (its name and the secret). `run`: what
        serves the connection instead of a terminal (an app relay: server/app_relay.py, its own caps, and no
        secret, since the server's HTTP client connects by path; the peer check and one use stay)."""
        if run is None:
            check_args(args)
        counts = self.open if run is None else self.relays
        if not counts.acquire(pw.pw_name):
            what = "terminals" if run is None else "app connections"
            return {"error": f"you have {counts.limit} {what} open already; close one first", "kind": "JobsBusy"}
        name, secret = f"{secrets.token_hex(16)}.sock", secrets.token_hex(32) if run is None else ""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # bind through our own fd of the directory (root's, 0750): nothing on the way can be swapped
            srv.bind(f"/proc/self/fd/{self.fd}/{name}")
            os.chown(name, 0, self.svc_gid, dir_fd=self.fd, follow_symlinks=False)
            os.chmod(f"/proc/self/fd/{self.fd}/{name}", 0o660)
            srv.listen(1)
        except OSError as e:
            srv.close()
            safefs.remove_at(self.fd, name)
            counts.release(pw.pw_name)
            return {"error": f"cannot open a terminal: {e}"}
        threading.Thread(target=self._serve, args=(srv, name, secret, pw, args, run), daemon=True,
                         name=f"nagaya-term-{pw.pw_name}").start()
        return {"result": {"socket": name, "secret": secret}}

    def _serve(self, srv: socket.socket, name: str, secret: str, pw: pwd.struct_passwd,
               args: dict[str, Any], run: Any = None) -> None:
        conn = None
        try:
            srv.settimeout(ACCEPT_TIMEOUT)
            try:
                conn, _ = srv.accept()
            except OSError:
                return                                   # the server never came
            finally:
                srv.close()
                safefs.remove_at(self.fd, name)          # one use: nobody else connects after it
            conn.settimeout(ACCEPT_TIMEOUT)
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            got = b""
            while secret and len(got) < len(secret) + 1 and not got.endswith(b"\n"):
                chunk = conn.recv(len(secret) + 1 - len(got))
                if not chunk:
                    break
                got += chunk
            if uid != self.svc_uid or (secret and not secrets.compare_digest(got, secret.encode() + b"\n")):
                sys.stderr.write(f"nagaya jobs dispatcher: terminal {name}: refused a peer (uid {uid})\n")
                return
            conn.settimeout(None)
            if run is not None:
                run(conn, pw, args)
            else:
                run_terminal(conn, pw, str(args["job_id"]), int(args.get("rows", 24)), int(args.get("cols", 80)))
        except Exception as e:                           # one terminal's failure never stops the dispatcher
            sys.stderr.write(f"nagaya jobs dispatcher: terminal {name}: {e}\n")
        finally:
            if conn is not None:
                conn.close()
            (self.open if run is None else self.relays).release(pw.pw_name)


def run_terminal(conn: socket.socket, pw: pwd.struct_passwd, job: str, rows: int, cols: int) -> None:
    """(root) The user's `job shell` on a fresh pty, relayed to `conn` until either ends; then the whole
    session is hung up and killed."""
    master, slave = os.openpty()
    try:
        try:
            tty_gid = grp.getgrnam("tty").gr_gid
        except KeyError:
            tty_gid = pw.pw_gid
        os.fchown(slave, pw.pw_uid, tty_gid)            # the user's terminal, as login(1) makes it
        os.fchmod(slave, 0o620)
        _set_size(master, rows, cols)
        argv = ["setsid", "--ctty", "setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                "--", sys.executable, "-I", "-m", "nagaya.server.job_terminal", "user", job]
        # Not a process group leader when it starts, so setsid(1) makes the session in place (no fork): the
        # child's pid is the session's id, and every process the terminal starts is in that session.
        env = user_env(pw, TERM="xterm-256color", SHELL=pw.pw_shell or "/bin/sh")
        p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd="/",
                             close_fds=True)
    finally:
        os.close(slave)
    try:
        _relay(conn, master)
    finally:
        os.close(master)
        hang_up(p.pid)
        try:
            p.wait(HANGUP_GRACE)
        except subprocess.TimeoutExpired:
            pass


def _relay(conn: socket.socket, master: int) -> None:
    """Bytes both ways until either side ends. Keystrokes go to the pty without blocking: a shell that reads
    none (while its own output is not read) never wedges this thread; past PENDING_MAX unread keystrokes the
    terminal is ended."""
    os.set_blocking(master, False)
    buf, pending = b"", b""
    with selectors.DefaultSelector() as sel:
        sel.register(conn, selectors.EVENT_READ)
        sel.register(master, selectors.EVENT_READ)
        while True:
            for key, events in sel.select():
                if key.fd == master:
                    if events & selectors.EVENT_WRITE and pending:
                        try:
                            pending = pending[os.write(master, pending):]
                        except BlockingIOError:
                            pass
                    if events & selectors.EVENT_READ:
                        try:
                            out = os.read(master, 65536)
                        except BlockingIOError:
                            out = None
                        except OSError as e:             # EIO: the last process of the terminal closed it
                            if e.errno != errno.EIO:
                                raise
                            out = b""
                        if out == b"":
                            return
                        if out:
                            conn.sendall(out)
                else:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return                           # the server closed: the browser went away
                    buf += chunk
                    while len(buf) >= 5:
                        n = struct.unpack(">I", buf[1:5])[0]
                        if n > FRAME_MAX:
                            return
                        if len(buf) < 5 + n:
                            break
                        kind, payload, buf = buf[:1], buf[5:5 + n], buf[5 + n:]
                        if kind == b"d":
                            pending += payload
                        elif kind == b"r" and n == 4:
                            _set_size(master, *struct.unpack(">HH", payload))
                    if len(pending) > PENDING_MAX:
                        return
                    if pending:
                        try:
                            pending = pending[os.write(master, pending):]
                        except BlockingIOError:
                            pass
                sel.modify(master, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0))


def session_members(sid: int) -> list[int]:
    """Every live process of session `sid` (as this /proc sees them: for the dispatcher, the host's numbering)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != b"Z":     # a zombie is gone already, only not reaped
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def hang_up(sid: int) -> None:
    """SIGHUP to every process of the terminal's session, SIGKILL to what is left after HANGUP_GRACE (again
    until none is left: a process may fork while it is being killed), for a few seconds at most."""
    def signal_all(sig: int) -> bool:
        members = session_members(sid)
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return bool(members)

    signal_all(signal.SIGHUP)
    deadline = time.monotonic() + HANGUP_GRACE
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    deadline = time.monotonic() + 5.0
    while signal_all(signal.SIGKILL) and time.monotonic() < deadline:
        time.sleep(0.05)


# ---- the user's side (as the user, on the pty) ------------------------------------------------------------

def _user_main(job: str) -> int:
    from nagaya.config import load
    from nagaya.sched.interactive import ExecRequest, exec_in_job

    if not JOB_RE.match(job):
        sys.stderr.write("nagaya: malformed job id\n")
        return 2
    try:
        return exec_in_job(load(), ExecRequest(job, list(SHELL), interactive=True, tty=True))
    except NagayaError as e:
        sys.stderr.write(f"nagaya: {e.message}\r\n")
        time.sleep(0.5)                                  # let the relay carry the message before the hangup
        return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["user"] and len(sys.argv) == 3:
        sys.exit(_user_main(sys.argv[2]))
    sys.stderr.write("usage: python -m nagaya.server.job_terminal user JOB\n")
    sys.exit(2)

