"""Interactive apps as batch jobs: the parts the root dispatcher and the user's side of it run (jobs.py).

An app session lives in STATE_DIR-apps/USER/SESSION/ (beside the state directory, which users may not
enter): `STATE_DIR-apps/` is root's (0755), `USER/` is made by the
dispatcher as USER:SERVICE_GROUP 02750 (only the user and the portal's service account may enter it; the
setgid bit gives what the app creates there the service group), `SESSION/` is made by the user's side.
The app serves HTTP on the unix socket `SESSION/sock` (mode 0660 through the launcher's umask), never on a
TCP port: no other user on the node can reach it. Jupyter also demands a per-session token, which only the
portal's proxy sends (read by the launcher from a 0600 file into Jupyter's environment, never its argv).

No user code here: the launcher is a fixed script written as the user and run inside the user's own image,
pinned to its digest, by the user's scheduler backend like any job."""

from __future__ import annotations

import os
import pwd
import re
import shlex
from pathlib import Path
from typing import Any

from nagaya import safefs
from nagaya.errors import UsageError
from nagaya.record import Record
from nagaya.sched.models import JobSpec

KINDS = ("jupyter", "web", "terminal")
SESSION_RE = re.compile(r"^[0-9a-f]{32}$")
TOKEN_RE = re.compile(r"^[0-9a-f]{32,128}$")

# The socket path is "$d/sock": the launcher is the same file for every session, the directory its argument.
_JUPYTER = """#!/bin/sh
# nagaya interactive app: Jupyter on a unix socket, token from a private file (never on a command line)
umask 007
d="$1"; base="$2"
JUPYTER_TOKEN="$(cat "$d/token")"; export JUPYTER_TOKEN
rm -f "$d/sock"
set -- --no-browser --sock="$d/sock" --sock-mode=0660 --notebook-dir="$HOME"
if command -v jupyter-lab >/dev/null 2>&1; then
  exec jupyter-lab "$@" --ServerApp.base_url="$base" --ServerApp.allow_remote_access=True
elif python3 -c "import notebook.notebookapp" 2>/dev/null; then
  exec python3 -m notebook "$@" --NotebookApp.base_url="$base" --NotebookApp.allow_remote_access=True
elif python3 -c "import jupyter_server" 2>/dev/null; then
  exec python3 -m jupyter_server "$@" --ServerApp.base_url="$base" --ServerApp.allow_remote_access=True
fi
echo "nagaya: this image has no Jupyter (jupyter lab, notebook or server)" >&2
exit 127
"""
_TERMINAL = """#!/bin/sh
# nagaya web terminal: a shell on a pty over a websocket on the session's unix socket (app_files/term.py)
umask 007
d="$1"; base="$2"
rm -f "$d/sock"
command -v python3 >/dev/null 2>&1 || { echo "nagaya: the web terminal needs python3 in the image" >&2; exit 127; }
exec python3 -I "$d/term.py" "$d/sock" "$base"
"""
_WEB = """#!/bin/sh
# nagaya interactive app: the user's own command, told where to serve (a unix socket, never a port)
umask 007
d="$1"; shift 2
NAGAYA_APP_SOCKET="$d/sock"; export NAGAYA_APP_SOCKET
rm -f "$d/sock"
exec "$@"
"""


class AppRequest(Record):
    """What makes a job an interactive app (beside its JobSpec): the session, the app's kind, Jupyter's token.
    It travels to the dispatcher as plain fields of the request, checked there by check_app_args."""
    session: str
    kind: str
    token: str = ""

    def __repr__(self) -> str:                       # never the token in a log line or a traceback
        return f"AppRequest(session={self.session!r}, kind={self.kind!r})"


def apps_root(state_dir: Path) -> Path:
    return state_dir.parent / f"{state_dir.name}-apps"


def base_url(session: str) -> str:
    return f"/sessions/{session}/app/"


def check_app_args(args: dict[str, Any]) -> None:
    """The dispatcher's check of an app request (beyond the job spec's, which jobs.py checks)."""
    if not isinstance(args.get("session"), str) or not SESSION_RE.match(args["session"]):
        raise UsageError("malformed app session id")
    if args.get("kind") not in KINDS:
        raise UsageError("unknown app kind")
    if args["kind"] == "jupyter" and not (isinstance(args.get("token"), str) and TOKEN_RE.match(args["token"])):
        raise UsageError("malformed app token")


def user_app_dir(apps_fd: int, apps_path: Path, pw: pwd.struct_passwd, service_gid: int) -> Path:
    """(root) STATE_DIR/apps/USER as USER:SERVICE_GROUP 02750; one that is not the user's is refused."""
    fd = safefs.mkdir_at(apps_fd, pw.pw_name, 0o2750, pw.pw_uid, service_gid, owners=(0, pw.pw_uid))
    os.close(fd)
    return apps_path / pw.pw_name


def prepare_app(args: dict[str, Any], spec: JobSpec) -> JobSpec:
    """(as the user) SESSION/ with the launcher and the token; returns `spec` made to run the launcher."""
    check_app_args(args)
    base = Path(str(args["dir"]))
    sid, kind = str(args["session"]), str(args["kind"])
    dfd = safefs.open_dir(base, (0, os.getuid()))
    try:
        if os.fstat(dfd).st_uid != os.getuid():
            raise UsageError(f"{base} is not yours")
        # A fresh directory (never an existing one); no chmod after: the user is not in the service group, so a
        # chmod would drop the setgid bit it inherits from USER/ (and with it the group of the socket).
        os.mkdir(sid, 0o750, dir_fd=dfd)
        sfd = safefs.open_dir_at(dfd, sid, (os.getuid(),))
        try:
            launcher = {"jupyter": _JUPYTER, "web": _WEB, "terminal": _TERMINAL}[kind]
            safefs.write_at(sfd, "launch.sh", launcher.encode(), 0o700)
            if kind == "terminal":
                term = (Path(__file__).resolve().parent / "app_files" / "term.py").read_bytes()
                safefs.write_at(sfd, "term.py", term, 0o600)
            if kind == "jupyter":
                safefs.write_at(sfd, "token", str(args["token"]).encode(), 0o600)
        finally:
            os.close(sfd)
    finally:
        os.close(dfd)
    d = str(base / sid)
    spec.command = ["/bin/sh", f"{d}/launch.sh", d, base_url(sid), *spec.command]
    spec.cwd = d                         # the job's working directory: the runtime binds it into the container
    return spec


def describe(command: list[str]) -> str:
    return shlex.join(command)
