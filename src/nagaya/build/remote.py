"""Builds as batch jobs (the portal's Build page, /api/builds, `nagaya build --submit`): the parts that run AS
THE USER. The server never unpacks an archive nor runs git; it only checks a request and hands it on.

A build's directory is the user's own: $XDG_DATA_HOME/nagaya/builds/ID/ (0700) with
  recipe.json   what to build and where to push (written by the dispatcher's user-side operation),
  context.tar|context.zip   an uploaded context, kept (its sha256 in the recipe) so a rebuild is the same build,
  auth.json     a short-lived personal token for the push (0600; removed when the job ends),
  work/         the unpacked context or the git checkout (removed when the job ends).

The job runs `nagaya build --recipe recipe.json` on the batch host as the user: it unpacks the context with
`safe_extract` (regular files and directories only, no path outside, sizes capped) or clones the git URL with
only the site's protocols and no redirects, builds with buildah rootless, pushes, and prints one
`nagaya-build-result {json}` line last (the server reads it from the job's log)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nagaya.errors import NagayaError, UsageError

BUILD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
GIT_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
RESULT_MARK = "nagaya-build-result "
MAX_MEMBERS = 50_000
DEFAULT_SCHEMES = ("https",)
CONTEXT_NAMES = ("context.tar", "context.zip")


@dataclass
class Recipe:
    """What a build job builds and where it pushes: kept in the user's build directory, so rebuilds repeat it."""
    id: str
    tag: str                                     # HOST/PROJECT/NAME:TAG, pushed when built
    source: str                                  # upload | git
    file: str = ""                               # Dockerfile/definition file, relative to the context
    build_args: list[str] = field(default_factory=list)
    sha256: str = ""                             # upload: the archive's digest
    archive: str = ""                            # upload: context.tar or context.zip
    git_url: str = ""
    git_ref: str = ""                            # a branch or tag; empty: the default branch
    git_commit: str = ""                         # a rebuild: exactly this commit
    git_schemes: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEMES))
    max_bytes: int = 1 << 30                     # the unpacked context's size at most
    no_cache: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# ---- checks shared by the server (before submitting) and the job (before fetching) -------------------------

def check_relative(name: str, what: str = "path") -> str:
    """A relative path inside the context: no absolute path, no `..`, no control characters."""
    if not name or len(name) > 1024 or "\0" in name or any(ord(c) < 32 for c in name):
        raise UsageError(f"unsafe {what} {name[:80]!r}")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        raise UsageError(f"unsafe {what} {name[:80]!r}: it must stay inside the build context")
    return "/".join(parts)


def check_git_url(url: str, hosts: list[str], schemes: list[str]) -> str:
    """A git URL the site lets builds fetch: one of its schemes (https by default; never file, ssh or ext unless
    the site lists them) on one of its hosts (HOST or HOST:PORT as written in the URL), no credentials in it."""
    if not url or len(url) > 2000 or any(ord(c) < 33 for c in url) or url.startswith("-"):
        raise UsageError("malformed git URL")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        raise UsageError("malformed git URL") from None
    if u.scheme not in schemes or u.scheme in ("file", "ext", ""):
        raise UsageError(f"git URLs must use {' or '.join(schemes) or '(none allowed)'} on this site")
    if u.username or u.password or "@" in u.netloc:
        raise UsageError("a git URL must not hold credentials")
    host = (u.hostname or "").lower()
    where = f"{host}:{port}" if port else host
    if not host or (where not in hosts and host not in hosts):
        raise UsageError(f"this site does not build from {where or 'that host'} "
                         f"(allowed: {', '.join(hosts) or 'none'})")
    return url


def check_git_ref(ref: str) -> str:
    if ref and (not GIT_REF_RE.match(ref) or ".." in ref or ref.endswith((".lock", "/"))):
        raise UsageError(f"malformed git branch or tag {ref[:80]!r}")
    return ref


def check_recipe(r: Recipe) -> None:
    if not BUILD_ID_RE.match(r.id):
        raise UsageError("malformed build id")
    if r.source == "upload":
        if not SHA256_RE.match(r.sha256) or r.archive not in CONTEXT_NAMES:
            raise UsageError("malformed uploaded context")
    elif r.source == "git":
        if urlsplit(r.git_url).scheme not in r.git_schemes:
            raise UsageError("git URL scheme not allowed")
        check_git_ref(r.git_ref)
        if r.git_commit and not COMMIT_RE.match(r.git_commit):
            raise UsageError("malformed git commit")
    else:
        raise UsageError("a build's source is an upload or a git URL")
    if r.file:
        check_relative(r.file, "Dockerfile path")
    for a in r.build_args:
        if not isinstance(a, str) or "=" not in a or a.startswith("="):
            raise UsageError("build arguments are K=V")


# ---- the user's build directory ----------------------------------------------------------------------------

def builds_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "nagaya" / "builds"


def sha256_file(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def archive_kind(head: bytes) -> str:
    """context.zip for a zip file, context.tar for anything tarfile reads (plain, gzip, bzip2, xz)."""
    return "context.zip" if head.startswith(b"PK\x03\x04") else "context.tar"


# ---- safe extraction (as the user, inside the job) ---------------------------------------------------------

def _mkdirs(root_fd: int, parts: list[str]) -> int:
    """The directory fd of root/parts[0]/.../parts[-1], made as needed, never through a link."""
    fd = os.dup(root_fd)
    for p in parts:
        try:
            os.mkdir(p, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        try:
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError as e:
            os.close(fd)
            raise UsageError(f"the context has a file where a directory {p!r} should be") from e
        os.close(fd)
        fd = nfd
        os.fchmod(fd, 0o755)                # not the job's umask: COPY keeps these modes in the image
    return fd


def _write_member(root_fd: int, name: str, src: Any, mode: int, budget: list[int]) -> None:
    parts = check_relative(name, "file name in the context").split("/")
    dfd = _mkdirs(root_fd, parts[:-1])
    try:
        # O_EXCL|O_NOFOLLOW: a second member of the same name or a planted link fails, never writes elsewhere.
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o755 if mode & 0o111 else 0o644, dir_fd=dfd)
    except FileExistsError:
        raise UsageError(f"the context names {name[:80]!r} twice") from None
    finally:
        os.close(dfd)
    os.fchmod(fd, 0o755 if mode & 0o111 else 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(1 << 20):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise UsageError("the unpacked context is larger than this site allows")
            out.write(chunk)


def safe_extract(archive: Path, dest: Path, max_bytes: int) -> int:
    """Unpack a tar (plain or compressed) or zip into the empty directory `dest`: regular files and directories
    only (links, devices and FIFOs are refused), every name inside `dest`, modes without setuid/setgid/sticky,
    at most `max_bytes` unpacked and MAX_MEMBERS entries. Returns the number of files."""
    dest.mkdir(mode=0o700)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    budget, n = [max_bytes], 0
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                infos = z.infolist()
                if len(infos) > MAX_MEMBERS:
                    raise UsageError(f"the context has more than {MAX_MEMBERS} entries")
                for info in infos:
                    kind = stat.S_IFMT(info.external_attr >> 16)
                    if info.is_dir():
                        os.close(_mkdirs(root, check_relative(info.filename.rstrip("/"), "directory").split("/")))
                        continue
                    if kind not in (0, stat.S_IFREG):
                        raise UsageError(f"{info.filename[:80]!r}: only files and directories may be uploaded "
                                         "(no links or devices)")
                    with z.open(info) as src:
                        _write_member(root, info.filename, src, (info.external_attr >> 16) & 0o777, budget)
                    n += 1
            return n
        with tarfile.open(archive, "r:*") as t:
            for m in t:
                if n > MAX_MEMBERS:
                    raise UsageError(f"the context has more than {MAX_MEMBERS} entries")
                if m.isdir():
                    os.close(_mkdirs(root, check_relative(m.name, "directory").split("/")))
                    continue
                if not m.isreg():
                    what = "link" if m.issym() or m.islnk() else "device or FIFO"
                    raise UsageError(f"{m.name[:80]!r} is a {what}: only files and directories may be uploaded")
                src = t.extractfile(m)
                assert src is not None
                _write_member(root, m.name, src, m.mode, budget)
                n += 1
        return n
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"cannot read the uploaded context: {e}") from None
    finally:
        os.close(root)


# ---- git (as the user, inside the job) ---------------------------------------------------------------------

def git_fetch(r: Recipe, dest: Path) -> str:
    """Clone r.git_url into `dest` with only the site's protocols (no file://, ssh or ext:: unless allowed), no
    redirects, no prompts, no submodules, no hooks; check out r.git_commit (a rebuild) or r.git_ref. Returns
    the commit built."""
    check_recipe(r)
    allow = ["-c", "protocol.allow=never", *[x for s in r.git_schemes for x in ("-c", f"protocol.{s}.allow=always")],
             "-c", "http.followRedirects=false", "-c", "core.hooksPath=/dev/null", "-c", "credential.helper="]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
           "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "LANG": "C.UTF-8"}

    def git(*args: str, cwd: Path | None = None) -> str:
        p = subprocess.run(["git", *allow, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise NagayaError(f"git {args[0]}: {(p.stderr.strip().splitlines() or ['failed'])[-1][:300]}")
        return p.stdout.strip()

    branch = ["--branch", r.git_ref] if r.git_ref and not r.git_commit else []
    git("clone", "--no-recurse-submodules", "--quiet", *branch, "--", r.git_url, str(dest))
    if r.git_commit:
        git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", r.git_commit, cwd=dest)
    return git("rev-parse", "HEAD", cwd=dest)


# ---- the job: nagaya build --recipe FILE -------------------------------------------------------------------

def run_recipe(recipe_path: Path) -> dict[str, Any]:
    """The build job itself (as the user): fetch the context, build, push with the build's own token, clean
    up, and print the result line last. Raises NagayaError (the job fails) on any error."""
    from nagaya import config
    from nagaya.build.builder import Builder, BuildRequest
    from nagaya.image.push import push
    from nagaya.image.store import open_store

    os.umask(0o022)                         # a checkout's modes are the image's (COPY keeps them): not the job's umask
    d = recipe_path.parent
    r = Recipe.from_json(json.loads(recipe_path.read_text()))
    check_recipe(r)
    work = d / "work"
    shutil.rmtree(work, ignore_errors=True)
    auth = d / "auth.json"
    if auth.exists():
        os.environ["NAGAYA_AUTH_FILE"] = str(auth)
    out: dict[str, Any] = {"build": r.id, "tag": r.tag, "source": r.source}
    import pwd

    print(f"nagaya: build {r.id} of {r.tag} as {pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})",
          file=sys.stderr, flush=True)
    try:
        if r.source == "upload":
            fd = os.open(d / r.archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                got = sha256_file(fd)
            finally:
                os.close(fd)
            if got != r.sha256:
                raise NagayaError(f"the kept context's digest is sha256:{got}, not the recorded sha256:{r.sha256}")
            files = safe_extract(d / r.archive, work, r.max_bytes)
            out["context"] = f"sha256:{r.sha256}"
            print(f"nagaya: unpacked {files} files of context sha256:{r.sha256}", file=sys.stderr, flush=True)
        else:
            out["commit"] = git_fetch(r, work)
            out["git_url"] = r.git_url
            print(f"nagaya: checked out {r.git_url} at {out['commit']}", file=sys.stderr, flush=True)
        file = work / r.file if r.file else None
        cfg = config.load()
        store = open_store(cfg)
        result = Builder(store, cfg).build(BuildRequest(context=work, file=file, tag=r.tag,
                                                        build_args=list(r.build_args), no_cache=r.no_cache))
        pushed = push(store, result.ref, r.tag, cfg, quiet=True)
        out.update(digest=pushed.meta.digest, ref=pushed.ref, steps=result.steps, cached=result.cached_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        auth.unlink(missing_ok=True)            # the push token is used once
    print(RESULT_MARK + json.dumps(out, sort_keys=True), flush=True)
    return out


def result_of(log: str) -> dict[str, Any]:
    """The LAST result line of a build job's log (a RUN step cannot print after the build ended)."""
    for line in reversed(log.splitlines()):
        if line.startswith(RESULT_MARK):
            try:
                data = json.loads(line[len(RESULT_MARK):])
                return data if isinstance(data, dict) else {}
            except ValueError:
                return {}
    return {}


def recipe_json(r: Recipe) -> bytes:
    return json.dumps(asdict(r), indent=1).encode()
