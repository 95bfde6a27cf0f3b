"""A fake driver layout's NAGAYA_GPU_* settings (tests/helpers/gpu_layouts.py) as a user config file instead:
the compiled starter hands every run with a NAGAYA_ variable to Python, so a --gpus run it replays must
take its settings from a file."""

from __future__ import annotations

import json
from pathlib import Path

LISTS = {"libs", "bins", "lib_dirs", "bin_dirs", "cdi_dirs", "amd_libs", "amd_bins", "rocm_dirs"}


def write_user_config(env: dict[str, str], config_home: Path) -> Path:
    """$XDG_CONFIG_HOME/nagaya/nagaya.toml with a [gpu] table equal to `env`; returns the file."""
    lines = ["[gpu]"]
    for k, v in env.items():
        key = k.removeprefix("NAGAYA_GPU_").lower()
        value = [x for x in v.split(":") if x] if key in LISTS else v
        lines.append(f"{key} = {json.dumps(value)}")
    f = config_home / "nagaya" / "nagaya.toml"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("\n".join(lines) + "\n")
    for p in (config_home, f.parent, f):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return f
