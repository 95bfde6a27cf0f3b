"""The few Linux system calls Python's os module lacks (3.11): unshare, mount, prctl.

They are called through `_ctypes`, the C half of ctypes: `import ctypes` builds dozens of classes and
pulls in `struct`, some 3 ms of every container start, for three functions of libc.
"""

from __future__ import annotations

import _ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUTS = 0x04000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36



class _CInt(_ctypes._SimpleCData):        # ctypes.c_int
    _type_ = "i"


class _CULong(_ctypes._SimpleCData):      # ctypes.c_ulong
    _type_ = "L"


class _LibcFunction(_ctypes.CFuncPtr):    # a function of ctypes.CDLL(None, use_errno=True)
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _CInt


class _Libc:
    _handle = 0


_functions: dict[str, _LibcFunction] = {}


def _fn(name: str) -> _LibcFunction:
    f = _functions.get(name)
    if f is None:
        if not _Libc._handle:
            _Libc._handle = _ctypes.dlopen(None, os.RTLD_NOW)
        f = _functions[name] = _LibcFunction((name, _Libc()))
    return f


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_fn("unshare")(flags), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_fn("mount")(source.encode(), target.encode(), fstype.encode() if fstype else None,
                        _CULong(flags), data.encode() if data else None), f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_fn("umount2")(target.encode(), flags), f"umount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_fn("prctl")(option, _CULong(arg), 0, 0, 0), "prctl")


def map_self(uid: int, gid: int) -> None:
    """Map the caller's own uid/gid into its fresh user namespace (all an unprivileged user may map)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


# The new mount API (Linux 5.2): a keeper's mount handed to a container as a detached clone (runtime.keeper)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 4
AT_FDCWD = -100


def open_tree(path: str, flags: int) -> int:
    """A file descriptor for a detached copy of the mount at `path` (OPEN_TREE_CLONE)."""
    fd = _fn("syscall")(SYS_OPEN_TREE, AT_FDCWD, path.encode(), flags)
    if fd < 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"open_tree {path}: {os.strerror(err)}")
    return fd


def attach_mount(fd: int, target: str) -> None:
    """Attach the detached mount `fd` (from open_tree) at `target` in this mount namespace."""
    _check(_fn("syscall")(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount {target}")
