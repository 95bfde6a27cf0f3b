"""Builds from the browser, the API and `nagaya build --submit`: one implementation of submitting a build as a
batch job AS THE USER, listing, following, cancelling and repeating it.

The server checks what it can before anything runs (the user may push to the tag's project, the project is not
frozen or full, the git URL is on the site's list, the upload fits the site's limit, the user has fewer than
`max_running` builds going), writes an uploaded context as bytes to an unlistable directory
(server/build_launch.py), and asks the root dispatcher to submit the build as the user (operation
`build_submit`). The user's side keeps the context in the user's own space; the job unpacks it (or clones the
git URL) and builds as the user (build/remote.py). The server never unpacks an archive and never runs git.

A build's record is the server's own (STATE_DIR/builds/ID.json, 0600): owner, tag, source (the context's
sha256, or the git URL and the commit built), the job, the result. Every operation checks the owner; another
user's build answers like a missing one. A rebuild repeats the recorded source exactly: the kept context
(checked against its sha256), or the recorded commit."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import tarfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

from nagaya import safefs
from nagaya.build.remote import (
    BUILD_ID_RE,
    DEFAULT_SCHEMES,
    Recipe,
    archive_kind,
    check_git_ref,
    check_git_url,
    check_recipe,
    check_relative,
    result_of,
)
from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError
from nagaya.sched.models import JobSpec
from nagaya.sched.onbehalf import JobsUnavailable, PullLogin
from nagaya.server.base import Site
from nagaya.server.build_launch import open_uploads, uploads_root
from nagaya.server.job_service import JobService
from nagaya.sitedb import Principal, authorize
from nagaya.sitedb.service import SiteService

ACTIVE = ("PENDING", "RUNNING", "SUSPENDED", "CONFIGURING", "REQUEUED", "SUBMITTING")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")
MAX_FILES = 200                      # files in one multi-file upload
STALE_UPLOAD = 3600.0                # seconds: an upload still there after this was left by a server that died
_NAME_RE = re.compile(r"^[A-Za-z0-9._+-][A-Za-z0-9._+ -]{0,254}$")


class BuildsUnavailable(JobsUnavailable):
    """This site cannot run builds (no dispatcher, or the upload directory is missing): HTTP 503."""


class TooLarge(UsageError):
    """The upload is larger than the site allows (refused before it is read when its size is declared)."""


@dataclass
class BuildLimits:
    """The site's settings for builds ([builds] in the site's configuration)."""
    upload_max: int = 256 << 20          # bytes of an uploaded context (an archive, or files together)
    unpacked_max: int = 2 << 30          # bytes of the context once unpacked (the job checks)
    git_hosts: list[str] = field(default_factory=list)       # HOST or HOST:PORT; empty: no git builds
    git_schemes: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEMES))
    max_running: int = 2                 # one user's builds pending or running at once
    hours: int = 2                       # a build job's time limit (and its push token's life)

    @classmethod
    def of(cls, settings: Any) -> BuildLimits:
        def words(text: str) -> list[str]:
            return [w for w in re.split(r"[\s,]+", text or "") if w]
        return cls(upload_max=int(getattr(settings, "build_upload_max", 0) or cls.upload_max),
                   unpacked_max=int(getattr(settings, "build_unpacked_max", 0) or cls.unpacked_max),
                   git_hosts=[h.lower() for h in words(getattr(settings, "build_git_hosts", ""))],
                   git_schemes=words(getattr(settings, "build_git_schemes", "")) or list(DEFAULT_SCHEMES),
                   max_running=int(getattr(settings, "build_max_running", 0) or cls.max_running),
                   hours=int(getattr(settings, "build_hours", 0) or cls.hours))


@dataclass
class BuildRecord:
    id: str
    user: str
    tag: str
    source: str                          # upload | git
    created: float
    file: str = ""
    build_args: list[str] = field(default_factory=list)
    sha256: str = ""
    size: int = 0
    archive: str = ""
    git_url: str = ""
    git_ref: str = ""
    git_commit: str = ""                 # the commit built (from the job's result line), or the one a rebuild pins
    job: str = ""
    state: str = "SUBMITTING"
    reason: str = ""
    digest: str = ""                     # the pushed image's
    ended: float = 0.0
    rebuild_of: str = ""
    via: str = "portal"

    @property
    def repository(self) -> str:
        return _repository(self.tag)[1]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(repository=self.repository, active=self.active,
                 context=f"sha256:{self.sha256}" if self.sha256 else "")
        return d


@dataclass
class Upload:
    """An uploaded context, written by the server as bytes to STATE_DIR-builds/NAME (never unpacked here)."""
    name: str
    sha256: str
    size: int
    archive: str                         # context.tar | context.zip


def _repository(tag: str) -> tuple[str, str, str]:
    """(registry, PROJECT/NAME, tag) of HOST/PROJECT/NAME:TAG."""
    from nagaya.image.pull import parse_remote

    ref = parse_remote(tag)
    if ref.digest or "/" not in ref.path:
        raise UsageError("push to HOST/PROJECT/NAME:TAG (a tag, not a digest)")
    return ref.registry, ref.path, ref.tag_or_latest


class Builds:
    def __init__(self, site: Site, state_dir: Path, jobs: JobService, limits: BuildLimits | None = None) -> None:
        self.site, self.state_dir = site, state_dir
        self.limits = limits or BuildLimits.of(site.settings)
        self.dir = state_dir / "builds"
        self.uploads = uploads_root(state_dir)
        # The portal's job operations (server/job_service.py): `submit_build`, then the job's status/logs/cancel,
        # counted against the user's one cap of operations in flight (sched/onbehalf.py's Bounded).
        self.jobs = jobs

    # ---- records ------------------------------------------------------------------------------------------
    def _dir_fd(self) -> int:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        return safefs.open_dir(self.dir, (os.geteuid(),))

    def _save(self, rec: BuildRecord) -> None:
        fd = self._dir_fd()
        try:
            safefs.write_at(fd, f"{rec.id}.json", json.dumps(asdict(rec)).encode(), 0o600)
        finally:
            os.close(fd)

    def _load(self, bid: str) -> BuildRecord | None:
        if not BUILD_ID_RE.match(bid):
            return None
        fd = self._dir_fd()
        try:
            data = safefs.read_at(fd, f"{bid}.json", owners=(os.geteuid(),))
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)
        return BuildRecord(**json.loads(data))

    def _all(self) -> list[BuildRecord]:
        if not self.dir.is_dir():
            return []
        out = [self._load(n[:-5]) for n in os.listdir(self.dir) if n.endswith(".json")]
        return [r for r in out if r is not None]

    def get(self, user: str, bid: str, refresh: bool = True) -> BuildRecord:
        """The user's own build; someone else's is NotFound, exactly like a missing one."""
        rec = self._load(bid)
        if rec is None or rec.user != user:
            raise NotFound(f"no build {bid[:40]}")
        return self._refresh(rec) if refresh else rec

    def list(self, user: str) -> list[BuildRecord]:
        mine = [r for r in self._all() if r.user == user]
        if any(r.active and r.job for r in mine):
            try:
                jobs = {j.id: j for j in self.jobs.list(user)}
            except NagayaError:
                jobs = {}
            for r in mine:
                if r.active and r.job in jobs and jobs[r.job].state != r.state:
                    self._refresh(r)
        return sorted(mine, key=lambda r: -r.created)

    def for_image(self, user: str, repository: str, tag: str) -> BuildRecord | None:
        """The user's newest build that pushed (or pushes) PROJECT/NAME:TAG: the image page's Rebuild."""
        for r in self.list(user):
            try:
                _, repo, t = _repository(r.tag)
            except UsageError:
                continue
            if repo == repository and t == tag:
                return r
        return None

    def _refresh(self, rec: BuildRecord) -> BuildRecord:
        """The job's state; once it completed, the result line of its log (the digest pushed, the commit)."""
        if not rec.active or not rec.job:
            return rec
        try:
            info = self.jobs.status(rec.user, rec.job)
            state, reason = info.state, info.reason
        except NotFound:
            state, reason = "FAILED", "the job is gone"
        except NagayaError:
            return rec
        if not state or state == rec.state:
            return rec
        rec.state, rec.reason = state, reason
        if state not in ACTIVE:
            rec.ended = time.time()
            if state == "COMPLETED":
                try:
                    res = result_of(self.jobs.logs(rec.user, rec.job).log)
                except NagayaError:
                    res = {}
                digest, commit = str(res.get("digest", "")), str(res.get("commit", ""))
                rec.digest = digest if re.fullmatch(r"sha256:[0-9a-f]{64}", digest) else ""
                if rec.source == "git" and re.fullmatch(r"[0-9a-f]{40}", commit):
                    rec.git_commit = commit
                if not rec.digest:
                    rec.state, rec.reason = "FAILED", "the build job ended without pushing an image"
        self._save(rec)
        return rec

    def log(self, user: str, bid: str) -> tuple[BuildRecord, str, bool]:
        rec = self.get(user, bid)
        if not rec.job:
            return rec, "", False
        out = self.jobs.logs(user, rec.job)
        return rec, out.log, out.truncated

    def cancel(self, user: str, bid: str, via: str = "portal") -> BuildRecord:
        rec = self.get(user, bid)
        if rec.active and rec.job:
            try:
                self.jobs.scheduler(user).cancel(rec.job)        # audited below as the build's cancel
            except NotFound:
                pass
            rec.state, rec.reason, rec.ended = "CANCELLED", "cancelled by you", time.time()
            self._save(rec)
            self._audit("build.cancel", user, rec, via)
        return rec

    # ---- uploads (bytes only: the server never unpacks them) ---------------------------------------------
    def _uploads_fd(self) -> int:
        try:
            return open_uploads(self.uploads)
        except (OSError, safefs.UnsafePath):
            raise BuildsUnavailable("builds from uploads are not enabled on this site: the job service has not "
                                    "made its upload directory (ask your admins to restart it)") from None

    def save_upload(self, files: Iterable[tuple[str, BinaryIO]], dockerfile: str = "") -> Upload:
        """One archive (.tar[.gz|.xz|.bz2], .tgz, .zip) as it is, or several plain files (and the text of a
        Dockerfile) packed into a tar of those names, written to STATE_DIR-builds/NAME. Over the site's
        limit: TooLarge, nothing left behind."""
        items = list(files)
        if len(items) > MAX_FILES:
            raise UsageError(f"upload at most {MAX_FILES} files (or one archive)")
        name = f"{secrets.token_hex(16)}.ctx"
        dfd = self._uploads_fd()
        try:
            self._prune(dfd)
            fd = safefs.create_at(dfd, name, 0o644)
            if fd is None:
                raise NagayaError("cannot create the upload file")
            try:
                with os.fdopen(fd, "wb") as out:
                    sink = _Capped(out, self.limits.upload_max)
                    single = len(items) == 1 and not dockerfile and items[0][0].lower().endswith(ARCHIVE_SUFFIXES)
                    if single:
                        _copy(items[0][1], sink)
                    else:
                        if not items and not dockerfile:
                            raise UsageError("upload a build context: an archive, files, or a Dockerfile")
                        _pack(items, dockerfile, sink)
                    sha, size, head = sink.h.hexdigest(), sink.n, sink.head
            except BaseException:
                safefs.remove_at(dfd, name)
                raise
        finally:
            os.close(dfd)
        return Upload(name, sha, size, archive_kind(head))

    def _prune(self, dfd: int) -> None:
        """Uploads a crashed or killed server process left behind: gone after STALE_UPLOAD seconds."""
        now = time.time()
        try:
            names = os.listdir(self.uploads)
        except OSError:
            return
        for n in names:
            try:
                if now - safefs.lstat_at(dfd, n).st_mtime > STALE_UPLOAD:
                    safefs.remove_at(dfd, n)
            except OSError:
                continue

    def drop_upload(self, up: Upload) -> None:
        try:
            dfd = self._uploads_fd()
        except BuildsUnavailable:
            return
        try:
            safefs.remove_at(dfd, up.name)
        finally:
            os.close(dfd)

    # ---- the operation ------------------------------------------------------------------------------------
    def check_push(self, p: Principal, tag: str) -> str:
        """Before anything runs: the tag names this site's registry, and `p` may push there now."""
        registry, repo, _ = _repository(tag)
        if registry != self.site.settings.registry:
            raise UsageError(f"builds push to this site's registry {self.site.settings.registry}, not {registry}")
        with self.site.db.session() as s:
            if "push" not in authorize(s, p, repo, ["push"]):
                raise PermissionDenied(f"you may not push to {repo}")
            why = SiteService(s).push_refusal(repo)
            if why:
                raise PermissionDenied(why)
        return repo

    def check_capacity(self, user: str) -> None:
        """Fewer than `max_running` of the user's builds pending or running, or Conflict (HTTP 409)."""
        running = [r for r in self.list(user) if r.active]
        if len(running) >= self.limits.max_running:
            raise Conflict(f"you have {len(running)} builds going; this site runs at most "
                           f"{self.limits.max_running} of yours at once (wait, or cancel one)")

    def submit(self, p: Principal, tag: str, *, upload: Upload | None = None, git_url: str = "", git_ref: str = "",
               file: str = "", build_args: list[str] | None = None, via: str = "portal",
               rebuild_of: BuildRecord | None = None) -> BuildRecord:
        """Submit one build as `p`: from an upload (the server's copy is removed when this returns), a git URL,
        or (rebuild_of) exactly what an earlier build of theirs built."""
        try:
            return self._submit(p, tag, upload, git_url, git_ref, file, build_args or [], via, rebuild_of)
        finally:
            if upload is not None:
                self.drop_upload(upload)

    def _submit(self, p: Principal, tag: str, upload: Upload | None, git_url: str, git_ref: str, file: str,
                build_args: list[str], via: str, old: BuildRecord | None) -> BuildRecord:
        if p.kind != "user":
            raise PermissionDenied("builds run as a user: robot tokens cannot submit them")
        if getattr(self.site.settings, "portal_submit", "dispatcher") != "dispatcher":
            raise BuildsUnavailable("builds run through the site's job dispatcher, which this site does not use "
                                    "([sched] portal_submit); build with `nagaya build` on a login node")
        tag = tag.strip()
        self.check_push(p, tag)
        file = check_relative(file.strip(), "Dockerfile path") if file.strip() else ""
        args = [a.strip() for a in build_args if a.strip()]
        for a in args:
            if "=" not in a or a.startswith("=") or len(a) > 4096:
                raise UsageError(f"build arguments are K=V, not {a[:60]!r}")
        bid = secrets.token_hex(16)
        rec = BuildRecord(id=bid, user=p.name, tag=tag, source="", created=time.time(), file=file, build_args=args,
                          via=via, rebuild_of=old.id if old else "")
        if old is not None:
            rec.source, rec.sha256, rec.size, rec.archive = old.source, old.sha256, old.size, old.archive
            rec.git_url, rec.git_ref, rec.git_commit = old.git_url, old.git_ref, old.git_commit
            if rec.source == "git" and not rec.git_commit:
                raise Conflict("that build has no recorded commit to repeat (it never completed)")
            if rec.source == "git":
                check_git_url(rec.git_url, self.limits.git_hosts, self.limits.git_schemes)   # the site's list now
        elif upload is not None:
            rec.source, rec.sha256, rec.size, rec.archive = "upload", upload.sha256, upload.size, upload.archive
        elif git_url.strip():
            rec.source = "git"
            rec.git_url = check_git_url(git_url.strip(), self.limits.git_hosts, self.limits.git_schemes)
            rec.git_ref = check_git_ref(git_ref.strip())
        else:
            raise UsageError("a build needs a context: upload one, or give a git URL")
        recipe = Recipe(id=bid, tag=tag, source=rec.source, file=file, build_args=args, sha256=rec.sha256,
                        archive=rec.archive, git_url=rec.git_url, git_ref=rec.git_ref, git_commit=rec.git_commit,
                        git_schemes=self.limits.git_schemes, max_bytes=self.limits.unpacked_max)
        check_recipe(recipe)
        with self._user_lock(p.name):
            self.check_capacity(p.name)                    # again, under the lock: the count stays true
            with self.site.db.session() as db:
                svc = SiteService(db)
                user = svc.user(p.name)
                assert user is not None
                # The job's own push token: a personal one, so the push has exactly the user's rights.
                new = svc.issue_user_token(user, "portal-build", timedelta(hours=self.limits.hours + 1))
            login = PullLogin(registry=self.site.settings.registry, server=self.site.settings.url,
                              username=p.name, secret=new.secret)
            # Of the spec the user's side keeps what sizes the job; it sets JobSpec.build to the recipe.
            spec = JobSpec(image=f"(build) {tag}", ref="", digest="", command=[], cpus=1,
                           name=f"build-{rec.repository.rsplit('/', 1)[-1]}"[:64],
                           time_limit=int(self.limits.hours * 3600))
            again = old is not None and rec.source == "upload"
            try:
                job = self.jobs.submit_build(p.name, asdict(recipe), login, spec,
                                             upload=upload.name if upload is not None and not again else "",
                                             rebuild_of=old.id if again and old is not None else "")
            except BaseException:
                with self.site.db.session() as db:              # never submitted: its push token goes at once
                    svc = SiteService(db)
                    me = svc.user(p.name)
                    if me is not None:
                        svc.revoke_user_tokens(me, new.secret)
                raise
            rec.job, rec.state = job, "PENDING"
            self._save(rec)
        self._audit("build.submit", p.name, rec, via)
        return rec

    def rebuild(self, p: Principal, bid: str, via: str = "portal") -> BuildRecord:
        old = self.get(p.name, bid)
        return self.submit(p, old.tag, file=old.file, build_args=old.build_args, via=via, rebuild_of=old)

    def _user_lock(self, user: str) -> Any:
        """One submit at a time per user (all server processes): the count of running builds stays true."""
        fd = self._dir_fd()
        try:
            lfd = os.open(f".lock-{hashlib.sha256(user.encode()).hexdigest()[:32]}",
                          os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
        finally:
            os.close(fd)
        return _Flock(lfd)

    def _audit(self, action: str, user: str, rec: BuildRecord, via: str) -> None:
        with self.site.db.session() as db:
            SiteService(db).audit(action, user, repository=rec.repository, details={
                "build": rec.id, "job": rec.job, "tag": rec.tag, "source": rec.source, "via": via,
                "context": rec.sha256, "git_url": rec.git_url, "git_commit": rec.git_commit,
                "rebuild_of": rec.rebuild_of})


class _Flock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _Capped(io.RawIOBase):
    """A write sink that hashes, counts, keeps the first bytes and refuses past `limit` (TooLarge)."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self.out, self.limit, self.n, self.h, self.head = out, limit, 0, hashlib.sha256(), b""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.n += len(data)
        if self.n > self.limit:
            raise TooLarge(f"the build context is larger than this site's limit of {self.limit >> 20} MiB")
        if len(self.head) < 8:
            self.head += data[:8]
        self.h.update(data)
        self.out.write(data)
        return len(data)


def _copy(src: BinaryIO, sink: _Capped) -> None:
    while chunk := src.read(1 << 20):
        sink.write(chunk)


def _pack(items: list[tuple[str, BinaryIO]], dockerfile: str, sink: _Capped) -> None:
    """Several uploaded files (plain names, no directories) and a Dockerfile's text, as one tar."""
    seen: set[str] = set()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as t:   # type: ignore[call-overload]
        entries: list[tuple[str, BinaryIO]] = list(items)
        if dockerfile.strip():
            entries.append(("Dockerfile", io.BytesIO(dockerfile.replace("\r\n", "\n").encode())))
        for name, f in entries:
            base = os.path.basename(name.replace("\\", "/"))
            if not _NAME_RE.match(base) or base in (".", ".."):
                raise UsageError(f"unsafe file name {name[:80]!r}")
            if base in seen:
                raise UsageError(f"{base} is given twice")
            seen.add(base)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(0)
            # Browsers send no file modes: programs (ELF, #! scripts) stay runnable, everything else is 0644.
            head = f.read(4)
            f.seek(0)
            executable = head == b"\x7fELF" or head[:2] == b"#!"
            info = tarfile.TarInfo(base)
            info.size, info.mode, info.mtime = size, 0o755 if executable else 0o644, 0
            t.addfile(info, f)


@dataclass
class Submission:
    """A build request as a form or the API sent it (multipart: files under `context`, the rest as fields)."""
    tag: str = ""
    file: str = ""
    build_args: list[str] = field(default_factory=list)
    git_url: str = ""
    git_ref: str = ""
    dockerfile: str = ""
    csrf: str = ""
    files: list[tuple[str, BinaryIO]] = field(default_factory=list)


async def read_submission(request: Any, limits: BuildLimits) -> Submission:
    """The request's form, refused before it is read when its declared size is over the site's upload limit
    (and without a declared size: a chunked upload could be any size)."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise UsageError("send the build with its Content-Length")
    if int(length) > limits.upload_max + (1 << 20):         # the form's own fields and boundaries: 1 MiB
        raise TooLarge(f"the build context is larger than this site's limit of {limits.upload_max >> 20} MiB")
    form = await request.form(max_files=MAX_FILES, max_fields=32, max_part_size=1 << 20)
    out = Submission()
    for k in ("tag", "file", "git_url", "git_ref", "dockerfile", "csrf"):
        v = form.get(k)
        if isinstance(v, str):
            setattr(out, k, v)
    args = form.get("build_args")
    out.build_args = [a for a in (args.splitlines() if isinstance(args, str) else []) if a.strip()]
    for up in form.getlist("context"):
        if hasattr(up, "filename") and up.filename:
            out.files.append((str(up.filename), up.file))
    return out


def submit_from(builds: Builds, p: Principal, sub: Submission, via: str) -> BuildRecord:
    """The Build page's and /api/builds' submit: check the push right first, then save the upload (if any)."""
    builds.check_push(p, sub.tag.strip())
    builds.check_capacity(p.name)                  # before the upload is written: nothing stored in vain
    if sub.git_url.strip():
        if sub.files or sub.dockerfile.strip():
            raise UsageError("give either a git URL or an uploaded context, not both")
        return builds.submit(p, sub.tag, git_url=sub.git_url, git_ref=sub.git_ref, file=sub.file,
                             build_args=sub.build_args, via=via)
    upload = builds.save_upload(sub.files, sub.dockerfile)
    return builds.submit(p, sub.tag, upload=upload, file=sub.file, build_args=sub.build_args, via=via)
