"""`nagaya image export`: one file holding an image, importable anywhere with `nagaya image import FILE`.

The file is an OCI archive (a tar of an OCI image layout: oci-layout, index.json, blobs/sha256/...), not
the squashfs: the squashfs is a per-machine cache artefact (compressor, tar2sqfs version), while the
layout carries the manifest digest, config and layers, so the image keeps its identity (same digest) on
the other machine, and skopeo, podman and Apptainer (`apptainer build x.sif oci-archive:FILE`) read it too.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from pathlib import Path

from nagaya.image.importer import write_oci_layout
from nagaya.image.store import ImageMeta, ImageStore


def export_image(store: ImageStore, meta: ImageMeta, dest: Path, tag: str = "latest") -> int:
    """Write the archive atomically (temp file + rename); returns its size."""
    dest = dest.expanduser()
    with store.tmpdir("export-") as work:
        layout = work / "layout"
        write_oci_layout(store, meta, layout, tag)
        fd, tmp = tempfile.mkstemp(dir=dest.parent if str(dest.parent) else ".", prefix=f".{dest.name}.")
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as t:
                for name in ("oci-layout", "index.json"):
                    t.add(layout / name, arcname=name, filter=_plain)
                t.add(layout / "blobs", arcname="blobs", recursive=False, filter=_plain)
                t.add(layout / "blobs" / "sha256", arcname="blobs/sha256", recursive=False, filter=_plain)
                for blob in sorted((layout / "blobs" / "sha256").iterdir()):
                    t.add(blob, arcname=f"blobs/sha256/{blob.name}", filter=_plain)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return dest.stat().st_size


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner names or ids of this machine in the archive."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
