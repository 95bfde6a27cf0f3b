"""A Jupyter image built by the tests: Debian 12 (debootstrap, minbase) with Debian's own Jupyter packages
(python3-notebook, python3-ipykernel), as a one-layer OCI archive.

It takes minutes and some 500 MB, so it is built once per machine and kept in CACHE (keyed by VERSION and
the package list); a later run, or another test file, reuses the archive. debootstrap resolves no virtual
packages, so the providers it misses (python3-cffi-backend for python3-zmq, libboost-regex for gdb) are named."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import images

CACHE = Path(os.environ.get("NAGAYA_TEST_CACHE", "/var/cache/nagaya-tests"))
SUITE, MIRROR = "bookworm", os.environ.get("NAGAYA_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("python3-notebook", "python3-ipykernel", "python3-cffi-backend", "libboost-regex1.74.0")
VERSION = 1
PRUNE = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale",
         "usr/share/info")


def _key() -> str:
    return hashlib.sha256(f"{VERSION} {SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]


def rootfs() -> Path:
    """The debootstrapped tree (cached); built as root with the system's debootstrap."""
    dest = CACHE / f"jupyter-rootfs-{_key()}"
    if (dest / ".complete").exists():
        return dest
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (bash deploy/install.sh)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="jupyter-rootfs.", dir=CACHE))
    try:
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                            str(tmp), MIRROR], capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"debootstrap failed: {(r.stderr or r.stdout)[-2000:]}")
        for sub in PRUNE:
            shutil.rmtree(tmp / sub, ignore_errors=True)
        (tmp / ".complete").write_text(_key())
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def archive() -> Path:
    """The OCI archive of `rootfs()` (cached beside it), world-readable for skopeo run as a test user."""
    out = CACHE / f"jupyter-{_key()}.oci.tar"
    if out.exists():
        return out
    root = rootfs()
    work = Path(tempfile.mkdtemp(prefix="jupyter-oci.", dir=CACHE))
    try:
        layer = images.dir_tar(root)
        layout = images.oci_layout(work / "layout", [layer], {
            "Cmd": ["/bin/bash"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]})
        del layer
        images.oci_archive(layout, work / "img.tar")
        (work / "img.tar").chmod(0o644)
        (work / "img.tar").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
