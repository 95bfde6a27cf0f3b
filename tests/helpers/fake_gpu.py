"""Fake NVIDIA GPUs for passthrough tests: /dev/nvidiaN character devices (major 195, as the driver's),
nvidiactl, fake driver libraries and a fake nvidia-smi, plus the environment that points nagaya at them."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path


def tiny_elf(message: str, machine: str = "x86_64") -> bytes:
    """A static x86-64 ELF executable that prints `message` and exits 0: a driver tool that is a real ELF
    binary (not a script) and runs in any image, busybox's included."""
    assert machine == "x86_64"
    msg = message.encode()
    code = (b"\xb8\x01\x00\x00\x00" + b"\xbf\x01\x00\x00\x00"          # mov eax,1 (write); mov edi,1
            + b"\x48\x8d\x35" + struct.pack("<i", 16)                      # lea rsi,[rip+16]: the message
            + b"\xba" + struct.pack("<I", len(msg)) + b"\x0f\x05"           # mov edx,len; syscall
            + b"\xb8\x3c\x00\x00\x00\x31\xff\x0f\x05")                   # exit(0)
    base, start = 0x400000, 64 + 56
    size = start + len(code) + len(msg)
    ehdr = (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, base + start, 64, 0, 0,
                                                             64, 56, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code + msg


def fake_gpus(root: Path, count: int = 2) -> dict[str, str]:
    subprocess.run(["rm", "-rf", str(root)], check=True)
    (root / "dev").mkdir(parents=True)
    for i in range(count):
        os.mknod(root / "dev" / f"nvidia{i}", 0o666 | 0o020000, os.makedev(195, i))
    os.mknod(root / "dev" / "nvidiactl", 0o666 | 0o020000, os.makedev(195, 255))
    (root / "lib").mkdir()
    (root / "lib" / "libcuda.so.550.54").write_text("fake cuda driver\n")
    os.symlink("libcuda.so.550.54", root / "lib" / "libcuda.so.1")
    (root / "lib" / "libnvidia-ml.so.1").write_text("fake nvml\n")
    (root / "bin").mkdir()
    (root / "bin" / "nvidia-smi").write_bytes(tiny_elf("NVIDIA-SMI fake\n"))   # the driver's tools are ELF
    (root / "bin" / "nvidia-smi").chmod(0o755)
    root.chmod(0o755)
    return {"NAGAYA_GPU_DEV_DIR": str(root / "dev"), "NAGAYA_GPU_LIB_DIRS": str(root / "lib"),
            "NAGAYA_GPU_BIN_DIRS": str(root / "bin")}


def gpu_locks(env: dict[str, str], root: Path) -> dict[str, str]:
    """The node's GPU lock directory for the fake devices in `env` (made by root, as a site's admin does once
    with `nagaya job prepare-node`): schedulers that count GPUs hand out indices through it."""
    env = {**env, "NAGAYA_SCHED_GPU_LOCK_DIR": str(root / "gpu-locks")}
    r = subprocess.run(["nagaya", "job", "prepare-node"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env})
    if r.returncode != 0:
        raise RuntimeError(f"nagaya job prepare-node: {r.stderr}")
    return env
