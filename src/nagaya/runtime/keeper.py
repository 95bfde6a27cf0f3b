"""The image keeper's client: a user's images stay mounted on a node between runs, so that a new container
finds the kernel's caches of its image warm. The keeper itself is src/starter/nagaya-keeper.c (a few hundred
KiB per kill domain; the compiled starter speaks this protocol too, and starts it the same way).

A FUSE mount made for one container goes with its mount namespace, and with it every directory entry,
attribute and page the kernel had cached: each `nagaya run` started cold (a first `find` over an image took
3-4x the unpacked tree, an import 1.5x) and waited for a FUSE server to start. The keeper is a process of the
user's own that mounts each image once, in a user and mount namespace of its own, and hands each read-only
run a detached clone of that mount (open_tree(OPEN_TREE_CLONE), attached by the run with move_mount). The
clones share the mount's superblock, so they share its caches, and its one FUSE server.

    nagaya run ──connect──▶ nagaya-keeper (one per user and kill domain)   user+mount ns of its own
       │  "mount OFFSET SERVER" + the image's fd                           ├── nagaya-squashfs (image A)
       │◀── "ok" + a detached clone of the image's mount                   └── nagaya-squashfs (image B)
       └── holds the connection until it exits: the keeper ends `keep_mounted` seconds after the last one,
           or once none is open after the session's leader has gone (a logout, a batch job's end)

Trust: the keeper runs as the user and serves only the user. Its socket is in the user's 0700 starter
directory (fastplan.plan_dir_path, checked by safefs), reached through a checked directory fd; both ends check
the peer's uid (SO_PEERCRED). The image comes as an fd the client opened, so the keeper never resolves a path
for it. A keeper lives in the kill domain it was started in: its name covers the node, the cgroups, the
groups (Grid Engine's job group) and the session, so a job's end, which kills its keeper, can never break
a container of another job or step. THREAT_MODEL B28.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

REQUEST_MAX = 4096
CONNECT_WAIT = 2.0          # how long a client waits for a keeper another client is starting


class KeeperUnavailable(Exception):
    """No keeper could serve this run: the caller mounts the image itself, as without one."""


class ImageRefused(Exception):
    """The FUSE server refused the image file (corrupt or not a squashfs)."""


def key() -> str:
    """The keeper's name for this process's kill domain (the C starter computes the same, keeper_key())."""
    try:
        with open("/proc/self/cgroup", "rb") as f:
            cgroup = f.read()
    except OSError:
        cgroup = b""
    groups = ",".join(str(g) for g in sorted(set(os.getgroups())))
    data = b"\0".join((os.uname().nodename.encode(), cgroup, groups.encode(), str(os.getsid(0)).encode()))
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _peer_uid(s: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


# -- the client (launcher.py; the C starter speaks the same protocol) ------------------------------------------
def request(dirfd: int, image_fd: int, offset: int, server: str, keeper: str, idle: int, staging: str
            ) -> tuple[socket.socket, int]:
    """A detached clone of the image's mount, and the connection to hold open while it is in use. Starts a
    keeper when none runs. KeeperUnavailable: mount it yourself. ImageRefused: the server refused the file."""
    name = f"keeper-{key()}"
    conn = _connect(dirfd, name)
    if conn is None:
        if _start(keeper, dirfd, name, idle, staging) not in (0, 3):      # 3: another run is starting it
            raise KeeperUnavailable("the keeper could not start")
        deadline = time.monotonic() + CONNECT_WAIT
        while (conn := _connect(dirfd, name)) is None:
            if time.monotonic() > deadline:
                raise KeeperUnavailable("no keeper answered")
            time.sleep(0.01)
    try:
        socket.send_fds(conn, [f"mount\t{offset}\t{server}\n".encode()], [image_fd])
        conn.settimeout(30)
        msg, fds, _flags, _addr = socket.recv_fds(conn, REQUEST_MAX, 1)
        conn.settimeout(None)
    except OSError as e:
        conn.close()
        raise KeeperUnavailable(str(e)) from None
    reply = msg.decode(errors="replace").rstrip("\n").split("\t")
    if reply[0] == "ok" and len(fds) == 1:
        return conn, fds[0]
    for fd in fds:
        os.close(fd)
    conn.close()
    if reply[:2] == ["error", "refused"]:
        raise ImageRefused()
    raise KeeperUnavailable("\t".join(reply))


def _connect(dirfd: int, name: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(f"/proc/self/fd/{dirfd}/{name}.sock")
        if _peer_uid(s) != os.getuid():
            raise OSError(errno.EPERM, "not our keeper")
        return s
    except OSError:
        s.close()
        return None


def _start(keeper: str, dirfd: int, name: str, idle: int, staging: str) -> int:
    """Start a keeper (src/starter/nagaya-keeper.c) and wait until it listens (0), or finds that another one
    has the name (3). Its first process forks the keeper proper and exits, so it is no child of this run."""
    import subprocess

    try:
        return subprocess.run(["nagaya-keeper", str(dirfd), name, str(idle), staging], executable=keeper,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(dirfd,),
                              process_group=0, timeout=10, check=False, env={}).returncode
    except (OSError, subprocess.SubprocessError):
        return -1
