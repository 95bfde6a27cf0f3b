"""`nagaya pull`, `nagaya push` and `nagaya cache ls|gc`."""

from __future__ import annotations

import os
import pwd
import sys
import time

import typer
from rich.table import Table

from nagaya import audit, config
from nagaya.cli.common import console, print_json
from nagaya.errors import NagayaError
from nagaya.image.store import open_store
from nagaya.units import format_size, parse_duration, parse_size

JSON = typer.Option(False, "--json", help="machine-readable output")
cache_app = typer.Typer(help="Inspect and bound the local image cache.", no_args_is_help=True)


def _audit(action: str, image: str, digest: str, cfg: config.Config, details: dict) -> None:
    ev = audit.AuditEvent(action=action, user=pwd.getpwuid(os.getuid()).pw_name, uid=os.getuid(),
                          image=image, digest=digest, details=details)
    audit.record(ev, cfg)
    from nagaya.client.site_audit import forward

    forward(ev)


def _immutable(ref: str) -> bool:
    """Whether the site we are logged in to forbids moving this tag (False when it cannot say)."""
    from nagaya.client import authfile
    from nagaya.client.api import Api
    from nagaya.image.pull import parse_remote

    try:
        r = parse_remote(ref)
        login = authfile.current(r.registry) if r.registry in (authfile.load().get("nagaya") or {}) else None
        if login is None or r.digest:
            return False
        api = Api(login.server, login.username, login.secret, timeout=10)
        ans = api.get("/api/tag-policy", params={"repository": r.path, "tag": r.tag_or_latest})
        return bool(ans.get("immutable"))
    except NagayaError:
        return False


def pull(ref: str = typer.Argument(..., help="HOST[:PORT]/PROJECT/NAME[:TAG] or ...@sha256:DIGEST"),
         json_out: bool = JSON) -> None:
    """Resolve a tag to its digest, download the missing layers (verified) and convert the image once."""
    from nagaya.image.pull import pull_image

    cfg = config.load()
    res = pull_image(open_store(cfg), ref, cfg, quiet=json_out or not sys.stderr.isatty())
    _audit("pull", res.ref, res.meta.digest, cfg, {"bytes": res.bytes_fetched, "cached": res.cached})
    if json_out:
        print_json(res.to_json())
        return
    how = "up to date" if res.cached else (f"{res.layers_fetched} of {res.layers} layers fetched, "
                                          f"{format_size(res.bytes_fetched)}")
    console.print(f"{res.ref} {res.meta.digest} ({how}; {format_size(res.meta.squashfs_size)} image)",
                  highlight=False)


def push(image: str = typer.Argument(..., help="local image: NAME[:TAG] or digest"),
         ref: str = typer.Argument(..., help="HOST[:PORT]/PROJECT/NAME[:TAG]"), json_out: bool = JSON) -> None:
    """Upload a local image to a registry (blobs the registry already has are skipped)."""
    from nagaya.image.push import push as do_push

    cfg = config.load()
    res = do_push(open_store(cfg), image, ref, cfg, quiet=json_out or not sys.stderr.isatty(),
                  immutable=_immutable(ref))
    _audit("push", res.ref, res.meta.digest, cfg, {"bytes": res.bytes_uploaded})
    if json_out:
        print_json(res.to_json())
        return
    console.print(f"{res.ref} {res.meta.digest} ({res.uploaded} blobs uploaded, {format_size(res.bytes_uploaded)}; "
                  f"{res.skipped} already there{f', {res.mounted} mounted' if res.mounted else ''})", highlight=False)


@cache_app.command("ls")
def cache_ls(json_out: bool = JSON) -> None:
    """List cached images, most recently used first, with size, last use and tags."""
    from nagaya.image.cache import _blob_sizes, list_cached

    store = open_store(config.load())
    rows = list_cached(store)
    blobs = sum(s for s, _m in _blob_sizes(store).values())
    if json_out:
        print_json({"cache_dir": str(store.root), "images": [r.to_json() for r in rows],
                    "images_size": sum(r.size for r in rows), "blobs_size": blobs})
        return
    t = Table(box=None, header_style="bold")
    for col in ("DIGEST", "SIZE", "LAST USED", "TAGS"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.meta.digest[:19] + (" (in use)" if r.in_use else ""), format_size(r.size),
                  time.strftime("%Y-%m-%d %H:%M", time.localtime(r.last_used)), ", ".join(r.tags) or "<none>")
    console.print(t)
    console.print(f"{len(rows)} images, {format_size(sum(r.size for r in rows))}; layer blobs "
                  f"{format_size(blobs)} in {store.root}", highlight=False)


@cache_app.command("gc")
def cache_gc(max_size: str = typer.Option(None, "--max-size",
                                          help="shrink the cache to this size (20G; default: [image] cache_max_size)"),
             older_than: str = typer.Option(None, "--older-than", help="remove images unused for this long (30d)"),
             dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be removed"),
             json_out: bool = JSON) -> None:
    """Remove least-recently-used images (never one in use), unreferenced blobs and stale temp files."""
    from nagaya.image.cache import gc

    cfg = config.load()
    store = open_store(cfg)
    max_size = max_size or cfg.image.cache_max_size or None        # the site's cap unless given
    age = parse_duration(older_than).total_seconds() if older_than else None
    rep = gc(store, parse_size(max_size) if max_size else None, age, dry_run)
    if json_out:
        print_json(rep.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    for img in rep.removed_images:
        console.print(f"{verb} {img['digest'][:19]} {', '.join(img['tags']) or '<none>'} "
                      f"({format_size(img['size'])})", highlight=False)
    for d in rep.kept_in_use:
        console.print(f"kept {d[:19]}: in use by a running container", highlight=False)
    console.print(f"{verb} {len(rep.removed_images)} images, {rep.removed_blobs} blobs, {rep.removed_tmp} temp "
                  f"entries; freed {format_size(rep.freed)} ({format_size(rep.size_before)} -> "
                  f"{format_size(rep.size_after)})", highlight=False)
