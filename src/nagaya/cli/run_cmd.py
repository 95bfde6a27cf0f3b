"""`nagaya run`, `nagaya exec` and `nagaya shell`: parse with argparse (fast), resolve the image, launch."""

from __future__ import annotations

import argparse
import os
import sys

from nagaya.errors import NagayaError, UsageError

RUN_HELP = """Run a command in a container image, as yourself.

Inside, you keep your UID, GID and groups; $HOME, the current directory and /tmp are bound; the image
is read-only (see --writable-tmpfs and --overlay). With no COMMAND the image's ENTRYPOINT/CMD run (in its
WORKDIR); the exit code is the command's own (126/127: not executable/not found; 128+N: killed by signal N).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def parser(cmd: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"nagaya {cmd}", description=RUN_HELP if cmd != "shell" else
                "Start an interactive shell (bash if the image has it, else sh) in a container image.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable inside")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE", help="read K=V lines from FILE")
    p.add_argument("--cleanenv", action="store_true", help="do not pass the host environment in")
    p.add_argument("-B", "--bind", action="append", default=[], metavar="SRC[:DST[:ro]]",
                   help="bind a host path (repeatable; comma-separated lists too)")
    p.add_argument("--writable-tmpfs", action="store_true", help="let the container write to its root "
                   "(changes vanish when it ends)")
    p.add_argument("--overlay", metavar="DIR", default="", help="keep the container's changes in DIR")
    p.add_argument("--pwd", metavar="DIR", default="", help="working directory inside the container")
    p.add_argument("--gpus", nargs="?", const="all", default="", metavar="all|0,1",
                   help="pass NVIDIA GPUs and driver libraries through (default: all)")
    p.add_argument("--backend", choices=["bwrap", "runc"], default=None, help="container backend")
    if cmd != "shell":
        p.add_argument("--entrypoint", default=None, metavar="CMD", help="override the image's ENTRYPOINT")
    p.add_argument("--no-home", action="store_true", help="do not bind $HOME")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("image", metavar="IMAGE", help="NAME[:TAG], NAME@DIGEST or a digest")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="command and arguments" if cmd != "shell" else "arguments for the shell")
    return p


def parse_bind(text: str):  # -> list[Bind]
    from nagaya.runtime.spec import Bind

    out = []
    for item in text.split(","):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) > 3:
            raise UsageError(f"--bind {item!r}: expected SRC[:DST[:ro|rw]]")
        src = os.path.abspath(os.path.expanduser(parts[0]))
        dst = parts[1] if len(parts) > 1 and parts[1] else src
        mode = parts[2] if len(parts) > 2 else "rw"
        if mode not in ("ro", "rw"):
            raise UsageError(f"--bind {item!r}: mode must be ro or rw")
        out.append(Bind(src, dst, readonly=mode == "ro"))
    return out


def _env_items(ns: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    for path in ns.env_file:
        try:
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    k, sep, v = line.removeprefix("export ").partition("=")
                    if not sep or not k.strip():
                        raise UsageError(f"{path}:{n}: expected K=V")
                    env[k.strip()] = v.strip().strip('"').strip("'")
        except OSError as e:
            raise UsageError(f"--env-file {path}: {e.strerror}") from None
    for item in ns.env:
        k, sep, v = item.partition("=")
        if not k:
            raise UsageError(f"--env {item!r}: expected K=V")
        env[k] = v if sep else os.environ.get(k, "")
    return env


def main(cmd: str, args: list[str]) -> int:
    debug = "--debug" in args or os.environ.get("NAGAYA_DEBUG") == "1"
    try:
        return _main(cmd, args)
    except NagayaError as e:
        if debug:
            raise
        print(f"nagaya: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _main(cmd: str, args: list[str]) -> int:
    from nagaya import config
    from nagaya.image.oci import RunConfig
    from nagaya.image.store import open_store
    from nagaya.runtime.spec import RunSpec

    ns = parser(cmd).parse_args(args)
    cfg = config.load()
    store = open_store(cfg)
    meta = resolve_image(store, ns.image, cfg)
    binds = [b for item in ns.bind for b in parse_bind(item)]
    spec = RunSpec(image_ref=ns.image, digest=meta.digest, squashfs=str(store.squashfs_path(meta.digest)),
                   argv=list(ns.command), entrypoint=(None if cmd == "shell" or ns.entrypoint is None
                                                      else [ns.entrypoint] if ns.entrypoint else []),
                   env=_env_items(ns), cleanenv=ns.cleanenv, binds=binds, pwd=ns.pwd,
                   writable_tmpfs=ns.writable_tmpfs, overlay_dir=ns.overlay, gpus=ns.gpus,
                   backend=ns.backend or cfg.runtime.backend, shell=cmd == "shell", no_home=ns.no_home)
    if cmd == "exec" and not spec.argv:
        raise UsageError("nagaya exec: give a command to run")
    if cmd == "exec":
        spec.entrypoint = []
    if not fuse_usable(cfg):
        spec.unpacked = ensure_unpacked(store, meta.digest)
    else:
        from nagaya.image import squash

        squash.check(store.squashfs_path(meta.digest))
    store.touch(meta.digest)
    from nagaya.runtime import launcher

    return launcher.run(spec, RunConfig.from_image_config(meta.config), cfg)


def resolve_image(store, text: str, cfg):  # -> ImageMeta
    from nagaya.errors import ImageNotFound

    try:
        return store.resolve(text)
    except ImageNotFound:
        from nagaya.image.reference import parse

        ref = parse(text)
        if not ref.registry:
            raise
    from nagaya.image.pull import pull

    return pull(store, text, cfg, quiet=not sys.stderr.isatty())


def fuse_usable(cfg) -> bool:
    return (cfg.runtime.fuse and os.access("/dev/fuse", os.R_OK | os.W_OK)
            and os.access(cfg.runtime.squashfuse, os.X_OK))


def ensure_unpacked(store, digest: str) -> str:
    """The unpacked-directory fallback, made once per image (atomically: temp dir + rename)."""
    from nagaya.image import squash

    dest = store.unpacked_path(digest)
    if dest.is_dir():
        return str(dest)
    squash.check(store.squashfs_path(digest))
    with store.lock(f"image-{digest[7:]}"):
        if dest.is_dir():
            return str(dest)
        print("nagaya: FUSE is not usable here; unpacking the image once to run it from a directory",
              file=sys.stderr)
        with store.tmpdir("unpack-") as tmp:
            squash.unpack(store.squashfs_path(digest), tmp / "root")
            os.replace(tmp / "root", dest)
    return str(dest)
