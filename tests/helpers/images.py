"""Test images made here from Debian's busybox-static: rootfs trees, tarballs, OCI layouts/archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TRAP_SH = """#!/bin/sh
# Records the signals it gets; exits 3 on TERM.
out="$1"
for s in INT HUP USR1 USR2 QUIT ALRM; do trap "echo $s >> $out" $s; done
trap "echo TERM >> $out; exit 3" TERM
echo ready >> "$out"
while :; do sleep 0.05; done
"""
TICK_SH = """#!/bin/sh
# Appends a tick every 50 ms.
out="$1"; n=0
while :; do n=$((n+1)); echo $n > "$out"; sleep 0.05; done
"""
EP_SH = """#!/bin/sh
echo "ep $*"
pwd
"""


def busybox_rootfs(dest: Path) -> Path:
    subprocess.run(["bash", str(REPO / "deploy" / "make-busybox-rootfs.sh"), str(dest)], check=True,
                   capture_output=True)
    app = dest / "app"
    app.mkdir()
    for name, body in (("trap.sh", TRAP_SH), ("tick.sh", TICK_SH), ("ep.sh", EP_SH)):
        (app / name).write_text(body)
        (app / name).chmod(0o755)
    (app / "data.txt").write_text("image data\n")
    (app / "noexec.sh").write_text("#!/bin/sh\necho no\n")
    (app / "noexec.sh").chmod(0o644)
    for root, dirs, files in os.walk(dest):
        for n in dirs + files:
            p = os.path.join(root, n)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444 | (0o111 if os.path.isdir(p) else 0))
    return dest


def tar_bytes(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            if isinstance(e, tuple):
                info, data = e
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(e)
    return buf.getvalue()


def entry(name: str, kind: str = "file", data: bytes = b"", mode: int = 0o644, link: str = "",
          uid: int = 0) -> tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]:
    t = tarfile.TarInfo(name)
    t.mode, t.uid, t.gid, t.mtime = mode, uid, uid, 1700000000
    if kind == "file":
        return (t, data)
    t.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
              "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    if kind == "dir":
        t.mode = mode if mode != 0o644 else 0o755
    t.linkname = link
    if kind in ("chr", "blk"):
        t.devmajor, t.devminor = 8, 0
    return t


def dir_tar(src: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for n in sorted(os.listdir(src)):
            t.add(src / n, arcname=n)
    return buf.getvalue()


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    d = hashlib.sha256(data).hexdigest()
    p = layout / "blobs" / "sha256" / d
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return "sha256:" + d, len(data)


def oci_layout(dest: Path, layers: list[bytes], config: dict, tag: str = "latest", arch: str = "amd64",
               corrupt_layer: bool = False) -> Path:
    """Write an OCI image layout: gzip layers, a config with diff_ids, a manifest, an index."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        gz = gzip.compress(raw, mtime=0)
        d, n = _blob(dest, gz)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n})
        if corrupt_layer:
            p = dest / "blobs" / "sha256" / d[7:]
            p.write_bytes(gz[:-10] + b"X" * 10)
    cfg = {"architecture": arch, "os": "linux", "config": config,
           "rootfs": {"type": "layers", "diff_ids": diff_ids}, "created": "2026-01-01T00:00:00Z"}
    cd, cn = _blob(dest, json.dumps(cfg).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
                "layers": descs}
    md, mn = _blob(dest, json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def oci_archive(layout: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as t:
        for n in sorted(os.listdir(layout)):
            t.add(layout / n, arcname=n)
    return dest
