"""The OCI backend: rootless runc with a generated bundle, for sites that need an OCI runtime.

runc runs as root of nagaya's user namespace (which maps uid 0 to one of the user's subordinate ids,
and the user's own uid to itself), inside nagaya's mount and pid namespaces; the container shares
that user namespace (the app runs as the user's own uid) and that pid namespace
(so the app is not pid 1 and keeps normal signal semantics) and the host network. Its state lives in
nagaya's private tmpfs, so nothing is left on disk.
"""

from __future__ import annotations

import json
import os

from nagaya.runtime.backends import SandboxPlan

_DEFAULT_MOUNTS = [
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "bind", "source": "/dev/mqueue",
     "options": ["rbind", "nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
]


class Runc:
    name = "runc"

    def __init__(self, exe: str) -> None:
        self.exe = exe

    def command(self, plan: SandboxPlan) -> tuple[list[str], dict[str, str]]:
        bundle = os.path.join(plan.staging, "bundle")
        os.makedirs(bundle, exist_ok=True)
        mounts = [{"destination": "/proc", "type": "bind", "source": plan.proc,
                   "options": ["rbind", "nosuid", "noexec", "nodev"]}, *_DEFAULT_MOUNTS]
        if not os.path.exists("/dev/mqueue"):
            mounts = [m for m in mounts if m["destination"] != "/dev/mqueue"]
        for dst, src in plan.extra_files.items():
            mounts.append({"destination": dst, "type": "bind", "source": src, "options": ["bind", "ro"]})
        for b in plan.binds:
            opts = ["rbind"] + (["ro"] if b.readonly else []) + ([] if b.device else ["nosuid", "nodev"])
            mounts.append({"destination": b.dst, "type": "bind", "source": b.src, "options": opts})
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": plan.uid, "gid": plan.gid, "additionalGids": [plan.gid]},
                "args": plan.argv,
                "env": [f"{k}={v}" for k, v in plan.env.items()],
                "cwd": plan.cwd,
                "noNewPrivileges": True,
                "capabilities": {"bounding": [], "effective": [], "permitted": [], "inheritable": [], "ambient": []},
            },
            "root": {"path": plan.root, "readonly": plan.readonly},
            "hostname": "",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": "mount"}],
                "maskedPaths": [],
                "readonlyPaths": [],
            },
        }
        del config["hostname"]
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(config, f)
        state = os.path.join(plan.staging, "runc-state")
        cid = f"nagaya-{os.getppid()}-{os.getpid()}"
        log = os.path.join(plan.staging, "runc.log")
        argv = [self.exe, "--root", state, "--rootless", "true", "--log", log, "run", "--no-new-keyring",
                "--bundle", bundle, cid]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "XDG_RUNTIME_DIR": state}
        return argv, env
