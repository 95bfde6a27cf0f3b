"""A job's CPU, memory and GPU use over time: sampled by a local job's watcher, kept beside its log.

The watcher (runner.py) calls `Sampler.tick()` each time it wakes; every INTERVAL seconds the sampler reads
/proc for the job's process tree (the `nagaya run` it started and every descendant, whatever session or
group the container's processes moved to) and appends one JSON line to `<state>/logs/ID.usage`. Reading
/proc costs a few stat files per process; no shared service is involved, and the file is the user's own
(the watcher runs as the user). The file is capped: past MAX_BYTES every second line is dropped, so a long
job keeps its whole history at a coarser step.

A job holding GPUs also gets their utilisation and memory in use (`GpuReader`: the driver's `nvidia-smi
--query-gpu`, run as the user with a time limit, for the job's own devices only; a tool that fails or hangs
is left alone for a minute). Slurm jobs have no watcher of nagaya's on the node: each look at a running
job (`nagaya job usage`, the portal's chart refresh) keeps Slurm's sample in the user's own file (`keep`),
so the history grows while anyone looks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from nagaya.sched.models import UsageSample

INTERVAL = 3.0
MAX_BYTES = 64 << 10
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its reaped children) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields follow the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    try:
        ppid = int(rest[1])
        utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    except (IndexError, ValueError):
        return None
    return ppid, (utime + stime + cutime + cstime) / _TICK


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree(root: int) -> dict[int, float]:
    """CPU seconds of `root` and each of its living descendants, by pid."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parents[int(name)], cpu[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, float] = {}
    todo = [root] if root in cpu else []
    while todo:
        pid = todo.pop()
        if pid not in out:
            out[pid] = cpu[pid]
            todo.extend(children.get(pid, ()))
    return out


def measure(root: int, gpus: int = 0, t: float | None = None) -> UsageSample:
    """One reading of the process tree under `root` (CPU seconds so far, resident memory now)."""
    procs = tree(root)
    return UsageSample(t=time.time() if t is None else t, cpu_seconds=round(sum(procs.values()), 2),
                       rss_bytes=sum(_rss(p) for p in procs), processes=len(procs), gpus=gpus)


SMI_TIMEOUT = 2.0               # seconds nvidia-smi may take; the watcher's own work comes first
SMI_BACKOFF = 60.0              # after a failure, the tool is left alone this long
_QUERY = "--query-gpu=index,pci.bus_id,utilization.gpu,memory.used,memory.total"


def find_smi(gpu_cfg: Any) -> str | None:
    """nvidia-smi where the GPU discovery looks for the driver's tools: [gpu] path (or PATH), then bin_dirs."""
    path = getattr(gpu_cfg, "path", "") or os.environ.get("PATH", "")
    dirs = [d for d in path.split(":") if d] + [d for d in getattr(gpu_cfg, "bin_dirs", []) if d]
    return shutil.which("nvidia-smi", path=":".join(dirs)) if dirs else None


class GpuReader:
    """Utilisation and memory in use of the GPUs `devices` (the /dev/nvidiaN minor numbers a job holds), from
    `nvidia-smi --query-gpu` (NVIDIA's documented CSV). nvidia-smi numbers GPUs in its own order: each row's
    PCI bus id is matched to its minor number through the driver's /proc/driver/nvidia/gpus/BUS/information
    (under [gpu] root), and where that file is missing, the index is taken to be the minor number."""

    def __init__(self, devices: list[int], smi: str | None, root: str = "") -> None:
        self.devices, self.smi, self.root = sorted(set(devices)), smi, root
        self.retry_at = 0.0

    def _minor(self, bus: str, index: int) -> int:
        name = bus.strip().lower()[-12:]                  # 00000000:3B:00.0 -> 0000:3b:00.0, as /proc names it
        try:
            with open(f"{self.root}/proc/driver/nvidia/gpus/{name}/information", "rb") as f:
                for line in f.read(8192).decode(errors="replace").splitlines():
                    if line.startswith("Device Minor:"):
                        return int(line.split(":", 1)[1])
        except (OSError, ValueError):
            pass
        return index

    def read(self, now: float | None = None) -> tuple[float, int, int] | None:
        """(mean utilisation %, memory used, memory total in bytes) of the job's GPUs; None if unknown."""
        mono = time.monotonic() if now is None else now
        if not self.devices or not self.smi or mono < self.retry_at:
            return None
        try:
            r = subprocess.run([self.smi, _QUERY, "--format=csv,noheader,nounits"], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=SMI_TIMEOUT, check=False)
            rows = r.stdout.decode(errors="replace").splitlines() if r.returncode == 0 else []
        except (OSError, subprocess.SubprocessError):
            rows = []
        util: list[float] = []
        used = total = 0
        for row in rows:
            f = [x.strip() for x in row.split(",")]
            if len(f) != 5 or not f[0].isdigit():
                continue
            if self._minor(f[1], int(f[0])) not in self.devices:
                continue
            with contextlib.suppress(ValueError):         # "[N/A]", "[Not Supported]": that figure is unknown
                util.append(min(100.0, max(0.0, float(f[2]))))
            with contextlib.suppress(ValueError):
                used += int(float(f[3]) * (1 << 20))      # MiB, as nvidia-smi counts
                total += int(float(f[4]) * (1 << 20))
        if not util and not total:
            self.retry_at = mono + SMI_BACKOFF
            return None
        return (round(sum(util) / len(util), 1) if util else 0.0), used, total


class Sampler:
    def __init__(self, root: int, path: Path, gpus: int = 0, interval: float = INTERVAL,
                 gpu: GpuReader | None = None) -> None:
        self.root, self.path, self.gpus, self.interval = root, path, gpus, interval
        self.gpu = gpu
        self.last: UsageSample | None = None
        self.next_at = 0.0

    def tick(self, now: float | None = None) -> UsageSample | None:
        """Sample when the interval has passed; never raises (the watcher's work comes first)."""
        mono = time.monotonic() if now is None else now
        if mono < self.next_at:
            return None
        self.next_at = mono + self.interval
        try:
            s = measure(self.root, self.gpus)
            g = self.gpu.read(mono) if self.gpu is not None else None
            if g is not None:
                s.gpu_util, s.gpu_mem_bytes, s.gpu_mem_total = g
            if self.last is not None and s.t > self.last.t:
                # cores in use over the interval; a process that ended unreaped may make the sum dip: not below 0
                s.cpu_cores = round(max(0.0, s.cpu_seconds - self.last.cpu_seconds) / (s.t - self.last.t), 3)
            self.last = s
            append(self.path, s)
            return s
        except (OSError, ValueError):
            return None


def append(path: Path, s: UsageSample, cap: int = MAX_BYTES) -> None:
    line = (json.dumps(s.to_dict(), separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        size = os.fstat(fd).st_size
        os.write(fd, line)
    finally:
        os.close(fd)
    if size + len(line) > cap:
        _thin(path)


def _thin(path: Path) -> None:
    """Keep every second sample (and the newest): the same span of time at half the resolution."""
    lines = path.read_bytes().splitlines(keepends=True)
    kept = lines[::2] if len(lines) % 2 else [*lines[::2], lines[-1]]
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(kept))
    tmp.replace(path)


def keep(path: Path, s: UsageSample, min_step: float = 1.0) -> list[dict[str, Any]]:
    """Add one sample taken now (a scheduler's figure: Slurm's sstat) to the user's own history of the job,
    its cores in use from the previous one; returns the whole history. A sample within `min_step` seconds of
    the last is not kept (two pages refreshing at once)."""
    old = read(path)
    if old:
        prev = old[-1]
        if s.t - float(prev["t"]) < min_step:
            return old
        s.cpu_cores = round(max(0.0, s.cpu_seconds - float(prev["cpu_seconds"])) / (s.t - float(prev["t"])), 3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        append(path, s)
    except OSError:
        return [*old, s.to_dict()]                        # shown, only not kept
    return [*old, s.to_dict()]


def read(path: Path) -> list[dict[str, Any]]:
    """The samples of a usage file, oldest first; damaged lines are skipped."""
    out: list[dict[str, Any]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return out
    with os.fdopen(fd, "rb") as f:
        data = f.read(4 * MAX_BYTES)
    for line in data.splitlines():
        with contextlib.suppress(ValueError, TypeError, OverflowError, KeyError):
            d = json.loads(line)
            if isinstance(d, dict):
                # the user's own file, read for the portal too: numbers of the declared kinds, or the line goes
                s = UsageSample(t=float(d["t"]), cpu_seconds=float(d.get("cpu_seconds", 0)),
                                cpu_cores=float(d.get("cpu_cores", 0)), rss_bytes=int(d.get("rss_bytes", 0)),
                                processes=int(d.get("processes", 0)), gpus=int(d.get("gpus", 0)),
                                gpu_util=float(d.get("gpu_util", 0)), gpu_mem_bytes=int(d.get("gpu_mem_bytes", 0)),
                                gpu_mem_total=int(d.get("gpu_mem_total", 0)))
                if all(math.isfinite(x) for x in (s.t, s.cpu_seconds, s.cpu_cores, s.gpu_util)):
                    out.append(s.to_dict())
    return out
