"""GPU passthrough: NVIDIA the way Apptainer's --nv and the NVIDIA Container Toolkit do it, AMD the way
Apptainer's --rocm does, or a site's CDI spec the way Podman applies one.

Devices: NVIDIA /dev/nvidiaN (the chosen ones), nvidiactl, nvidia-uvm(-tools), nvidia-modeset,
nvidia-caps; AMD /dev/kfd and the chosen /dev/dri/renderD* nodes. A batch scheduler's allocation
(Slurm's GPU variables; for AMD also ROCR_VISIBLE_DEVICES) is the set to choose from. Driver files come
from runtime/gpudisc.py (cached per node): libraries bound read-only under /.nagaya/gpu/lib (on
LD_LIBRARY_PATH) with their soname links made beside them, tools under /.nagaya/gpu/bin (on PATH),
firmware and ICD files at their own paths. With a CDI spec for nvidia.com/gpu or amd.com/gpu in the
site's CDI directories (cfg.cdi), --gpus applies that instead: the site's spec is the authority.
Written against the real drivers' file names; the tests use fake layouts modelled on real ones.
"""

from __future__ import annotations

import os
import stat

from nagaya.config import GpuConfig
from nagaya.errors import UsageError
from nagaya.record import Factory, Record
from nagaya.runtime.spec import Bind

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from typing import Any

GPU_LIB_DIR = "/.nagaya/gpu/lib"
GPU_BIN_DIR = "/.nagaya/gpu/bin"
_CTL_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


class GpuPlan(Record):
    binds: list[Bind] = Factory(list)
    env: dict[str, str] = Factory(dict)
    visible: list[int] = Factory(list)
    links: dict[str, str] = Factory(dict)           # container path -> symlink target (made in the upper layer)
    hooks: list[dict[str, Any]] = Factory(list)     # CDI hooks: {"hookName", "path", "args", "env", "timeout"}
    notes: list[str] = Factory(list)
    paths: bool = False                             # GPU_LIB_DIR/GPU_BIN_DIR hold files: put them on the paths
    source: str = ""                                # "nvidia", "amd", or the CDI spec file applied


def allocation(env: dict[str, str] | os._Environ[str] | None = None, vendor: str = "nvidia") -> list[int] | None:
    """The GPUs the batch scheduler gave this step or job (their device indices), or None outside one.

    Slurm's SLURM_STEP_GPUS / SLURM_JOB_GPUS list the GRES indices of gres.conf's `File=/dev/nvidia[..]`,
    which are the device numbers (for AMD, the index among the render nodes). Without a device cgroup
    every device is reachable on the node, so the container must be the boundary."""
    env = os.environ if env is None else env
    keys = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS") + (("ROCR_VISIBLE_DEVICES",) if vendor == "amd" else ())
    for key in keys:
        text = env.get(key, "").strip()
        if text:
            try:
                return sorted({int(x) for x in text.split(",") if x.strip()})
            except ValueError:
                continue                    # e.g. a GRES without device files: no restriction to apply
    return None


def _choose(request: str, present: list[int], alloc: list[int] | None, what: str) -> list[int]:
    """`request`: "all" or indices. Inside a scheduler allocation, "all" means the allocated GPUs and
    indices count within it (0 = the job's first GPU), as CUDA_VISIBLE_DEVICES does under Slurm."""
    if alloc is not None:
        missing = [i for i in alloc if i not in present]
        if missing:
            raise UsageError(f"the job's GPU {missing[0]} has no device {what}{missing[0]} on this node")
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
    if not chosen and present:
        raise UsageError("--gpus: this job was allocated no GPUs (request them: nagaya submit --gpus N)")
    return chosen


def is_chardev(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def plan(request: str, cfg: GpuConfig, env: dict[str, str] | None = None, cache_root: str = "") -> GpuPlan:
    env_map = os.environ if env is None else env
    dev_dir = cfg.dev_dir.rstrip("/") or "/dev"
    nv = sorted(int(n[6:]) for n in _listdir(dev_dir) if n.startswith("nvidia") and n[6:].isdigit())
    vendor = cfg.vendor
    if vendor == "auto":
        vendor = "amd" if not nv and os.path.exists(f"{dev_dir}/kfd") else "nvidia"
    if vendor not in ("nvidia", "amd"):
        raise UsageError(f"config gpu.vendor must be auto, nvidia or amd (got {cfg.vendor!r})")
    if vendor == "amd":
        render = sorted(int(n[7:]) for n in _listdir(f"{dev_dir}/dri") if n.startswith("renderD") and n[7:].isdigit())
        present = list(range(len(render)))
        if not present or not is_chardev(f"{dev_dir}/kfd"):
            raise UsageError(f"--gpus: no AMD GPU devices ({dev_dir}/kfd and {dev_dir}/dri/renderD*) found")
        chosen = _choose(request, present, allocation(env_map, "amd"), f"{dev_dir}/dri/renderD for GPU ")
    else:
        if not nv:
            raise UsageError(f"--gpus: no NVIDIA GPU devices found in {dev_dir}")
        chosen = _choose(request, nv, allocation(env_map), f"{dev_dir}/nvidia")
    out = GpuPlan(visible=chosen)
    kind = f"{vendor}.com/gpu"
    if cfg.cdi:
        specs, notes = load_cdi(cfg, cache_root)
        have = {d["name"] for s in specs if s["kind"] == kind for d in s["devices"]}
        whole = request in ("all", "") and allocation(env_map, vendor) is None
        names = ["all"] if whole else [str(i) for i in chosen]
        if have and (whole or all(n in have for n in names)):
            apply_cdi(out, specs, [f"{kind}={n}" for n in names], notes)
            _visible_env(out, vendor, chosen)
            return out
        if have:                            # e.g. a spec naming devices by UUID only: our own discovery
            out.notes.append(f"the CDI spec for {kind} names no device {', '.join(n for n in names if n not in have)}"
                             f" (it has {', '.join(sorted(have))}): --gpus finds the driver itself")
    if vendor == "amd":
        out.binds.append(Bind(f"{dev_dir}/kfd", "/dev/kfd", device=True))
        for i in chosen:
            out.binds.append(Bind(f"{dev_dir}/dri/renderD{render[i]}", f"/dev/dri/renderD{render[i]}", device=True))
    else:
        for i in chosen:
            out.binds.append(Bind(f"{dev_dir}/nvidia{i}", f"/dev/nvidia{i}", device=True))
        for n in _CTL_DEVICES:
            if is_chardev(f"{dev_dir}/{n}"):
                out.binds.append(Bind(f"{dev_dir}/{n}", f"/dev/{n}", device=True))
        if os.path.isdir(f"{dev_dir}/nvidia-caps"):
            out.binds.append(Bind(f"{dev_dir}/nvidia-caps", "/dev/nvidia-caps", device=True))
    from nagaya.runtime import gpudisc

    found = gpudisc.discover(cfg, vendor, cache_root, env_map.get("PATH", "/usr/bin:/bin"))
    for src, name in found["libs"]:
        out.binds.append(Bind(src, f"{GPU_LIB_DIR}/{name}", readonly=True))
    for name, target in found["links"]:
        out.links[f"{GPU_LIB_DIR}/{name}"] = target
    for src, name in found["bins"]:
        out.binds.append(Bind(src, f"{GPU_BIN_DIR}/{name}", readonly=True))
    for src, dst in found["files"]:
        out.binds.append(Bind(src, dst, readonly=not dst.endswith("/socket")))
    if not found["cached"]:
        out.notes += found["notes"]         # once per driver: later runs take the cached result
    out.paths = True
    out.source = vendor
    _visible_env(out, vendor, chosen)
    return out


def _visible_env(out: GpuPlan, vendor: str, chosen: list[int]) -> None:
    # Only the chosen devices exist inside, and CUDA/ROCm number what they can open from 0: a host value
    # (Slurm's global indices, say "2,3") would point past them.
    inside = ",".join(str(i) for i in range(len(chosen)))
    if vendor == "amd":
        out.env["ROCR_VISIBLE_DEVICES"] = inside
        out.env["HIP_VISIBLE_DEVICES"] = inside
    else:
        out.env["NVIDIA_VISIBLE_DEVICES"] = ",".join(str(i) for i in chosen)
        out.env["CUDA_VISIBLE_DEVICES"] = inside


def load_cdi(cfg: GpuConfig, cache_root: str) -> tuple[list[dict[str, Any]], list[str]]:
    if not any(os.path.isdir(d) for d in cfg.cdi_dirs):
        return [], []                       # the common case costs two stat calls
    from nagaya.runtime import cdi

    cache = os.path.join(cache_root, "gpu", f"{os.uname().nodename}-cdi.marshal") if cache_root and cfg.cache else ""
    return cdi.load(cfg.cdi_dirs, cache)


def device_plan(requests: list[str], cfg: GpuConfig, cache_root: str = "", into: GpuPlan | None = None) -> GpuPlan:
    """`--device vendor.com/class=name ...`: the named CDI devices' edits."""
    from nagaya.runtime import cdi

    for r in requests:
        if not cdi.is_device_name(r):
            raise UsageError(f"--device {r!r}: expected a CDI device name, vendor.com/class=name")
    specs, notes = load_cdi(cfg, cache_root)
    out = into if into is not None else GpuPlan()
    apply_cdi(out, specs, requests, notes)
    return out


def apply_cdi(out: GpuPlan, specs: list[dict[str, Any]], requests: list[str], notes: list[str]) -> None:
    from nagaya.runtime import cdi

    out.notes += notes
    for spec, edits_list in cdi.resolve(specs, requests):
        out.source = spec["_file"]
        where = spec["_file"]
        for edits in edits_list:
            for item in edits.get("env") or []:
                k, eq, v = str(item).partition("=")
                if eq and k:
                    out.env[k] = v
            for node in edits.get("deviceNodes") or []:
                if not isinstance(node, dict) or not isinstance(node.get("path"), str):
                    raise UsageError(f"CDI spec {where}: a device node without a path")
                host = str(node.get("hostPath") or node["path"])
                if not is_chardev(host):
                    out.notes.append(f"CDI device node {host} skipped: not a character device on this host")
                    continue
                if all(b.dst != node["path"] for b in out.binds):
                    out.binds.append(Bind(host, node["path"], device=True))
            for m in edits.get("mounts") or []:
                if not isinstance(m, dict) or not m.get("hostPath") or \
                        not str(m.get("containerPath", "")).startswith("/"):
                    raise UsageError(f"CDI spec {where}: a mount needs hostPath and an absolute containerPath")
                if m.get("type") not in (None, "", "bind"):
                    out.notes.append(f"CDI mount of type {m.get('type')} at {m['containerPath']} skipped: "
                                     "only bind mounts are made")
                    continue
                if not os.path.exists(m["hostPath"]):
                    out.notes.append(f"CDI mount source {m['hostPath']} skipped: it does not exist")
                    continue
                opts = [str(o) for o in m.get("options") or []]
                if all(b.dst != m["containerPath"] for b in out.binds):
                    out.binds.append(Bind(str(m["hostPath"]), str(m["containerPath"]), readonly="ro" in opts))
            for h in edits.get("hooks") or []:
                if not isinstance(h, dict) or h.get("hookName") not in cdi.HOOK_NAMES or \
                        not str(h.get("path", "")).startswith("/"):
                    raise UsageError(f"CDI spec {where}: a hook needs a known hookName and an absolute path")
                out.hooks.append({"hookName": h["hookName"], "path": str(h["path"]),
                                  "args": [str(a) for a in h.get("args") or [h["path"]]],
                                  "env": [str(e) for e in h.get("env") or []],
                                  "timeout": int(h.get("timeout") or 30)})


def run_hooks(hooks: list[dict[str, Any]], names: tuple[str, ...], state: dict[str, Any]) -> list[str]:
    """Run the CDI hooks of these kinds as the user (never as root: nagaya has no more rights than the
    user, and an exec by a non-root uid drops the namespace's capabilities), the OCI state on stdin.
    A hook that fails is reported, not fatal: hooks are written for a runtime running as root (nvidia-ctk's
    update-ldcache rewrites the image's /etc/ld.so.cache), which nagaya never is. Returns the warnings."""
    todo = [h for h in hooks if h["hookName"] in names]
    if not todo:
        return []
    import json
    import subprocess

    data = json.dumps(state).encode()
    warnings = []
    for h in todo:
        try:
            r = subprocess.run(h["args"], executable=h["path"], input=data, env=dict(e.partition("=")[::2]
                               for e in h["env"]), capture_output=True, timeout=h["timeout"],
                               preexec_fn=_unblock_signals)
        except (OSError, subprocess.SubprocessError) as e:
            warnings.append(f"CDI {h['hookName']} hook {h['path']} failed: {e}")
            continue
        if r.returncode != 0:
            err = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            warnings.append(f"CDI {h['hookName']} hook {h['path']} failed: {err[0]}")
    return warnings


def _unblock_signals() -> None:
    import _signal

    _signal.pthread_sigmask(_signal.SIG_SETMASK, set())   # the supervisor's blocked set is not the hook's


def _listdir(d: str) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError:
        return []
