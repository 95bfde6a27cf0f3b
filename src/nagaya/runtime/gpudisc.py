"""Finding a GPU driver's user-space files as the driver installed them, the way the NVIDIA Container
Toolkit does, cached per node so that a run pays for it once per driver (or ld.so.cache) change.

Sources, in order: `nvidia-container-cli list` where it is installed (it knows the driver's own file
list); otherwise each library name is looked up in the configured directories and then in the ld.so cache
(read directly, runtime/ldcache.py), and each tool on PATH and then the configured directories. Kept:
- binaries that are ELF files: a wrapper script (/usr/bin/nvidia-smi on some nodes) is passed over for
  the next candidate on PATH, with a note;
- libraries whose version suffix, where it has the driver's form (580.65.06), is the loaded kernel
  module's (/proc/driver/nvidia/version, or /sys/module/nvidia/version): a stale libcuda from an older
  driver left in /usr/lib would fail with "driver/library version mismatch";
- firmware (/lib/firmware/nvidia/VERSION), the ICD files of Vulkan, EGL and OpenCL, the persistenced
  socket.
The result is plain data (marshal-able): lists of (host path, container name) and (link, target) pairs.
"""

from __future__ import annotations

import marshal
import os

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from typing import Any

    from nagaya.config import GpuConfig

CACHE_FORMAT = 1
# ICD and vendor files the GL/EGL/Vulkan/OpenCL loaders read; bound at the same path inside. Their
# library_path is a bare soname, which the loader finds on LD_LIBRARY_PATH.
NVIDIA_ICDS = ("/etc/vulkan/icd.d/nvidia_icd.json", "/usr/share/vulkan/icd.d/nvidia_icd.json",
               "/etc/vulkan/implicit_layer.d/nvidia_layers.json",
               "/usr/share/vulkan/implicit_layer.d/nvidia_layers.json",
               "/usr/share/glvnd/egl_vendor.d/10_nvidia.json", "/etc/OpenCL/vendors/nvidia.icd",
               "/usr/share/egl/egl_external_platform.d/15_nvidia_gbm.json",
               "/usr/share/egl/egl_external_platform.d/10_nvidia_wayland.json")
NVIDIA_IPCS = ("/run/nvidia-persistenced/socket",)


def driver_version(cfg: GpuConfig) -> str:
    """The loaded kernel module's version ("" when none is loaded or the files are unreadable)."""
    root = cfg.root.rstrip("/")
    try:
        with open(root + "/proc/driver/nvidia/version", "rb") as f:
            text = f.read(4096).decode("utf-8", "replace")
        # "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (...)"
        for line in text.splitlines():
            if line.startswith("NVRM version:"):
                for word in line.split():
                    if _is_driver_version(word):
                        return word
    except OSError:
        pass
    try:
        with open(root + "/sys/module/nvidia/version", "rb") as f:
            v = f.read(64).decode("ascii", "replace").strip()
            return v if _is_driver_version(v) else ""
    except OSError:
        return ""


def _is_driver_version(word: str) -> bool:
    parts = word.split(".")
    return 2 <= len(parts) <= 3 and all(p.isdigit() for p in parts) and len(parts[0]) >= 3


def _so_version(name: str) -> str:
    """"580.65.06" for libcuda.so.580.65.06; "" for names without a driver-like version."""
    i = name.find(".so.")
    if i < 0:
        return ""
    v = name[i + 4:]
    return v if _is_driver_version(v) else ""


def discover(cfg: GpuConfig, vendor: str, cache_root: str, env_path: str) -> dict[str, Any]:
    """The driver's files for `vendor` ("nvidia" or "amd"), from the per-node cache when it still holds."""
    root = cfg.root.rstrip("/")
    version = driver_version(cfg) if vendor == "nvidia" else ""
    try:
        st = os.stat(root + "/etc/ld.so.cache")
        ld_sig: tuple[int, ...] = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        ld_sig = ()
    path = cfg.path or env_path
    libs, lib_dirs = (cfg.libs, cfg.lib_dirs) if vendor == "nvidia" else (cfg.amd_libs, cfg.rocm_dirs)
    bins = cfg.bins if vendor == "nvidia" else cfg.amd_bins
    # The directories searched, by identity and mtime: a driver installed or removed there renames or
    # unlinks files in them (a stat each: microseconds), as does ldconfig with its cache.
    dirs = [*lib_dirs, *path.split(":"), *cfg.bin_dirs]
    key = (CACHE_FORMAT, vendor, version, ld_sig, root, path, tuple(libs), tuple(lib_dirs), tuple(bins),
           tuple(cfg.bin_dirs), cfg.container_cli, tuple(_dir_sig(d) for d in dirs))
    cache_file = os.path.join(cache_root, "gpu", f"{os.uname().nodename}-{vendor}.marshal") if cfg.cache else ""
    if cache_file:
        try:
            with open(cache_file, "rb") as f:
                saved = marshal.loads(f.read())
            if isinstance(saved, dict) and saved.get("key") == key:
                result: dict[str, Any] = saved["result"]
                result["cached"] = True
                return result
        except (OSError, EOFError, ValueError, TypeError, KeyError):
            pass
    result = _scan(cfg, vendor, version, path, libs, lib_dirs, bins)
    if cache_file:
        _save(cache_file, {"key": key, "result": result})
    result["cached"] = False
    return result


def _dir_sig(d: str) -> tuple[int, ...]:
    try:
        st = os.stat(d)
    except OSError:
        return ()
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _save(path: str, data: dict[str, Any]) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(marshal.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass                                # a read-only cache: discovery just runs again next time


def _scan(cfg: GpuConfig, vendor: str, version: str, path: str, libs: list[str], lib_dirs: list[str],
          bins: list[str]) -> dict[str, Any]:
    from nagaya.runtime import elf

    root = cfg.root.rstrip("/")
    res: dict[str, Any] = {"vendor": vendor, "version": version, "source": "search", "libs": [], "links": [],
                           "bins": [], "files": [], "notes": []}
    listed = _container_cli(cfg, path) if vendor == "nvidia" else None
    bound: set[str] = set()
    link_names: set[str] = set()
    stale: set[str] = set()

    def add_lib(name: str, p: str) -> None:
        real = os.path.realpath(p)
        base = os.path.basename(real)
        if not os.path.isfile(real):
            return
        rv = _so_version(base)
        if version and rv and rv != version:
            if real not in stale:
                stale.add(real)
                res["notes"].append(f"skipped {p}: version {rv}, but the loaded driver is {version}")
            return
        if base not in bound:
            bound.add(base)
            res["libs"].append((real, base))
            so = elf.soname(real)
            if so and so != base and so not in link_names:
                link_names.add(so)
                res["links"].append((so, base))
        if name != base and name not in link_names and name not in bound:
            link_names.add(name)
            res["links"].append((name, base))

    if listed is not None:
        res["source"] = "nvidia-container-cli"
        for p in listed:
            b = os.path.basename(p)
            if ".so" in b:
                add_lib(b, p)
            elif p.startswith(("/lib/firmware/", "/usr/lib/firmware/", "/run/", "/var/run/")):
                res["files"].append((p, p))         # firmware and the persistenced socket
            elif (b in bins or os.access(p, os.X_OK)) and elf.is_elf(p):
                res["bins"].append((os.path.realpath(p), b))
    else:
        cache = None
        for lib in libs:
            found = [(n, os.path.join(d, n)) for d in lib_dirs for n in _listdir(d) if n.startswith(lib)]
            if not found:
                if cache is None:
                    from nagaya.runtime import ldcache

                    cache = ldcache.read(root + "/etc/ld.so.cache")
                found = [(n, p) for n, p in cache if n.startswith(lib)]
            # the real files first, so that names that are links are recorded as links to them
            for name, p in sorted(found, key=lambda np: os.path.islink(np[1])):
                add_lib(name, p)
        dirs = [d for d in path.split(":") if d] + [d for d in cfg.bin_dirs if d]
        for tool in bins:
            scripts = []
            for d in dirs:
                p = os.path.join(d, tool)
                if not (os.path.isfile(p) and os.access(p, os.X_OK)):
                    continue
                if not elf.is_elf(p):
                    scripts.append(p)           # a wrapper: the driver's binary may come later on PATH
                    continue
                res["bins"].append((os.path.realpath(p), tool))
                if scripts:
                    res["notes"].append(f"{tool}: passed over the script(s) {', '.join(scripts)} for {p}")
                break
            else:
                if scripts:
                    res["notes"].append(f"{tool}: only script(s) found ({', '.join(scripts)}), no ELF binary: "
                                        "not passed through")
        if vendor == "nvidia" and version:
            fw = f"{root}/lib/firmware/nvidia/{version}"
            if os.path.isdir(fw):
                res["files"].append((fw, f"/lib/firmware/nvidia/{version}"))
        if vendor == "nvidia":
            for ipc in NVIDIA_IPCS:
                if os.path.exists(root + ipc):
                    res["files"].append((root + ipc, ipc))
    if vendor == "nvidia":
        for icd in NVIDIA_ICDS:
            if os.path.isfile(root + icd):
                res["files"].append((root + icd, icd))
    return res


def _container_cli(cfg: GpuConfig, path: str) -> list[str] | None:
    """The driver's files as `nvidia-container-cli list` names them (libraries, binaries, firmware, IPC
    sockets; device nodes are ours to choose), or None where it is not installed or fails."""
    exe = cfg.container_cli
    if not exe:
        return None
    if "/" not in exe:
        for d in [*path.split(":"), "/usr/bin", "/usr/local/bin"]:
            if d and os.access(os.path.join(d, exe), os.X_OK):
                exe = os.path.join(d, exe)
                break
        else:
            return None
    if not os.access(exe, os.X_OK):
        return None
    import subprocess

    try:
        r = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return [line.strip() for line in r.stdout.splitlines() if line.startswith("/") and not line.startswith("/dev/")]


def _listdir(d: str) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError:
        return []
