"""GPUs on schedulers that count them but do not say which device a job got (Grid Engine's consumable `gpu`,
PBS's `ngpus` without a cgroup hook): the job's wrapper takes a flock on one root-made file per device
(`[sched] gpu_lock_dir`, made by `nagaya job prepare-node`), all under a lock of the directory, so two jobs
never share a GPU and a dead job frees its GPUs with its file descriptors. One mechanism for both backends.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from nagaya.errors import PermissionDenied

# bash, in the job's wrapper: needs $ngpus, $lockdir, $devdir, $gpuf (where the chosen indices are written),
# $ending (set by the wrapper's cancel trap) and the array fds=(); sets $gpus and NAGAYA_JOB_GPUS.
GPU_TAKE = r"""
if [ "$ngpus" -gt 0 ]; then
  # One flock per device, taken all at once under the directory's lock: never half an allocation held.
  exec {dl}<"$lockdir" ||
    { echo "nagaya: no GPU lock directory $lockdir (nagaya job prepare-node, as root)" >&2; exit 1; }
  for try in $(seq 1200); do
    flock "$dl"; got=()
    for dev in "$devdir"/nvidia[0-9]*; do
      [ "${#got[@]}" -ge "$ngpus" ] && break
      i=${dev##*/nvidia}; [ -e "$lockdir/nvidia$i.lock" ] || continue
      exec {fd}<"$lockdir/nvidia$i.lock"
      if flock -n "$fd"; then got+=("$i"); fds+=("$fd"); else exec {fd}<&-; fi
    done
    if [ "${#got[@]}" -ge "$ngpus" ]; then flock -u "$dl"; break; fi
    for fd in "${fds[@]}"; do exec {fd}<&-; done; fds=(); flock -u "$dl"
    [ -n "$ending" ] && exit 0
    sleep 0.5
  done
  exec {dl}<&-
  [ "${#got[@]}" -ge "$ngpus" ] || { echo "nagaya: $ngpus free GPU(s) not found in $devdir" >&2; exit 1; }
  gpus=$(IFS=,; echo "${got[*]}")
  export NAGAYA_JOB_GPUS=$gpus
  echo "$gpus" > "$gpuf"
fi
"""


def prepare_node(cfg: Any) -> list[int]:
    """As root, on each execution host of Grid Engine or PBS (at boot, or as a root prolog): the GPU lock
    directory and one lock file per /dev/nvidiaN, root-owned and read-only for users (flock needs no write access).
    Made through safefs: nothing on the way can be a link or a directory someone else made."""
    from nagaya import safefs

    if os.geteuid() != 0:
        raise PermissionDenied("nagaya job prepare-node must run as root")
    lock_dir = Path(cfg.sched.gpu_lock_dir)
    dev_dir = cfg.gpu.dev_dir or "/dev"
    try:
        present = sorted(int(m.group(1)) for n in os.listdir(dev_dir) if (m := re.fullmatch(r"nvidia(\d+)", n)))
    except OSError:
        present = []
    parent = safefs.open_dir(lock_dir.parent)
    try:
        fd = safefs.mkdir_at(parent, lock_dir.name, 0o755, 0, 0, owners=(0,))
    finally:
        os.close(parent)
    try:
        for i in present:
            f = safefs.create_at(fd, f"nvidia{i}.lock", 0o444, 0, 0)
            if f is not None:
                os.close(f)
            else:                           # an existing one must be root's own plain file
                f = os.open(f"nvidia{i}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                try:
                    safefs.check_file(f, f"nvidia{i}.lock", (0,))
                finally:
                    os.close(f)
    finally:
        os.close(fd)
    return present


def take(cfg: Any, count: int, give_up: Any) -> tuple[list[int], list[int]] | None:
    """The local executor's side of the same locks (its watcher runs as the user and holds the GPUs for the
    job's life): `count` device indices and the fds whose flocks hold them, all taken at once under the
    directory's lock. None when `give_up()` turned true while waiting (the job was cancelled). With no lock
    directory on this machine, PermissionDenied: handing out 0..N-1 would let two jobs share a GPU."""
    import fcntl

    lock_dir, dev_dir = cfg.sched.gpu_lock_dir, cfg.gpu.dev_dir or "/dev"
    try:
        dl = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        raise PermissionDenied(f"no GPU lock directory {lock_dir} on this machine, so GPUs cannot be handed out "
                               "without sharing (an admin runs `nagaya job prepare-node` as root once)") from None
    try:
        if os.fstat(dl).st_uid != 0 and os.geteuid() != 0:
            raise PermissionDenied(f"{lock_dir} is not root's: not a GPU lock directory")
        try:
            present = sorted(int(m.group(1)) for n in os.listdir(dev_dir) if (m := re.fullmatch(r"nvidia(\d+)", n)))
        except OSError:
            present = []
        while True:
            fcntl.flock(dl, fcntl.LOCK_EX)
            got: list[int] = []
            fds: list[int] = []
            for i in present:
                if len(got) >= count:
                    break
                try:
                    fd = os.open(f"nvidia{i}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dl)
                except OSError:
                    continue                # a device prepare-node did not see: not handed out
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                got.append(i)
                fds.append(fd)
            fcntl.flock(dl, fcntl.LOCK_UN)
            if len(got) >= count:
                return got, fds
            for fd in fds:
                os.close(fd)
            if len(present) < count:
                raise PermissionDenied(f"{count} GPU(s) asked for, this machine has {len(present)}")
            if give_up():
                return None
            time.sleep(0.5)
    finally:
        os.close(dl)
