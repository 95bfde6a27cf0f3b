"""`nagaya build` and `nagaya image export`."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import typer

from nagaya import audit, config
from nagaya.cli.common import byte_progress, console, print_json
from nagaya.errors import NagayaError, UsageError
from nagaya.units import format_size


def build(context: Path = typer.Argument(None, help="build context: the directory COPY and %files read from"),
          tag: str = typer.Option("", "--tag", "-t", help="NAME[:TAG] (HOST/PROJECT/NAME:TAG to --push)"),
          file: Path | None = typer.Option(None, "--file", "-f",
                                           help="Dockerfile/Containerfile or Apptainer definition file "
                                                "(default: CONTEXT/Containerfile, Dockerfile or *.def)"),
          build_arg: list[str] = typer.Option([], "--build-arg", help="K=V for ARG K (repeatable)"),
          no_cache: bool = typer.Option(False, "--no-cache", help="run every step again"),
          push: bool = typer.Option(False, "--push", help="push the image to its registry afterwards"),
          sign: bool = typer.Option(False, "--sign", help="with --push: sign the pushed digest (nagaya sign)"),
          key: str = typer.Option("default", "--key", "-k", help="--sign: key name or cosign .key path"),
          passphrase_file: str = typer.Option(None, "--passphrase-file", help="--sign: the key's passphrase file"),
          json_out: bool = typer.Option(False, "--json", help="machine-readable result on stdout"),
          submit: bool = typer.Option(False, "--submit", help="build as a batch job on the site instead (as you; "
                                      "the context is uploaded, the image pushed to -t HOST/PROJECT/NAME:TAG)"),
          recipe: Path = typer.Option(None, "--recipe", hidden=True,
                                      help="(a build job) run the recipe a submitted build wrote")) -> None:
    """Build an image rootless (buildah) from a Dockerfile or an Apptainer definition file into your cache.

    Build output streams to stderr. A failed step names FILE:LINE and its command, exits non-zero and
    leaves neither an image nor a build container behind. With --submit the site builds it as a batch job
    (the portal's Build page and /api/builds do the same)."""
    from nagaya.build.builder import Builder, BuildRequest
    from nagaya.image.store import open_store

    if recipe is not None:                  # the batch job of a submitted build (build/remote.py)
        from nagaya.build.remote import run_recipe

        run_recipe(recipe)
        return
    if context is None or not tag:
        raise UsageError("give the build context and -t NAME[:TAG]")
    if submit:
        from nagaya.client.builds import submit_build

        if sign or no_cache:
            raise UsageError("--submit builds on the site, which pushes (no --sign) with its layer cache")

        out = submit_build(context, tag, file, list(build_arg))
        if json_out:
            print_json(out)
        else:
            console.print(f"build {out['id']} submitted (job {out['job']}): {out['url']}", highlight=False)
        return

    for ba in build_arg:
        if not ba or ba.startswith("="):
            raise UsageError(f"--build-arg takes K=V, got {ba!r}")
    if push:
        from nagaya.image.pull import parse_remote

        parse_remote(tag)                   # fail before building: a name without a registry cannot be pushed
    if sign and not push:
        raise UsageError("--sign signs what --push pushed: give both")
    private = None
    if sign:                                # the passphrase now: a wrong one fails before the build, not after
        from nagaya.trust import keys

        private = keys.load_private(key, keys.passphrase(passphrase_file, confirm=False))
    cfg = config.load()
    store = open_store(cfg)
    with byte_progress("importing the built image", not json_out) as progress:
        result = Builder(store, cfg, progress=progress).build(
            BuildRequest(context=context, file=file, tag=tag, build_args=list(build_arg), no_cache=no_cache))
    audit.record(audit.AuditEvent(action="build", user=pwd.getpwuid(os.getuid()).pw_name, uid=os.getuid(),
                                  image=result.ref, digest=result.meta.digest,
                                  details={"file": result.file, "context": str(context)}), cfg)
    pushed = _push(result.ref, cfg, json_out) if push else None
    if private is not None and pushed is not None:
        from nagaya.cli.trust_cmds import sign_with
        from nagaya.image.pull import parse_remote

        pushed["signed"] = sign_with(f"{parse_remote(result.ref).name}@{pushed['digest']}", private, key)
    if json_out:
        out = result.to_json()
        if pushed is not None:
            out["pushed"] = pushed
        print_json(out)
    else:
        console.print(f"{result.ref} {result.meta.digest} ({format_size(result.meta.squashfs_size)}, "
                      f"{result.cached_steps}/{result.steps} steps cached, {result.seconds:.1f} s)", highlight=False)
        if pushed is not None and pushed.get("signed"):
            console.print(f"pushed and signed with {key}", highlight=False)


def _push(ref: str, cfg: config.Config, json_out: bool) -> dict[str, object]:
    """--push: what `nagaya push REF REF` does (the -t name must be HOST/PROJECT/NAME:TAG)."""
    import sys

    from nagaya.image.push import push
    from nagaya.image.store import open_store

    res = push(open_store(cfg), ref, ref, cfg, quiet=json_out or not sys.stderr.isatty())
    audit.record(audit.AuditEvent(action="push", user=pwd.getpwuid(os.getuid()).pw_name, uid=os.getuid(),
                                  image=res.ref, digest=res.meta.digest, details={"bytes": res.bytes_uploaded}), cfg)
    return res.to_json()


def export(image: str = typer.Argument(..., help="NAME[:TAG] or digest of an image in your cache"),
           output: Path = typer.Option(..., "--output", "-o", help="file to write (OCI archive; .nsq with --sqsh)"),
           sqsh: bool = typer.Option(False, "--sqsh", help="write a single-file image instead: its squashfs with "
                                     "signed metadata, runnable as `./FILE ARGS` or `nagaya run FILE`"),
           sign: str = typer.Option(None, "--sign", help="with --sqsh: sign the file's metadata with this key"),
           passphrase_file: str = typer.Option(None, "--passphrase-file",
                                               help="with --sign: read the key's passphrase from FILE"),
           json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Write an image to one file to copy elsewhere: an OCI archive (`nagaya image import FILE --name N`), or
    with --sqsh a single-file image that runs as a program (`./FILE ARGS`) and imports with its digest."""
    from nagaya.build.export import export_image
    from nagaya.image.reference import parse
    from nagaya.image.store import open_store

    try:
        cfg = config.load()
        store = open_store(cfg)
        meta = store.resolve(image)
        tag = "latest"
        if not image.startswith("sha256:"):
            try:
                tag = parse(image).tag_or_latest
            except UsageError:
                pass
        if output.is_dir():
            raise UsageError(f"{output} is a directory; -o takes a file name")
        if sign and not sqsh:
            raise UsageError("--sign applies to --sqsh single-file images")
        if sqsh:
            from nagaya.image import single_file

            private = None
            if sign:
                from nagaya.trust import keys

                private = keys.load_private(sign, keys.passphrase(passphrase_file, confirm=False))
            size = single_file.export(store, meta, output, private)
        else:
            size = export_image(store, meta, output, tag)
    except OSError as e:
        raise NagayaError(f"cannot write {output}: {e.strerror}") from None
    if json_out:
        print_json({"image": image, "digest": meta.digest, "file": str(output), "size": size,
                    "format": "nsq" if sqsh else "oci-archive"})
    else:
        console.print(f"{output} ({format_size(size)}, {meta.digest})", highlight=False)
