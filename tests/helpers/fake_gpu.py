"""Fake NVIDIA GPUs for passthrough tests: /dev/nvidiaN character devices (major 195, as the driver's),
nvidiactl, fake driver libraries and a fake nvidia-smi, plus the environment that points nagaya at them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


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
    (root / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI fake'\n")
    (root / "bin" / "nvidia-smi").chmod(0o755)
    root.chmod(0o755)
    return {"NAGAYA_GPU_DEV_DIR": str(root / "dev"), "NAGAYA_GPU_LIB_DIRS": str(root / "lib"),
            "NAGAYA_GPU_BIN_DIRS": str(root / "bin")}
