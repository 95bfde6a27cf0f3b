"""`nagaya images` and `nagaya image import|inspect|rm|export|tag`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from nagaya import audit, config
from nagaya.cli.common import byte_progress, console, fail, print_json
from nagaya.errors import NagayaError, UsageError
from nagaya.image.store import ImageMeta, open_store
from nagaya.units import format_size

app = typer.Typer(help="Manage images in your cache.", no_args_is_help=True)


def _store():
    cfg = config.load()
    return cfg, open_store(cfg)


def _created(meta: ImageMeta) -> str:
    return meta.created or meta.imported


def images(json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
           digests: bool = typer.Option(False, "--digests", help="show full digests")) -> None:
    """List the images in your cache."""
    try:
        _cfg, store = _store()
        rows = store.list_images()
    except NagayaError as e:
        fail(e)
    if json_out:
        print_json([{"name": r.name, "tag": r.tag, "digest": r.meta.digest, "size": r.meta.squashfs_size,
                     "created": _created(r.meta), "imported": r.meta.imported} for r in rows])
        return
    t = Table(box=None, header_style="bold")
    for col in ("NAME", "TAG", "DIGEST", "SIZE", "CREATED"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.name, r.tag, r.meta.digest if digests else r.meta.digest[:19], format_size(r.meta.squashfs_size),
                  _created(r.meta).replace("T", " ")[:19])
    console.print(t)


@app.command("import")
def import_(src: Path = typer.Argument(..., help="rootfs tarball or directory, OCI layout dir or OCI archive"),
            name: str = typer.Option(..., "--name", "-n", help="NAME[:TAG] to give the image"),
            json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Import an image from local files into your cache (stored once per content digest)."""
    from nagaya.image.importer import Importer
    from nagaya.image.reference import parse

    try:
        cfg, store = _store()
        ref = parse(name)
        if ref.digest:
            raise UsageError("--name takes NAME[:TAG], not a digest")
        t0 = time.monotonic()
        with byte_progress(f"importing {src.name}", not json_out) as progress:
            meta = Importer(store, cfg.image.compression, cfg.image.jobs, progress).run(src, ref)
        import os
        import pwd

        audit.record(audit.AuditEvent(action="import", user=pwd.getpwuid(os.getuid()).pw_name, uid=os.getuid(),
                                      image=f"{ref.name}:{ref.tag_or_latest}", digest=meta.digest,
                                      details={"source": str(src)}), cfg)
    except NagayaError as e:
        fail(e)
    if json_out:
        print_json({"name": ref.name, "tag": ref.tag_or_latest, "digest": meta.digest,
                    "size": meta.squashfs_size, "seconds": round(time.monotonic() - t0, 3)})
    else:
        console.print(f"{ref.name}:{ref.tag_or_latest} {meta.digest} ({format_size(meta.squashfs_size)})",
                      highlight=False)


@app.command()
def inspect(image: str = typer.Argument(..., help="NAME[:TAG], NAME@DIGEST or digest"),
            json_out: bool = typer.Option(True, "--json/--text", help="JSON (default) or a summary")) -> None:
    """Show an image's digest, config, labels, environment and entrypoint."""
    try:
        _cfg, store = _store()
        meta = store.resolve(image)
    except NagayaError as e:
        fail(e)
    c = meta.config.get("config") or {}
    tags = [f"{n}:{t}" for n, t, d in store.tags() if d == meta.digest]
    info = {
        "digest": meta.digest, "tags": tags, "size": meta.squashfs_size, "created": meta.created,
        "imported": meta.imported, "source": meta.source, "architecture": meta.config.get("architecture"),
        "os": meta.config.get("os"), "env": c.get("Env") or [], "entrypoint": c.get("Entrypoint"),
        "cmd": c.get("Cmd"), "workdir": c.get("WorkingDir") or "", "user": c.get("User") or "",
        "labels": c.get("Labels") or {},
        "layers": [{"digest": x.digest, "size": x.size, "mediaType": x.media_type} for x in meta.layers],
        "config": meta.config,
    }
    if json_out:
        print_json(info)
        return
    for k in ("digest", "tags", "size", "created", "architecture", "env", "entrypoint", "cmd", "workdir", "labels"):
        console.print(f"[bold]{k}[/]: {info[k]}", highlight=False)


@app.command("rm")
def rm(images: list[str] = typer.Argument(..., help="images to remove (a tag, or a digest with --force)"),
       force: bool = typer.Option(False, "--force", "-f", help="remove an image even if other tags use it")) -> None:
    """Remove tags; an image whose last tag goes is deleted from the cache."""
    try:
        _cfg, store = _store()
        for i in images:
            for line in store.remove(i, force=force):
                console.print(line, highlight=False)
    except NagayaError as e:
        fail(e)


@app.command()
def tag(source: str = typer.Argument(..., help="existing image"),
        target: str = typer.Argument(..., help="new NAME[:TAG]")) -> None:
    """Give an image another name."""
    from nagaya.image.reference import parse

    try:
        _cfg, store = _store()
        meta = store.resolve(source)
        store.tag(parse(target), meta.digest)
    except NagayaError as e:
        fail(e)
