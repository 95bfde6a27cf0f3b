"""Where a job's `nagaya run` leaves what `nagaya job exec` needs to enter its container.

A run inside a batch job (Slurm's SLURM_JOB_ID, or the local runner's NAGAYA_JOB_ID) writes one small JSON
record per container into a private per-user directory on its node, `/tmp/.nagaya-jobs-UID` (0700, checked
with safefs's rules: owned by the user, on a path nobody else can swap; a name someone else took first
is refused, and that run simply records nothing). The record is named after the job, the step, the task
and the node, holds the supervisor's pid and start time, the inode numbers of its user and pid
namespaces (so a reused pid is never taken for the container), the container's environment and working
directory; the supervisor removes it when the container ends.
Nothing here is trusted for anything the kernel does not check again: joining a namespace needs the
user's own rights over it (see runtime/enter.py).
"""

from __future__ import annotations

import json
import os

RECORD_MAX = 1 << 20


def runtime_dir(uid: int | None = None) -> str:
    return f"/tmp/.nagaya-jobs-{os.getuid() if uid is None else uid}"


def job_key() -> tuple[str, str, str] | None:
    """(backend, job, "STEP.TASK") of the job this process runs in, or None outside a batch job."""
    env = os.environ
    batch = env.get("NAGAYA_BATCH_JOB", "").split()     # set by the Grid Engine / PBS job wrapper (sched/batchwrap.py)
    if len(batch) == 2 and batch[0] in ("gridengine", "pbs") and \
            all(x.isdigit() for x in batch[1].split(".", 1)):
        rank = env.get("NAGAYA_NODE_RANK", "0")
        return batch[0], batch[1], f"0.{rank if rank.isdigit() else 0}"
    if env.get("SLURM_JOB_ID", "").isdigit():
        step = env.get("SLURM_STEP_ID", "batch") or "batch"
        task = env.get("SLURM_PROCID", "0") or "0"
        if not (step.isdigit() or step in ("batch", "extern", "interactive")) or not task.isdigit():
            return None                     # never a name with a path in it
        return "slurm", env["SLURM_JOB_ID"], f"{step}.{task}"
    if env.get("NAGAYA_JOB_ID", "").isdigit():
        return "local", env["NAGAYA_JOB_ID"], "0.0"
    return None


def node_name(backend: str) -> str:
    """The node as the scheduler names it (several slurmd may share one host)."""
    return (os.environ.get("SLURMD_NODENAME") if backend == "slurm" else "") or os.uname().nodename


def record_name(backend: str, job: str, step_task: str) -> str:
    return f"{backend}-{job}-{step_task}@{node_name(backend)}.json"


def open_dir(create: bool) -> int:
    """The private runtime dir's fd (made 0700 if `create`); raises OSError/safefs.UnsafePath."""
    from nagaya import safefs

    d = runtime_dir()
    if create:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
    fd = safefs.open_dir(d, (os.getuid(),))
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.close(fd)
        raise safefs.UnsafePath(f"{d} is not yours alone")
    return fd


def write(dirfd: int, name: str, data: dict[str, object]) -> None:
    """Written under a temp name and renamed: exec never reads half a record."""
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
    try:
        os.write(fd, json.dumps(data).encode())
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)


def prune(dirfd: int, keep: str) -> None:
    """Remove the records of runs that were killed outright (SIGKILL, OOM) and so never removed their own:
    their supervisor's pid is gone or now names another process. Called when a job's run records itself."""
    import json as _json

    for name in os.listdir(dirfd):
        if name == keep or not name.endswith(".json"):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
            try:
                rec = _json.loads(os.read(fd, RECORD_MAX))
            finally:
                os.close(fd)
            with open(f"/proc/{int(rec['pid'])}/stat") as f:
                alive = f.read().rsplit(")", 1)[1].split()[19] == str(rec["start"])
        except FileNotFoundError:
            alive = False
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        if not alive:
            remove(dirfd, name)


def remove(dirfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def find(backend: str, job: str, host: str, task: str | None = None) -> list[tuple[str, dict]]:
    """This user's records of `job` on this node, oldest step first: (name, record)."""
    from nagaya import safefs

    try:
        dirfd = open_dir(False)
    except FileNotFoundError:
        return []
    try:
        out = []
        prefix = f"{backend}-{job}-"
        for name in os.listdir(dirfd):
            if not name.startswith(prefix) or not name.endswith(f"@{host}.json"):
                continue
            step_task = name[len(prefix):-len(f"@{host}.json")]
            if task is not None and step_task.rpartition(".")[2] != task:
                continue
            try:
                rec = json.loads(safefs.read_at(dirfd, name, owners=(os.getuid(),), max_size=RECORD_MAX))
            except (OSError, ValueError, safefs.UnsafePath):
                continue
            if isinstance(rec, dict):
                rec["_name"] = name
                out.append((step_task, rec))
        return [(n, r) for _, n, r in sorted((_order(st), r["_name"], r) for st, r in out)]
    finally:
        os.close(dirfd)


def _order(step_task: str) -> tuple[int, int]:
    step, _, task = step_task.partition(".")
    return (int(step) if step.isdigit() else -1, int(task) if task.isdigit() else 0)


def drop(name: str) -> None:
    """Remove a stale record (its container has gone)."""
    try:
        dirfd = open_dir(False)
    except (OSError, Exception):
        return
    try:
        remove(dirfd, name)
    finally:
        os.close(dirfd)
