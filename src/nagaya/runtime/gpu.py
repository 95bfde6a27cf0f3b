"""GPU passthrough the way Apptainer's --nv does it: device nodes, driver libraries and tools.

Devices: /dev/nvidiaN (the chosen ones), nvidiactl, nvidia-uvm(-tools), nvidia-modeset, nvidia-caps.
Libraries: each configured name is looked up in configured directories, then in the ld.so cache, and
bound read-only under /.nagaya/gpu/lib (added to LD_LIBRARY_PATH); tools like nvidia-smi under
/.nagaya/gpu/bin (added to PATH). Written against the real driver's file names; the tests use fake ones.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field

from nagaya.config import GpuConfig
from nagaya.errors import UsageError
from nagaya.runtime.spec import Bind

GPU_LIB_DIR = "/.nagaya/gpu/lib"
GPU_BIN_DIR = "/.nagaya/gpu/bin"
_CTL_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


@dataclass
class GpuPlan:
    binds: list[Bind] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    visible: list[int] = field(default_factory=list)


def _ld_cache() -> list[tuple[str, str]]:
    try:
        out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    res = []
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)", line)
        if m and ("x86-64" in m.group(2) or "64" in m.group(2) or "," not in m.group(2)):
            res.append((m.group(1), m.group(3)))
    return res


def allocation(env: dict[str, str] | os._Environ[str] | None = None) -> list[int] | None:
    """The GPUs the batch scheduler gave this step or job (their device minors), or None outside one.

    Slurm's SLURM_STEP_GPUS / SLURM_JOB_GPUS list the GRES indices of gres.conf's `File=/dev/nvidia[..]`,
    which are the device numbers. Without a device cgroup every /dev/nvidiaN is reachable on the node,
    so the container must be the boundary."""
    env = os.environ if env is None else env
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        text = env.get(key, "").strip()
        if text:
            try:
                return sorted({int(x) for x in text.split(",") if x.strip()})
            except ValueError:
                continue                    # e.g. a GRES without device files: no restriction to apply
    return None


def plan(request: str, cfg: GpuConfig, env: dict[str, str] | None = None) -> GpuPlan:
    """`request`: "all" or indices. Inside a scheduler allocation, "all" means the allocated GPUs and
    indices count within it (0 = the job's first GPU), as CUDA_VISIBLE_DEVICES does under Slurm."""
    out = GpuPlan()
    dev_dir = cfg.dev_dir.rstrip("/") or "/dev"
    present = sorted(int(m.group(1)) for n in _listdir(dev_dir) if (m := re.fullmatch(r"nvidia(\d+)", n)))
    alloc = allocation(env)
    if alloc is not None:
        missing = [i for i in alloc if i not in present]
        if missing:
            raise UsageError(f"the job's GPU {missing[0]} has no device {dev_dir}/nvidia{missing[0]} on this node")
    usable = present if alloc is None else alloc
    if request in ("all", ""):
        chosen = usable
    else:
        try:
            wanted = [int(x) for x in request.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--gpus takes 'all' or a list of GPU indices like 0,1 (got {request!r})") from None
        if alloc is not None:
            bad = [i for i in wanted if not 0 <= i < len(alloc)]
            if bad:
                raise UsageError(f"no GPU {bad[0]} in this job's allocation of {len(alloc)} GPU(s)")
            chosen = [alloc[i] for i in wanted]
        else:
            missing = [i for i in wanted if i not in present]
            if missing:
                raise UsageError(f"no GPU {missing[0]} on this host (found: {present or 'none'})")
            chosen = wanted
    if not present:
        raise UsageError(f"--gpus: no NVIDIA GPU devices found in {dev_dir}")
    if not chosen:
        raise UsageError("--gpus: this job was allocated no GPUs (request them: nagaya submit --gpus N)")
    for i in chosen:
        out.binds.append(Bind(f"{dev_dir}/nvidia{i}", f"/dev/nvidia{i}", device=True))
    for n in _CTL_DEVICES:
        if os.path.exists(f"{dev_dir}/{n}"):
            out.binds.append(Bind(f"{dev_dir}/{n}", f"/dev/{n}", device=True))
    if os.path.isdir(f"{dev_dir}/nvidia-caps"):
        out.binds.append(Bind(f"{dev_dir}/nvidia-caps", "/dev/nvidia-caps", device=True))
    seen: set[str] = set()
    cache = None
    for lib in cfg.libs:
        found = []
        for d in cfg.lib_dirs:
            found += [(n, os.path.join(d, n)) for n in _listdir(d) if n.startswith(lib)]
        if not found:
            if cache is None:
                cache = _ld_cache()
            found = [(n, p) for n, p in cache if n.startswith(lib)]
        for name, path in found:
            if name in seen or not os.path.exists(path):
                continue
            seen.add(name)
            out.binds.append(Bind(os.path.realpath(path), f"{GPU_LIB_DIR}/{name}", readonly=True))
    for tool in cfg.bins:
        for d in cfg.bin_dirs:
            p = os.path.join(d, tool)
            if os.access(p, os.X_OK):
                out.binds.append(Bind(os.path.realpath(p), f"{GPU_BIN_DIR}/{tool}", readonly=True))
                break
    out.visible = chosen
    out.env["NVIDIA_VISIBLE_DEVICES"] = ",".join(str(i) for i in chosen)
    # Only the chosen device nodes exist inside, and CUDA numbers what it can open from 0: a host value
    # (Slurm's global indices, say "2,3") would point past them.
    out.env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(chosen)))
    return out


def _listdir(d: str) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError:
        return []
