"""The user's FUSE reader: one read-only file, `image.sqfs`, whose reads come from the verified chunk cache
(nagaya.image.lazy.chunks). Started by nagaya.image.lazy.mount with its parameters as JSON on stdin; it writes
"ready" on stdout once mounted, and unmounts itself when stdin reaches EOF (its parent ended or died).
A block that cannot be fetched or fails verification is EIO, with one line on stderr saying why."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

NAME = "image.sqfs"


def main() -> None:
    import mfusepy

    from nagaya.errors import NagayaError
    from nagaya.image.lazy.artifact import LazyIndex
    from nagaya.image.lazy.cachecap import hold
    from nagaya.image.lazy.chunks import ChunkCache, try_get
    from nagaya.image.registry import Registry

    params = json.loads(sys.stdin.readline())
    index = LazyIndex.from_json(params["index"])
    mnt = params["mountpoint"]
    reg = Registry(params["registry"], params["repository"], ("pull",), insecure=params["insecure"],
                   token_dir=Path(params["token_dir"]), timeout=20.0)
    cache = ChunkCache(Path(params["cache_dir"]), index, reg)
    hold(Path(params["cache_dir"]))       # `cache gc` leaves this block cache alone while we run
    profile = Path(params["cache_dir"]) / "profile"
    said: set[str] = set()
    uid, gid = os.getuid(), os.getgid()
    ready_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)

    class Fs(mfusepy.Operations):  # type: ignore[misc]
        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o500, "st_nlink": 2, "st_uid": uid, "st_gid": gid}
            if path == "/" + NAME:
                return {"st_mode": stat.S_IFREG | 0o400, "st_nlink": 1, "st_size": index.size, "st_uid": uid,
                        "st_gid": gid}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", NAME]

        def open(self, path: str, flags: int) -> int:
            if path != "/" + NAME:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise mfusepy.FuseOSError(errno.EROFS)
            return 0

        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            try:
                return cache.read(offset, size)
            except NagayaError as e:
                if e.message not in said:
                    said.add(e.message)
                    print(f"nagaya: lazy image read failed: {e.message}", file=sys.stderr, flush=True)
                raise mfusepy.FuseOSError(errno.EIO) from None

        def init(self, path: str) -> None:
            ready_out.write("ready\n")
            ready_out.flush()
            threading.Thread(target=prefetch, daemon=True).start()

    def prefetch() -> None:
        try:
            order = [int(x) for x in profile.read_text().split()]
        except (OSError, ValueError):
            return
        for i in order:
            if 0 <= i < index.count and not try_get(cache, i):
                return

    finishing = threading.Lock()
    done: list[bool] = []

    def finish() -> None:
        # Reached from both threads when the FUSE loop ends while watch_parent detaches the mount: the second
        # caller waits for the first to finish writing (its os._exit would otherwise cut the write short).
        with finishing:
            if not done:
                done.append(True)
                record()

    def record() -> None:
        if not profile.exists() and cache.order:
            tmp = profile.with_name(f"profile.{os.getpid()}")
            tmp.write_text(" ".join(map(str, cache.order)))
            os.replace(tmp, profile)
        stats = {"fetched": cache.fetched_bytes, "cached_chunks": cache.cached_count()}
        tmp = Path(params["cache_dir"]) / f"last-run.{os.getpid()}"
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, tmp.with_name("last-run.json"))

    def watch_parent() -> None:
        # The run's own mount namespace may hold a copy of this mount until it exits, so the kernel would not
        # end the session on unmount: detach it here, write what this run learnt, and exit (closing /dev/fuse
        # ends the session everywhere).
        while sys.stdin.buffer.read(4096):
            pass
        subprocess.run(["fusermount3", "-u", "-z", mnt], stderr=subprocess.DEVNULL, check=False)
        try:
            os.rmdir(mnt)
        except OSError:
            pass
        try:
            finish()
        finally:
            os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        mfusepy.FUSE(Fs(), mnt, foreground=True, ro=True, nothreads=True, fsname="nagaya-lazy",
                     default_permissions=True)   # squashfuse_ll asks one read at a time anyway
    finally:
        finish()


if __name__ == "__main__":
    main()
