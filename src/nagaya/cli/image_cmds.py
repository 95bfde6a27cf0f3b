"""`nagaya images` and `nagaya image import|inspect|rm|export|tag`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from nagaya import audit, config
from nagaya.cli.common import byte_progress, console, print_json
from nagaya.errors import UsageError
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
    from nagaya.scan.report import saved

    cfg, store = _store()
    rows = store.list_images()
    # fixes a rebuild would bring, from the image's last `nagaya image scan` (None: never scanned)
    fixes = {r.meta.digest: (saved(cfg, r.meta.digest) or {}).get("fixable") for r in rows}
    if json_out:
        print_json([{"name": r.name, "tag": r.tag, "digest": r.meta.digest, "size": r.meta.squashfs_size,
                     "created": _created(r.meta), "imported": r.meta.imported, "fixes": fixes[r.meta.digest]}
                    for r in rows])
        return
    t = Table(box=None, header_style="bold")
    for col in ("NAME", "TAG", "DIGEST", "SIZE", "CREATED", "REBUILD"):
        t.add_column(col)
    for r in rows:
        n = fixes[r.meta.digest]
        t.add_row(r.name, r.tag, r.meta.digest if digests else r.meta.digest[:19], format_size(r.meta.squashfs_size),
                  _created(r.meta).replace("T", " ")[:19], f"rebuild: {n} fixes available" if n else "")
    console.print(t)


@app.command("import")
def import_(src: Path = typer.Argument(..., help="rootfs tarball or directory, OCI layout dir or OCI archive"),
            name: str = typer.Option(None, "--name", "-n", help="NAME[:TAG] to give the image (a single-file "
                                     ".nsq image: defaults to its file name)"),
            key: list[str] = typer.Option([], "--key", help="a .nsq file must be signed by this public key "
                                          "(name or .pub path; repeatable)"),
            json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Import an image from local files into your cache (stored once per content digest); a single-file
    image (`nagaya image export --sqsh`) keeps its digest."""
    from nagaya.image import single_file
    from nagaya.image.importer import Importer
    from nagaya.image.reference import parse

    cfg, store = _store()
    nsq = src.is_file() and single_file.looks_like_file(str(src) if "/" in str(src) else f"./{src}")
    if name is None and not nsq:
        raise UsageError("give the image a name: --name NAME[:TAG]")
    if key and not nsq:
        raise UsageError("--key applies to single-file (.nsq) images only")
    ref = parse(name or single_file.default_name(src))
    if ref.digest:
        raise UsageError("--name takes NAME[:TAG], not a digest")
    t0 = time.monotonic()
    with byte_progress(f"importing {src.name}", not json_out) as progress:
        if nsq:
            trusted = None
            if key:
                from nagaya.trust.sign import load_trusted

                trusted = load_trusted(key)
            meta = single_file.import_file(store, src, ref, trusted, progress)
        else:
            meta = Importer(store, cfg.image.compression, cfg.image.jobs, progress).run(src, ref)
    import os
    import pwd

    audit.record(audit.AuditEvent(action="import", user=pwd.getpwuid(os.getuid()).pw_name, uid=os.getuid(),
                                  image=f"{ref.name}:{ref.tag_or_latest}", digest=meta.digest,
                                  details={"source": str(src)}), cfg)
    if json_out:
        print_json({"name": ref.name, "tag": ref.tag_or_latest, "digest": meta.digest,
                    "size": meta.squashfs_size, "seconds": round(time.monotonic() - t0, 3)})
    else:
        console.print(f"{ref.name}:{ref.tag_or_latest} {meta.digest} ({format_size(meta.squashfs_size)})",
                      highlight=False)


@app.command()
def inspect(image: str = typer.Argument(..., help="NAME[:TAG], NAME@DIGEST or digest"),
            size: bool = typer.Option(False, "--size", help="where the bytes go: largest files and directories, "
                                      "hidden/deleted files, duplicates, package caches, what a rebuild saves"),
            json_out: bool = typer.Option(None, "--json/--text",
                                          help="JSON or a summary (default: JSON; with --size, a summary)")) -> None:
    """Show an image's digest, config, labels, environment and entrypoint (--size: a bloat report)."""
    _cfg, store = _store()
    meta = store.resolve(image)
    if size:
        from nagaya.image import bloat

        with console.status(f"reading the layers of {meta.short}", spinner="dots") if not json_out else \
                _nothing():
            report = bloat.for_cached_image(store, meta)
    if size:
        if json_out:
            print_json(report)
        else:
            _print_size_report(report)
        return
    if json_out is None:
        json_out = True
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


def _nothing():  # -> a context manager doing nothing
    import contextlib

    return contextlib.nullcontext()


def _print_size_report(r: dict) -> None:
    """The bloat report as tables (rich)."""
    fs = format_size
    console.print(f"[bold]{r['digest'][:19]}[/]: {len(r['layers'])} layers ship {fs(r['shipped_bytes'])} "
                  f"(uncompressed); the container sees {fs(r['visible_bytes'])} in {r['visible_files']} files",
                  highlight=False)
    console.print(f"[bold]a rebuild would save {fs(r['rebuild_saves'])}[/]: hidden or deleted "
                  f"{fs(r['hidden']['bytes'])}, duplicates {fs(r['duplicates']['bytes'])}, "
                  f"package caches {fs(r['caches']['bytes'])}", highlight=False)

    def table(title: str, cols: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
        if not rows:
            return
        t = Table(title=title, title_justify="left", box=None, header_style="bold")
        for c in cols:
            t.add_column(c, justify="right" if c in ("SIZE", "FILES", "LAYER", "COPIES") else "left")
        for row in rows:
            t.add_row(*row)
        console.print(t)

    table("Largest directories", ("SIZE", "FILES", "PATH"),
          [(fs(d["size"]), str(d["files"]), d["path"]) for d in r["largest_dirs"]])
    table("Largest files", ("SIZE", "LAYER", "PATH"),
          [(fs(f["size"]), str(f["layer"]), f["path"]) for f in r["largest_files"]])
    table("Hidden or deleted by a later layer (still shipped)", ("SIZE", "LAYER", "HOW", "PATH"),
          [(fs(f["size"]), f"{f['layer']}→{f['by_layer']}", f["how"], f["path"]) for f in r["hidden"]["largest"]])
    table("Duplicates across layers", ("SIZE", "COPIES", "PATH"),
          [(fs(d["size"]), str(d["copies"]), ", ".join(f"{p['path']} (layer {p['layer']})" for p in d["paths"][:3]))
           for d in r["duplicates"]["largest"]])
    table("Package manager caches", ("SIZE", "FILES", "KIND"),
          [(fs(c["bytes"]), str(c["files"]), c["kind"]) for c in r["caches"]["kinds"]])


@app.command("rm")
def rm(images: list[str] = typer.Argument(..., help="images to remove (a tag, or a digest with --force)"),
       force: bool = typer.Option(False, "--force", "-f", help="remove an image even if other tags use it")) -> None:
    """Remove tags; an image whose last tag goes is deleted from the cache."""
    _cfg, store = _store()
    for i in images:
        for line in store.remove(i, force=force):
            console.print(line, highlight=False)


@app.command()
def tag(source: str = typer.Argument(..., help="existing image"),
        target: str = typer.Argument(..., help="new NAME[:TAG]")) -> None:
    """Give an image another name."""
    from nagaya.image.reference import parse

    _cfg, store = _store()
    meta = store.resolve(source)
    store.tag(parse(target), meta.digest)


@app.command("lazy-publish")
def lazy_publish(ref: str = typer.Argument(..., help="HOST/PROJECT/NAME[:TAG] in a registry"),
                 json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Publish a registry image's squashfs for `nagaya run --pull lazy` (once; `nagaya push` does it itself).
    For images pushed by other tools: pulls and converts it here, then uploads the squashfs (push rights)."""
    from nagaya.image.lazy.mount import publish_for

    cfg, store = _store()
    out = publish_for(store, ref, cfg)
    if json_out:
        print_json(out)
    else:
        console.print(f"{out['ref']}: {'published' if out['published'] else 'already published'} as "
                      f":{out['tag']}", highlight=False)
