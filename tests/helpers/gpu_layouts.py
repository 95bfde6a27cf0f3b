"""Fake GPU driver installations modelled on real ones, for discovery and passthrough tests.

Each builder makes a tree under `root` (readable by everyone) and returns the NAGAYA_GPU_* settings that
point nagaya at it. Libraries are small ELF shared objects with the driver's SONAMEs; tools are static ELF
programs that print their name (tiny_elf), so they run in a busybox image; device nodes are real
character devices (mknod, as root). Layouts:
- debian:   Debian/Ubuntu packages: /usr/lib/x86_64-linux-gnu, /usr/bin, found through the ld.so cache;
- runfile:  NVIDIA's .run installer on RHEL: /usr/lib64 (a configured lib dir) with a stale 550 libcuda
            left by the previous driver, the version from /sys/module/nvidia/version;
- local:    a /usr/local/nvidia tree (cloud images, container-toolkit hosts) with wrapper scripts in
            /usr/bin ahead of it on PATH;
- amd:      ROCm under /opt/rocm with /dev/kfd and two render nodes.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

from nagaya.runtime import ldcache
from tests.helpers.fake_gpu import tiny_elf

VERSION = "580.65.06"
OLD = "550.54.15"
# name -> SONAME, as the 580 driver ships them
NV_LIBS = {"libcuda.so": "libcuda.so.1", "libnvidia-ml.so": "libnvidia-ml.so.1",
           "libnvidia-ptxjitcompiler.so": "libnvidia-ptxjitcompiler.so.1",
           "libnvidia-opencl.so": "libnvidia-opencl.so.1",
           "libEGL_nvidia.so": "libEGL_nvidia.so.0", "libGLX_nvidia.so": "libGLX_nvidia.so.0"}


def fake_so(soname: str, payload: str = "") -> bytes:
    """A 64-bit ELF shared object with a PT_DYNAMIC naming `soname`: what elf.soname and ldconfig read."""
    strtab = b"\0" + soname.encode() + b"\0" + payload.encode() + b"\0"
    base_off = 64 + 2 * 56
    dyn = struct.pack("<qQqQqQ", 5, base_off + 48, 14, 1, 0, 0)     # DT_STRTAB, DT_SONAME, DT_NULL
    size = base_off + len(dyn) + len(strtab)
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 4, 0, 0, 0, size, size, 0x1000)
    dynamic = struct.pack("<IIQQQQQQ", 2, 4, base_off, base_off, base_off, len(dyn), len(dyn), 8)
    return ehdr + load + dynamic + dyn + strtab


def _write(p: Path, data: bytes | str, mode: int = 0o644) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    p.write_bytes(data)
    p.chmod(mode)
    return p


def _link(p: Path, target: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, p)


def _nv_libs(d: Path, version: str) -> list[tuple[str, str]]:
    """The driver's libraries in `d` with their soname and dev links, as the packages install them; the
    ld.so cache entries ldconfig would make (soname and .so links)."""
    entries = []
    for name, so in NV_LIBS.items():
        real = f"{name}.{version}"
        _write(d / real, fake_so(so, f"{name} {version}"))
        _link(d / so, real)
        entries.append((so, str(d / so)))
        if name == "libcuda.so":
            _link(d / name, so)
            entries.append((name, str(d / name)))
    return entries


def _devices(root: Path, count: int) -> None:
    dev = root / "dev"
    dev.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        os.mknod(dev / f"nvidia{i}", 0o666 | 0o020000, os.makedev(195, i))
    os.mknod(dev / "nvidiactl", 0o666 | 0o020000, os.makedev(195, 255))
    os.mknod(dev / "nvidia-uvm", 0o666 | 0o020000, os.makedev(511, 0))
    _write(dev / "nvidia-modeset", "a regular file, not a device: never bound\n")


def _proc_version(root: Path, version: str) -> None:
    _write(root / "proc/driver/nvidia/version",
           f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {version}  Release Build  (dvs-builder@U16)\n"
           "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")


def _icds(root: Path) -> None:
    _write(root / "usr/share/vulkan/icd.d/nvidia_icd.json",
           json.dumps({"file_format_version": "1.0.1", "ICD": {"library_path": "libGLX_nvidia.so.0"}}))
    _write(root / "usr/share/glvnd/egl_vendor.d/10_nvidia.json",
           json.dumps({"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}))
    _write(root / "etc/OpenCL/vendors/nvidia.icd", "libnvidia-opencl.so.1\n")


def _fresh(root: Path) -> None:
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)


def _done(root: Path, env: dict[str, str]) -> dict[str, str]:
    for d, dirs, _files in os.walk(root):
        os.chmod(d, 0o755)
        for x in dirs:
            os.chmod(os.path.join(d, x), 0o755)
    env.setdefault("NAGAYA_GPU_DEV_DIR", str(root / "dev"))
    env.setdefault("NAGAYA_GPU_ROOT", str(root))
    env.setdefault("NAGAYA_GPU_LIB_DIRS", "")
    env.setdefault("NAGAYA_GPU_BIN_DIRS", "")
    env.setdefault("NAGAYA_GPU_CDI_DIRS", str(root / "etc/cdi"))
    env.setdefault("NAGAYA_GPU_CONTAINER_CLI", "")
    return env


def debian(root: Path, count: int = 2) -> dict[str, str]:
    _fresh(root)
    _devices(root, count)
    _proc_version(root, VERSION)
    lib = root / "usr/lib/x86_64-linux-gnu"
    entries = _nv_libs(lib, VERSION)
    # another package's library in the same directory: never bound
    _write(lib / "libz.so.1.2.13", fake_so("libz.so.1"))
    _link(lib / "libz.so.1", "libz.so.1.2.13")
    entries.append(("libz.so.1", str(lib / "libz.so.1")))
    _write(root / "etc/ld.so.cache", ldcache.build(entries))
    for tool in ("nvidia-smi", "nvidia-debugdump"):
        _write(root / "usr/bin" / tool, tiny_elf(f"{tool} {VERSION}\n"), 0o755)
    _write(root / f"lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin", b"\0firmware")
    _write(root / f"lib/firmware/nvidia/{OLD}/gsp_ga10x.bin", b"\0old firmware")
    _icds(root)
    return _done(root, {"NAGAYA_GPU_PATH": str(root / "usr/bin")})


def runfile(root: Path, count: int = 1) -> dict[str, str]:
    _fresh(root)
    _devices(root, count)
    _write(root / "sys/module/nvidia/version", VERSION + "\n")      # no /proc file: the /sys fallback
    lib = root / "usr/lib64"
    _nv_libs(lib, VERSION)
    # the previous driver's libcuda, left behind by an upgrade: a version mismatch if it were loaded
    _write(lib / f"libcuda.so.{OLD}", fake_so("libcuda.so.1", OLD))
    _write(lib / f"libnvidia-ml.so.{OLD}", fake_so("libnvidia-ml.so.1", OLD))
    for tool in ("nvidia-smi", "nvidia-debugdump"):
        _write(root / "usr/bin" / tool, tiny_elf(f"{tool} {VERSION}\n"), 0o755)
    return _done(root, {"NAGAYA_GPU_PATH": str(root / "usr/bin"), "NAGAYA_GPU_LIB_DIRS": str(lib)})


def local(root: Path, count: int = 2) -> dict[str, str]:
    _fresh(root)
    _devices(root, count)
    _proc_version(root, VERSION)
    top = root / "usr/local/nvidia"
    entries = _nv_libs(top / "lib64", VERSION)
    _write(root / "etc/ld.so.cache", ldcache.build(entries))
    _write(top / "bin/nvidia-smi", tiny_elf(f"nvidia-smi {VERSION} (local)\n"), 0o755)
    # the node's wrappers, earlier on PATH: scripts, never bound
    _write(root / "usr/bin/nvidia-smi", f"#!/bin/sh\nexec {top}/bin/nvidia-smi \"$@\"\n", 0o755)
    _write(root / "usr/bin/nvidia-debugdump", "#!/bin/sh\necho no debugdump here\n", 0o755)
    return _done(root, {"NAGAYA_GPU_PATH": f"{root}/usr/bin:{top}/bin"})


def amd(root: Path, count: int = 2) -> dict[str, str]:
    _fresh(root)
    dev = root / "dev"
    (dev / "dri").mkdir(parents=True)
    os.mknod(dev / "kfd", 0o666 | 0o020000, os.makedev(235, 0))
    for i in range(count):
        os.mknod(dev / "dri" / f"renderD{128 + i}", 0o666 | 0o020000, os.makedev(226, 128 + i))
        os.mknod(dev / "dri" / f"card{i}", 0o666 | 0o020000, os.makedev(226, i))
    rocm = root / "opt/rocm/lib"
    for name, so, ver in (("libamdhip64.so", "libamdhip64.so.6", "6.1.40091"),
                          ("libhsa-runtime64.so", "libhsa-runtime64.so.1", "1.13.60100"),
                          ("librocm_smi64.so", "librocm_smi64.so.7", "7.2.60100")):
        _write(rocm / f"{name}.{ver}", fake_so(so))
        _link(rocm / so, f"{name}.{ver}")
        _link(rocm / name, so)
    _write(root / "opt/rocm/bin/rocm-smi", tiny_elf("rocm-smi fake\n"), 0o755)
    return _done(root, {"NAGAYA_GPU_PATH": str(root / "opt/rocm/bin"), "NAGAYA_GPU_ROCM_DIRS": str(rocm),
                        "NAGAYA_GPU_VENDOR": "auto"})


def cdi_spec(root: Path, name: str, spec: dict, yaml_text: bool = False) -> Path:
    """A root-owned spec in root's CDI directory of the layout (root/etc/cdi, 0755)."""
    d = root / "etc/cdi"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    for p in (root / "etc", root):
        p.chmod(0o755)
    if yaml_text:
        import yaml

        text = yaml.safe_dump(spec)
    else:
        text = json.dumps(spec)
    return _write(d / name, text)
