"""Builds as batch jobs: the parts the root dispatcher and the user's side of it run (jobs.py), as app_launch.py
is for apps.

An uploaded context reaches the user without the server unpacking it, and without a place other users can
list: the server writes the bytes to `STATE_DIR-builds/NAME` (NAME: 128 random bits; the directory is
root:SERVICE_GROUP 0771, so users may pass through it but not list it), the user's side of the `build_submit`
operation copies them (checking the server's sha256) into the user's own build directory
(build/remote.py: ~/.local/share/nagaya/builds/ID/, 0700), and the server removes its copy when the operation
returns. Unpacking happens later, in the job, as the user, by `safe_extract`. Git URLs are fetched by the job,
as the user. No user code here."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from nagaya import safefs
from nagaya.build.remote import BUILD_ID_RE, Recipe, builds_home, check_recipe, recipe_json
from nagaya.errors import UsageError
from nagaya.sched.onbehalf import spec_from_wire

UPLOAD_RE = re.compile(r"^[0-9a-f]{32}\.ctx$")


def uploads_root(state_dir: Path) -> Path:
    return state_dir.parent / f"{state_dir.name}-builds"


def open_uploads(path: Path) -> int:
    """The directory fd of STATE_DIR-builds: root's, reached without links, writable by no one but root and its
    group (the service account's); an O_PATH fd (safefs.open_dir refuses group-writable directories)."""
    pfd = safefs.open_dir(path.parent)
    try:
        # O_PATH: users may pass through (x), not read (r), so a plain open of the directory would fail.
        fd = os.open(path.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    finally:
        os.close(pfd)
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o002:
        os.close(fd)
        raise safefs.UnsafePath(f"{path} is not root's, or is writable by every account")
    return fd


def check_build_args(args: dict[str, Any]) -> Recipe:
    """The dispatcher's check of a build request (its job spec is checked by jobs.py: onbehalf.spec_from_wire)."""
    if not isinstance(args.get("recipe"), dict):
        raise UsageError("malformed build request")
    r = Recipe.from_json(args["recipe"])
    check_recipe(r)
    up, old = args.get("upload", ""), args.get("rebuild_of", "")
    if r.source == "upload":
        if not ((isinstance(up, str) and UPLOAD_RE.match(up) and not old)
                or (isinstance(old, str) and BUILD_ID_RE.match(old) and not up)):
            raise UsageError("an upload build needs the uploaded context or the build it repeats")
    elif up or old:
        raise UsageError("a git build takes no uploaded context")
    login = args.get("login")
    if not (isinstance(login, dict) and all(isinstance(login.get(k), str) for k in ("registry", "username", "secret"))):
        raise UsageError("malformed build login")
    return r


def _copy(src_fd: int, dfd: int, name: str, want: str) -> None:
    """Copy an open file into a fresh file of dfd, checking its sha256 against `want`."""
    h = hashlib.sha256()
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        while chunk := os.read(src_fd, 1 << 20):
            h.update(chunk)
            os.write(out, chunk)
    finally:
        os.close(out)
    if h.hexdigest() != want:
        raise UsageError("the uploaded context changed on its way (its sha256 differs); upload it again")


def prepare_build(args: dict[str, Any]) -> dict[str, Any]:
    """(as the user) The build's directory with its context, recipe and push token; returns the job spec."""
    from nagaya.client import authfile

    r = check_build_args(args)
    uid = os.getuid()
    home = builds_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    hfd = safefs.open_dir(home, (uid,))
    try:
        os.mkdir(r.id, 0o700, dir_fd=hfd)                        # a fresh directory, never an existing one
        dfd = safefs.open_dir_at(hfd, r.id, (uid,))
        ok = False
        try:
            if r.source == "upload":
                if args.get("upload"):
                    ufd = open_uploads(Path(str(args["upload_dir"])))
                    try:
                        src = safefs.open_at(ufd, str(args["upload"]), owners=(int(args["upload_uid"]),))
                    finally:
                        os.close(ufd)
                else:                                            # a rebuild: the context the old build kept
                    ofd = safefs.open_dir_at(hfd, str(args["rebuild_of"]), (uid,))
                    try:
                        src = safefs.open_at(ofd, r.archive, owners=(uid,))
                    except FileNotFoundError:
                        raise UsageError("the context of that build is no longer kept in your build directory") \
                            from None
                    finally:
                        os.close(ofd)
                try:
                    _copy(src, dfd, r.archive, r.sha256)
                finally:
                    os.close(src)
            safefs.write_at(dfd, "recipe.json", recipe_json(r), 0o600)
            ok = True
        finally:
            if not ok:                                           # nothing half-written: the directory goes
                for name in os.listdir(dfd):
                    safefs.remove_at(dfd, name)
                os.rmdir(r.id, dir_fd=hfd)
            os.close(dfd)
    finally:
        os.close(hfd)
    d = home / r.id
    login = args["login"]
    import base64

    basic = base64.b64encode(f"{login['username']}:{login['secret']}".encode()).decode()
    authfile.save({"auths": {login["registry"]: {"auth": basic}}, "nagaya": {}}, d / "auth.json")
    # The server's spec, checked again here (onbehalf.spec_from_wire); of it only what sizes the job is kept.
    wire = spec_from_wire(args.get("spec"))
    spec: dict[str, Any] = {"name": wire.name, "cpus": wire.cpus, "mem": wire.mem, "time_limit": wire.time_limit}
    # buildah needs a PATH (newuidmap) and HOME: the dispatcher's clean environment for this user, nothing more.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "USER", "LOGNAME", "LANG") if k in os.environ}
    spec.update(image=f"(build) {r.tag}", ref="", digest="", command=[], build=str(d / "recipe.json"),
                cwd=str(d), user="", env=env)
    return spec


def make_uploads_dir(state_dir: Path, service_gid: int) -> Path:
    """(root, the dispatcher) STATE_DIR-builds as root:SERVICE_GROUP 0771: the server writes uploads there,
    users pass through to the one named in their request, nobody but root and the server lists it. A site
    where it cannot be made still runs jobs; a build then answers why it cannot."""
    path = uploads_root(state_dir)
    try:
        pfd = safefs.open_dir(path.parent)
        try:
            os.close(safefs.mkdir_at(pfd, path.name, 0o771, 0, service_gid, owners=(0,)))
        finally:
            os.close(pfd)
    except (OSError, safefs.UnsafePath) as e:
        import sys

        sys.stderr.write(f"nagaya jobs dispatcher: {path}: {e} (builds from uploads are off)\n")
    return path


def submit_build_as_me(sched: Any, args: dict[str, Any]) -> dict[str, str]:
    """(as the user) The build job: its directory prepared, then submitted to the user's own backend."""
    import pwd

    from nagaya.sched.models import JobSpec

    spec = prepare_build(args)
    spec["user"] = pwd.getpwuid(os.getuid()).pw_name
    return {"id": str(sched.submit(JobSpec(**spec)))}
