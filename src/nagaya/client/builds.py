"""`nagaya build --submit`: the site's build operation (/api/builds, the portal's Build page) from the CLI. The
context directory is packed into a tar here (files and directories only, as the job will accept) and uploaded;
the site builds it as a batch job as you and pushes to the -t name."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path
from typing import Any

from nagaya.errors import UsageError


def pack_context(context: Path, out: Any) -> int:
    """Write `context` as a tar to the file `out`: regular files and directories (links are refused with the
    same message the build job would give). Returns the number of files."""
    if not context.is_dir():
        raise UsageError(f"{context} is not a directory")
    n = 0
    with tarfile.open(fileobj=out, mode="w") as t:
        for p in sorted(context.rglob("*")):
            rel = p.relative_to(context).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise UsageError(f"{rel}: only files and directories can be uploaded (no links or devices)")
            t.add(p, arcname=rel, recursive=False)
            n += p.is_file()
    return n


def submit_build(context: Path, tag: str, file: Path | None, build_args: list[str]) -> dict[str, Any]:
    from nagaya.client import authfile
    from nagaya.client.api import Api
    from nagaya.image.pull import parse_remote

    registry = parse_remote(tag).registry
    login = authfile.current(registry)
    rel = ""
    if file is not None:
        try:
            rel = file.resolve().relative_to(context.resolve()).as_posix()
        except ValueError:
            raise UsageError(f"{file} must lie inside the build context {context}") from None
    with tempfile.TemporaryFile() as tmp:
        pack_context(context, tmp)
        tmp.seek(0)
        api = Api(login.server, login.username, login.secret, timeout=300)
        out: dict[str, Any] = api.post("/api/builds", files={"context": ("context.tar", tmp, "application/x-tar")},
                                       data={"tag": tag, "file": rel, "build_args": "\n".join(build_args)})
    out["url"] = f"{login.server}/builds/{out['id']}"
    return out
