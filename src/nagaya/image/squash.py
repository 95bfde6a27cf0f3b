"""SquashFS files: build one from a tar stream (tar2sqfs), check one before use, unpack one.

tar2sqfs (squashfs-tools-ng) packs a tar stream directly, keeping owners, modes and times from the
tar, so an unprivileged user gets an exact image without extracting anything on disk (mksquashfs
would need the tree unpacked first, with root to keep ownership).
"""

from __future__ import annotations

import os
import struct

from nagaya.errors import ImageError, RuntimeSetupError

TYPE_CHECKING = False       # check() is on `nagaya run`'s start-up path: build/unpack import what they need
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import IO

SQUASHFS_MAGIC = 0x73717368
# Compression levels used when the config names only the compressor ("zstd"; "zstd:15" picks one).
# tar2sqfs and mksquashfs default to zstd level 15, which costs ~6x the CPU of level 6 for about the same
# size on typical layers (measured: 60 MB of text, 5.4 s vs 0.8 s, 39.17 vs 39.22 MB): pull-to-run time
# is what users wait for, so nagaya defaults lower.
DEFAULT_LEVELS = {"zstd": 6, "gzip": 6}
SUPERBLOCK = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")


def build(write_tar: Callable[[IO[bytes]], object], out: Path, compression: str = "zstd", jobs: int = 0) -> None:
    """Run `write_tar(stream)` into tar2sqfs, producing `out`. On any failure `out` does not exist."""
    import shutil
    import subprocess

    exe = shutil.which("tar2sqfs")
    if not exe:
        raise ImageError("tar2sqfs is not installed (Debian package squashfs-tools-ng)")
    jobs = jobs or (os.cpu_count() or 1)
    name, _, level = compression.partition(":")
    level = level or str(DEFAULT_LEVELS.get(name, ""))
    extra = ["--comp-extra", f"level={level}"] if level and name in DEFAULT_LEVELS else []
    cmd = [exe, "--quiet", "--force", "--no-skip", "--compressor", name, *extra, "--num-jobs", str(jobs),
           "--defaults", "mode=0755", str(out)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stdin and proc.stderr
    err: BaseException | None = None
    try:
        write_tar(proc.stdin)
    except BrokenPipeError:
        pass
    except BaseException as e:              # includes KeyboardInterrupt: never leave `out` half-written
        err = e
        proc.kill()
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
    stderr = proc.stderr.read().decode(errors="replace").strip()
    rc = proc.wait()
    if err is not None or rc != 0:
        out.unlink(missing_ok=True)
        if err is not None:
            raise err
        last = stderr.splitlines()[-1] if stderr else f"exit code {rc}"
        raise ImageError(f"could not build the squashfs image: {last}")


def check(path: str | Path, offset: int = 0) -> None:
    """Cheap integrity check on the run path: magic, sane superblock, and the file not truncated.
    `offset`: where the squashfs starts in the file (a single-file image's header precedes it)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            head = f.read(SUPERBLOCK.size)
            size = os.fstat(f.fileno()).st_size - offset
    except FileNotFoundError:
        raise RuntimeSetupError(f"image file {path} is missing: remove and re-import the image") from None
    except OSError as e:
        raise RuntimeSetupError(f"cannot read image file {path}: {e.strerror}") from None
    if len(head) < SUPERBLOCK.size:
        raise RuntimeSetupError(f"image file {path} is truncated or corrupt: remove and re-import the image")
    fields = SUPERBLOCK.unpack(head)
    magic, block_size, major = fields[0], fields[3], fields[9]
    bytes_used = fields[12]
    if magic != SQUASHFS_MAGIC or major != 4 or block_size < 4096 or block_size > 1 << 20:
        raise RuntimeSetupError(f"image file {path} is not a valid squashfs image: remove and re-import it")
    if bytes_used > size:
        raise RuntimeSetupError(f"image file {path} is truncated ({size} of {bytes_used} bytes): "
                                "remove and re-import the image")


def unpack(squashfs: Path, dest: Path, offset: int = 0) -> None:
    """Unpack a squashfs into `dest` (must not exist) for hosts where FUSE cannot be used."""
    import shutil
    import subprocess

    exe = shutil.which("unsquashfs") or "/usr/bin/unsquashfs"
    # As an unprivileged user unsquashfs cannot chown; owners become the user (the run is the user anyway).
    at = ["-o", str(offset)] if offset else []
    r = subprocess.run([exe, "-no-progress", "-quiet", "-no-xattrs", *at, "-d", str(dest), str(squashfs)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeSetupError(f"could not unpack {squashfs}: {msg[-1] if msg else 'unsquashfs failed'}")
