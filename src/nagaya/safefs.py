"""File operations across a privilege boundary: the one place where they are written (THREAT_MODEL.md).

Whenever a more privileged process (root, the service account) touches a directory that a less privileged
account can write, or a user touches a name in a shared directory (a sticky spool, /var/tmp), a plain path
call can be redirected: a symlink or hard link planted under the name, a FIFO that blocks the reader, a
directory swapped between a check and its use. The rules here make those classes impossible instead of
patching each call site, and none of them relies on `fs.protected_symlinks/regular/fifos`:

* a directory is opened once, component by component from `/`, with O_NOFOLLOW|O_DIRECTORY, each component
  owned by root or a trusted account and writable by nobody else (or sticky); everything below is then
  reached relative to that fd (`*at` calls), so the path cannot be swapped afterwards;
* files are opened with O_NOFOLLOW|O_NONBLOCK (a FIFO never blocks), checked with fstat (a regular file,
  one link, the expected owner) *before* any write, truncation or ownership change, and read with a size
  cap;
* files are replaced by writing a fresh O_EXCL temp name and renaming it over the old one (rename never
  follows the name it replaces), and removed with unlinkat (never follows);
* or the work is done as the less privileged account (`as_account`), which then has no more rights than
  the account that planted the link.

Stdlib only (os, stat): the run path uses the user-side checks.
"""

from __future__ import annotations

import os
import stat

from nagaya.errors import NagayaError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_READ = 16 << 20


class UnsafePath(NagayaError):
    """A path that another account could have planted or could still change: refused, never followed."""

    exit_code = 6


def _who(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid {uid}"


def _check_dir(st: os.stat_result, where: str, owners: Iterable[int] | None, shared_ok: bool) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{where} is not a directory")
    if owners is not None and st.st_uid not in owners:
        raise UnsafePath(f"{where} belongs to {_who(st.st_uid)}, not to an account trusted for it")
    if st.st_mode & 0o022 and not (shared_ok and st.st_mode & stat.S_ISVTX) and \
            not (st.st_mode & 0o002 == 0 and _private_group(st.st_uid, st.st_gid)):
        raise UnsafePath(f"{where} is writable by other accounts")


def _private_group(uid: int, gid: int) -> bool:
    """A group-writable directory is still private when its group is its owner's own private group (the
    user-private-group scheme, umask 002): a group of the owner's name with no other members."""
    import grp
    import pwd

    try:
        pw, gr = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    return uid != 0 and pw.pw_gid == gid and gr.gr_name == pw.pw_name and not gr.gr_mem


def open_dir(path: str | os.PathLike[str], trusted: Iterable[int] = (), *, last_shared: bool = False) -> int:
    """A directory fd for `path`, reached from `/` without following any link an untrusted account could
    have made, every component owned by root or a `trusted` uid and writable by no one else, except sticky
    directories above the last one (like /tmp: a sticky directory's entries can be renamed or removed only
    by their owner, so a trusted owner's child stays put). `last_shared`: the directory itself may be a
    sticky, world-writable one (a spool). A symlink on the way is followed only if a trusted account owns it
    (a site's /var/run -> /run); the last component is never a link."""
    owners = {0, *trusted}
    todo = [p for p in os.fspath(path).split("/") if p]
    if not os.fspath(path).startswith("/"):
        todo = [p for p in os.getcwd().split("/") if p] + todo
    fd = os.open("/", _DIR)
    try:
        _check_dir(os.fstat(fd), "/", owners, True)
        done: list[str] = []
        hops = 0
        while todo:
            name = todo.pop(0)
            where = "/" + "/".join([*done, name])
            if name == ".":
                continue
            if name == "..":
                raise UnsafePath(f"{path}: '..' is not allowed here")
            try:
                nfd = os.open(name, _DIR, dir_fd=fd)
            except OSError as e:
                link = _trusted_link(fd, name, owners) if todo else None
                if link is None:
                    raise UnsafePath(f"{where}: {_why(e)}") from None
                hops += 1
                if hops > 40:
                    raise UnsafePath(f"{path}: too many links") from None
                # walk again from /: the target (relative to the link's directory, whose real path is `done`)
                head = ([] if link.startswith("/") else done) + [p for p in link.split("/") if p]
                norm: list[str] = []
                for p in head:
                    if p == "..":
                        if norm:
                            norm.pop()
                    elif p != ".":
                        norm.append(p)
                todo, done = norm + todo, []
                os.close(fd)
                fd = os.open("/", _DIR)
                continue
            os.close(fd)
            fd = nfd
            done.append(name)
            _check_dir(os.fstat(fd), where, owners, bool(todo) or last_shared)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _trusted_link(dirfd: int, name: str, owners: set[int]) -> str | None:
    """The target of `name` if it is a symlink a trusted account owns (its directory was checked already)."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode) and st.st_uid in owners:
            return os.readlink(name, dir_fd=dirfd)
    except OSError:
        pass
    return None


def describe(e: OSError | UnsafePath) -> str:
    """One line for a refused path: what it was, not a raw errno."""
    return str(e) if isinstance(e, UnsafePath) else _why(e)


def _why(e: OSError) -> str:
    import errno

    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return "a symbolic link or not a directory (never followed)"
    return e.strerror or str(e)


def private_dir(path: str | os.PathLike[str], uid: int | None = None) -> str:
    """Check a directory a user keeps their own state in (an image cache, an overlay) when its path is
    derivable by others (`/var/tmp/nagaya-$USER`): owned by `uid`, writable by it alone, on a path no other
    account can change. Returns the real path to use. Cheap (one open per component): run on every use."""
    uid = os.geteuid() if uid is None else uid
    fd = open_dir(path, (uid,))
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise UnsafePath(f"{path} belongs to {_who(st.st_uid)}, not to you")
        return os.path.realpath(os.fspath(path))     # the same directory: no untrusted link on the way
    finally:
        os.close(fd)


def open_dir_at(dirfd: int, name: str, owners: Iterable[int] | None = None) -> int:
    """A subdirectory of `dirfd`, not followed if it is a link, owned by one of `owners` (any if None)."""
    fd = os.open(name, _DIR, dir_fd=dirfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{name} is not a directory")
        if owners is not None and st.st_uid not in set(owners):
            raise UnsafePath(f"{name} belongs to {_who(st.st_uid)}, not to an account trusted for it")
        return fd
    except BaseException:
        os.close(fd)
        raise


def mkdir_at(dirfd: int, name: str, mode: int, uid: int = -1, gid: int = -1,
             owners: Iterable[int] | None = None) -> int:
    """Create (or open) the subdirectory `name` of `dirfd` and set its owner and mode through its fd. An
    existing one must already belong to one of `owners` (default: `uid`, or ourselves): a directory that
    someone else made first is refused, never adopted."""
    try:
        os.mkdir(name, mode & 0o777, dir_fd=dirfd)
    except FileExistsError:
        pass
    allowed = set(owners) if owners is not None else {uid if uid != -1 else os.geteuid(), os.geteuid()}
    fd = open_dir_at(dirfd, name, allowed)
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode & 0o7777)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_file(fd: int, name: str, owners: Iterable[int] | None = None) -> os.stat_result:
    """A regular file with one link (no hard link into someone else's file), owned by one of `owners`."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{name} is not a regular file")
    if st.st_nlink != 1:
        raise UnsafePath(f"{name} has {st.st_nlink} links (a hard link is never trusted)")
    if owners is not None and st.st_uid not in set(owners):
        raise UnsafePath(f"{name} belongs to {_who(st.st_uid)}, not to an account trusted for it")
    return st


def open_at(dirfd: int | None, name: str, flags: int = os.O_RDONLY, *, create: int | None = None,
            owners: Iterable[int] | None = None) -> int:
    """Open the regular file `name` (relative to `dirfd`, or a path if None) without following a link or
    blocking on a FIFO, and check it (`check_file`) before anything is done with it. `create`: the mode for
    a new file. Never pass O_TRUNC (it would act before the check): truncate the checked fd instead."""
    if flags & os.O_TRUNC:
        raise ValueError("open_at: truncate after the check, not with O_TRUNC")
    fl = flags | _FILE | (os.O_CREAT if create is not None else 0)
    fd = os.open(name, fl, create or 0, dir_fd=dirfd)
    try:
        check_file(fd, name, owners)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def create_at(dirfd: int, name: str, mode: int = 0o600, uid: int = -1, gid: int = -1) -> int | None:
    """A new file `name` (O_EXCL: never an existing name, link or FIFO), owned as given; None if it exists."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE, mode, dir_fd=dirfd)
    except FileExistsError:
        return None
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_at(dirfd: int | None, name: str, *, owners: Iterable[int] | None = None, max_size: int = MAX_READ) -> bytes:
    """The whole of a small regular file, checked as `open_at` does; larger than `max_size` is an error."""
    fd = open_at(dirfd, name, owners=owners)
    try:
        if os.fstat(fd).st_size > max_size:
            raise UnsafePath(f"{name} is larger than {max_size} bytes")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_size:
                raise UnsafePath(f"{name} is larger than {max_size} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_at(dirfd: int, name: str, data: bytes, mode: int = 0o644, uid: int = -1, gid: int = -1) -> None:
    """Replace `name` in `dirfd` atomically: a fresh O_EXCL temp file (owner and mode set on its fd), then
    renameat over the old name, which replaces a planted link instead of writing through it."""
    for _ in range(100):
        tmp = f".{name}.{os.urandom(6).hex()}.tmp"
        fd = create_at(dirfd, tmp, mode, uid, gid)
        if fd is not None:
            break
    else:
        raise UnsafePath(f"cannot create a temporary file for {name}")
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


def remove_at(dirfd: int, name: str) -> bool:
    """unlinkat: removes the name itself (a link, never its target). False if it was already gone."""
    try:
        os.unlink(name, dir_fd=dirfd)
        return True
    except FileNotFoundError:
        return False


def lstat_at(dirfd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def append_own(where: str | int, names: Iterable[str], data: bytes) -> str | None:
    """Append `data` to the first of `names` in a shared sticky directory (a path, or an fd from open_dir)
    that is a regular file of ours with one link, creating it if absent; a name someone else took first
    (their file, a link, a FIFO, a directory) is skipped. When every name is taken, a fresh unguessable
    O_EXCL name is used, so a user can always write a record of their own. Returns the name written, None
    if nothing could be written."""
    try:
        dfd = where if isinstance(where, int) else open_dir(where, last_shared=True)
    except (OSError, UnsafePath):
        return None
    me = os.geteuid()
    try:
        candidates = [*names]
        base = candidates[0].rsplit(".", 1)
        candidates.append(f"{base[0]}.{os.urandom(8).hex()}.{base[1] if len(base) > 1 else 'log'}")
        for n in candidates:
            try:
                fd = open_at(dfd, n, os.O_WRONLY | os.O_APPEND, create=0o600, owners=(me,))
            except (OSError, UnsafePath):
                continue
            try:
                os.write(fd, data)
                return n
            finally:
                os.close(fd)
        return None
    finally:
        if not isinstance(where, int):
            os.close(dfd)


class as_account:                   # lower case: used like a function, `with safefs.as_account(...)`
    """Root acts with the rights of a less privileged account (effective ids only, restored afterwards):
    whatever that account planted can then lead nowhere it could not write itself. A no-op when not root.
    Single-threaded callers only (the effective ids are per process). A class, not contextlib's decorator:
    this module is on the run path, and contextlib costs milliseconds to import."""

    def __init__(self, uid: int, gid: int, groups: list[int] | None = None) -> None:
        self.uid, self.gid, self.groups = uid, gid, groups
        self.saved: list[int] | None = None

    def __enter__(self) -> None:
        if os.geteuid() != 0:
            return
        self.saved = os.getgroups()
        os.setgroups(self.groups if self.groups is not None else [self.gid])
        os.setegid(self.gid)
        os.seteuid(self.uid)

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            return
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(self.saved)
        self.saved = None
