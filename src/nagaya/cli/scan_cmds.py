"""`nagaya image scan|sbom` and `nagaya admin vulndb update|status`: the CLI of nagaya.scan."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from nagaya import config
from nagaya.cli.common import console, print_json
from nagaya.errors import NagayaError

vulndb_app = typer.Typer(help="The site's offline vulnerability database.", no_args_is_help=True)
SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan"}


def scan(image: str = typer.Argument(..., help="NAME[:TAG], NAME@DIGEST or digest of a cached image"),
         json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List the known vulnerabilities of an image's installed packages (dpkg, apk, Python), offline."""
    from nagaya.scan.report import scan_local

    with console.status(f"scanning {image}", spinner="dots") if not json_out else _null():
        rep, _inv = scan_local(config.load(), image)
    if json_out:
        print_json(rep)
        return
    t = Table(box=None, header_style="bold")
    for col in ("SEVERITY", "ID", "PACKAGE", "INSTALLED", "FIXED"):
        t.add_column(col)
    for f in rep["findings"]:
        t.add_row(Text(f["severity"], style=SEVERITY_STYLE.get(f["severity"], "")), f["id"], f["package"],
                  f["installed"], f["fixed"] or "-")
    if rep["findings"]:
        console.print(t)
    counts = ", ".join(f"{n} {s}" for s, n in rep["counts"].items() if n) or "no findings"
    db = rep["vulndb"]
    console.print(f"{rep['digest'][:19]} {rep['distro'] or 'unknown OS'}, {rep['packages']} packages: {counts}; "
                  f"rebuild: {rep['fixable']} fixes available (database {db['updated']})", highlight=False)


def sbom(image: str = typer.Argument(..., help="NAME[:TAG], NAME@DIGEST or digest of a cached image"),
         output: Path = typer.Option(..., "--output", "-o", help="where to write the SPDX 2.3 JSON ('-': stdout)"),
         attach: bool = typer.Option(False, "--attach", help="also store it in the registry beside the image "
                                                            "(tag sha256-HEX.sbom, as cosign attaches SBOMs)")) -> None:
    """Write an SPDX 2.3 JSON SBOM of an image's installed packages."""
    from nagaya.image.store import open_store
    from nagaya.scan import inventory
    from nagaya.scan import sbom as spdx
    from nagaya.scan.report import local_inventory

    cfg = config.load()
    store = open_store(cfg)
    meta = store.resolve(image)
    inv: inventory.Inventory = local_inventory(cfg, meta.digest)
    doc = json.dumps(spdx.spdx(inv, image, meta.digest), indent=1).encode()
    tag = _attach(cfg, image, meta, doc) if attach else ""
    if str(output) == "-":
        print(doc.decode())
    else:
        from nagaya.image.store import atomic_write

        atomic_write(output, doc)
        console.print(f"{output}: SPDX 2.3, {len(inv.packages)} packages" + (f"; attached as {tag}" if tag else ""),
                      highlight=False)


def _attach(cfg, image: str, meta, doc: bytes) -> str:
    from nagaya.errors import UsageError
    from nagaya.image.reference import parse
    from nagaya.scan.attach import attach_sbom
    from nagaya.trust.sign import open_for

    src = meta.source if meta.source and "@" in meta.source else image
    ref = parse(src)
    if not ref.registry:
        raise UsageError(f"{image}: not from a registry (push it first, then attach)")
    with open_for(ref, cfg, push=True) as reg:
        return attach_sbom(reg, meta.digest, doc)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


@vulndb_app.command("update")
def vulndb_update(sources: list[str] = typer.Option(..., "--from", help="OSV JSON/all.zip or Debian tracker JSON: "
                                                                        "a directory, file or URL (repeatable)"),
                  json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Import the vulnerability database the site mirrors (replaces the old one when complete)."""
    from nagaya.scan import vulndb

    try:
        cfg = config.load()
        with console.status("importing advisories", spinner="dots") if not json_out else _null():
            st = vulndb.update(cfg.image.vulndb, sources)
    except OSError as e:
        raise NagayaError(str(e)) from None
    _show(st, json_out)


@vulndb_app.command("status")
def vulndb_status(json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show the database's source, date and size."""
    from nagaya.scan import vulndb

    st = vulndb.status(config.load().image.vulndb)
    _show(st, json_out)


def _show(st: dict, json_out: bool) -> None:
    if json_out:
        print_json(st)
        return
    console.print(f"{st['path']}: {st['advisories']} advisories ({st['entries']} entries) for "
                  f"{', '.join(st['ecosystems'])}; updated {st['updated']} from {st['source']}", highlight=False)
