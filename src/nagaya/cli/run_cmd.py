"""`nagaya run`, `nagaya exec` and `nagaya shell`: parse with argparse (fast), resolve the image, launch."""

from __future__ import annotations

import os
import sys

from nagaya.errors import NagayaError, UsageError

RUN_HELP = """Run a command in a container image, as yourself.

Inside, you keep your UID, GID and groups; $HOME, the current directory and /tmp are bound; the image
is read-only (see --writable-tmpfs and --overlay). With no COMMAND the image's ENTRYPOINT/CMD run (in its
WORKDIR); the exit code is the command's own (126/127: not executable/not found; 128+N: killed by signal N).
"""


# One table drives both the fast hand-written parser used on every run and the argparse parser that
# renders --help and usage errors (importing argparse costs more than a container start).
# (flags, dest, kind, metavar, help); kind: flag | value | append | optional (value or "all")
OPTIONS: list[tuple[tuple[str, ...], str, str, str, str]] = [
    (("-e", "--env"), "env", "append", "K=V", "set a variable inside"),
    (("--env-file",), "env_file", "append", "FILE", "read K=V lines from FILE"),
    (("--cleanenv",), "cleanenv", "flag", "", "do not pass the host environment in"),
    (("-B", "--bind"), "bind", "append", "SRC[:DST[:ro]]", "bind a host path (repeatable; comma-separated too)"),
    (("--writable-tmpfs",), "writable_tmpfs", "flag", "", "let the container write to its root (changes vanish)"),
    (("--overlay",), "overlay", "value", "DIR", "keep the container's changes in DIR"),
    (("--pwd",), "pwd", "value", "DIR", "working directory inside the container"),
    (("--gpus",), "gpus", "optional", "all|0,1",
     "pass NVIDIA or AMD GPUs and driver libraries through (default: all; a site's CDI spec if it has one)"),
    (("--device",), "device", "append", "VENDOR/CLASS=NAME",
     "a device of the site's CDI specs, e.g. nvidia.com/gpu=0, amd.com/gpu=all (repeatable)"),
    (("--backend",), "backend", "value", "bwrap|runc", "container backend (default: from config)"),
    (("--pull",), "pull", "value", "full|lazy", "registry images: pull in full first, or start at once and "
     "read blocks as needed (default: config image.pull)"),
    (("--entrypoint",), "entrypoint", "value", "CMD", "override the image's ENTRYPOINT ('' for none)"),
    (("--no-home",), "no_home", "flag", "", "do not bind $HOME"),
    (("--hostname",), "hostname", "value", "NAME", "the container's hostname (a UTS namespace of its own)"),
    (("--debug",), "debug", "flag", "", "show tracebacks"),
    # An interactive allocation: the scheduler grants the resources, the container runs there on this terminal.
    (("--alloc",), "alloc", "flag", "", "run as an interactive job of the scheduler (Slurm: srun --pty); "
     "--gpus N is then a count"),
    (("--cpus",), "cpus", "value", "N", "with --alloc: CPUs"),
    (("--mem",), "mem", "value", "SIZE", "with --alloc: memory, e.g. 4G"),
    (("--time",), "time", "value", "LIMIT", "with --alloc: time limit (MIN, H:MIN:SEC, D-H:MIN)"),
    (("--partition",), "partition", "value", "NAME", "with --alloc: partition"),
    (("--scheduler",), "scheduler", "value", "local|slurm|gridengine|pbs", "with --alloc: backend (default: config)"),
]
ALLOC_ONLY = ("alloc", "cpus", "mem", "time", "partition", "scheduler")
BACKENDS = ("bwrap", "runc")


class Args:
    """Parsed options (the same attribute names argparse would give)."""

    def __init__(self) -> None:
        self.env: list[str] = []
        self.env_file: list[str] = []
        self.bind: list[str] = []
        self.device: list[str] = []
        self.cleanenv = self.writable_tmpfs = self.no_home = self.debug = False
        self.overlay = self.pwd = self.gpus = self.hostname = ""
        self.backend: str | None = None
        self.pull = ""
        self.entrypoint: str | None = None
        self.image = ""
        self.command: list[str] = []
        self.alloc = False
        self.cpus = self.mem = self.time = self.partition = self.scheduler = ""
        self.passthrough: list[str] = []    # the options as given, but --alloc's own: for the allocated run


def _argparse(cmd: str):  # -> argparse.ArgumentParser
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise UsageError(f"{self.prog}: {message} (see --help)")

    p = Parser(prog=f"nagaya {cmd}", description=RUN_HELP if cmd != "shell" else
               "Start an interactive shell (bash if the image has it, else sh) in a container image.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    for flags, dest, kind, metavar, help_ in OPTIONS:
        if cmd == "shell" and dest == "entrypoint":
            continue
        if kind == "flag":
            p.add_argument(*flags, dest=dest, action="store_true", help=help_)
        elif kind == "append":
            p.add_argument(*flags, dest=dest, action="append", default=[], metavar=metavar, help=help_)
        elif kind == "optional":
            p.add_argument(*flags, dest=dest, nargs="?", const="all", default="", metavar=metavar, help=help_)
        else:
            p.add_argument(*flags, dest=dest, metavar=metavar, help=help_,
                           choices=BACKENDS if dest == "backend" else None)
    p.add_argument("image", metavar="IMAGE", help="NAME[:TAG], NAME@DIGEST, a digest, or a single-file image "
                   "(./FILE.nsq, from `nagaya image export --sqsh`)")
    p.add_argument("command", nargs="...", metavar="COMMAND",
                   help="command and arguments" if cmd != "shell" else "arguments for the shell")
    return p


def parse_args(cmd: str, args: list[str]) -> Args:
    """Options stop at IMAGE; everything after it is the command, untouched."""
    by_flag = {f: o for o in OPTIONS for f in o[0] if not (cmd == "shell" and o[1] == "entrypoint")}
    ns = Args()
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            _argparse(cmd).print_help()
            raise SystemExit(0)
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        name, eq, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        opt = by_flag.get(name)
        if opt is None:
            _argparse(cmd).parse_args(args)       # renders the usage error
            raise UsageError(f"nagaya {cmd}: unknown option {a}")
        _flags, dest, kind, _m, _h = opt
        first = i
        if kind == "flag":
            setattr(ns, dest, True)
        elif kind == "optional":
            if eq:
                ns.gpus = inline
            elif i + 1 < len(args) and (args[i + 1] == "all" or args[i + 1].replace(",", "").isdigit()):
                i += 1
                ns.gpus = args[i]
            else:
                ns.gpus = "all"
        else:
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"nagaya {cmd}: {name} needs a value (see --help)")
                i += 1
                inline = args[i]
            if kind == "append":
                getattr(ns, dest).append(inline)
            else:
                setattr(ns, dest, inline)
        if dest not in ALLOC_ONLY and dest != "gpus":
            ns.passthrough += args[first:i + 1]
        i += 1
    if i >= len(args):
        raise UsageError(f"nagaya {cmd}: give an IMAGE (see --help)")
    if ns.backend is not None and ns.backend not in BACKENDS:
        raise UsageError(f"nagaya {cmd}: --backend must be one of {', '.join(BACKENDS)}")
    ns.image, ns.command = args[i], args[i + 1:]
    return ns


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


def _env_items(ns: Args) -> dict[str, str]:
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
    # The compiled starter asks for a fresh plan (its own was missing or stale); never seen by the container.
    want_plan = os.environ.pop("NAGAYA_STARTER_PLAN", "") == "want"
    try:
        return _main(cmd, args, want_plan)
    except NagayaError as e:
        if debug:
            raise
        print(f"nagaya: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _main(cmd: str, args: list[str], want_plan: bool = False) -> int:
    from nagaya import config
    from nagaya.runtime.spec import RunConfig, RunSpec

    ns = parse_args(cmd, args)
    cfg = config.load()
    if ns.alloc:
        from nagaya.sched.interactive import allocate

        return allocate(cfg, ns, shell=cmd == "shell")
    if any(getattr(ns, k) for k in ALLOC_ONLY):
        raise UsageError(f"nagaya {cmd}: --cpus, --mem, --time, --partition and --scheduler need --alloc")
    fuse = fuse_usable(cfg)
    nsq = None
    if "/" in ns.image or ns.image.endswith(".nsq"):     # a file, maybe (single_file's own test, unimported)
        from nagaya.image import single_file

        nsq = single_file.check_for_run(ns.image, cfg.cache_root) if single_file.looks_like_file(ns.image) else None
    cached = _cached_local_image(cfg, ns.image) if fuse and nsq is None else None
    if nsq is not None:                     # a single-file image: its squashfs is mounted where it lies
        import base64
        import json

        digest, squashfs = nsq.digest, os.path.abspath(ns.image)
        image_config = json.loads(base64.b64decode(nsq.meta["config"]))
    elif cached is not None:
        digest, image_config, squashfs = cached
    else:
        from nagaya.image.store import open_store

        store = open_store(cfg)
        lazy = _lazy_image(store, ns, cfg)
        if lazy is not None:                # started before the pull ends (nagaya.image.lazy)
            digest, image_config, squashfs = lazy
        else:
            from nagaya.image.resolve import for_run

            meta = for_run(store, ns.image, cfg)
            digest, image_config, squashfs = meta.digest, meta.config, str(store.squashfs_path(meta.digest))
    if cfg.image.policy or cfg.image.vuln_block:    # the site's policies, by digest (a cached verdict: a few stats)
        from nagaya.trust.gate import admit

        admit(cfg, ns.image, digest)
    binds = [b for item in ns.bind for b in parse_bind(item)]
    spec = RunSpec(image_ref=ns.image, digest=digest, squashfs=squashfs,
                   argv=list(ns.command), entrypoint=(None if cmd == "shell" or ns.entrypoint is None
                                                      else [ns.entrypoint] if ns.entrypoint else []),
                   env=_env_items(ns), cleanenv=ns.cleanenv, binds=binds, pwd=ns.pwd,
                   writable_tmpfs=ns.writable_tmpfs, overlay_dir=ns.overlay, gpus=ns.gpus, devices=ns.device,
                   backend=ns.backend or cfg.runtime.backend, shell=cmd == "shell", no_home=ns.no_home,
                   hostname=ns.hostname, squashfs_offset=nsq.offset if nsq is not None else 0)
    if cmd == "exec" and not spec.argv:
        raise UsageError("nagaya exec: give a command to run")
    if cmd == "exec":
        spec.entrypoint = []
    reader = _LAZY_READERS[-1] if _LAZY_READERS else None
    if reader is not None and squashfs == reader.path:
        pass                                # lazy: the squashfs is the FUSE reader's file; never unpacked
    elif not fuse or (nsq is None and squashfs.startswith(cfg.cache_root + "/") and wants_unpacked(cfg)):
        if nsq is not None or cached is not None:
            from nagaya.image.store import open_store

            store = open_store(cfg)
        spec.unpacked = ensure_unpacked(store, digest, nsq, fuse)
    else:
        from nagaya.image import squash

        squash.check(squashfs, spec.squashfs_offset)
    try:
        os.utime(os.path.join(cfg.cache_root, "images", digest[7:] + ".json"))  # ImageStore.touch: LRU order
    except OSError:
        pass
    from nagaya.runtime import launcher

    # The plain case the compiled starter (src/starter) replays from a plan this run writes: no option but --gpus.
    plain = want_plan and cmd != "shell" and nsq is None and cached is not None and bool(ns.command) \
        and not ns.passthrough
    try:
        return launcher.run(spec, RunConfig.from_image_config(image_config), cfg, starter_plan=plain)
    finally:
        for r in _LAZY_READERS:
            r.stop()


_LAZY_READERS: list = []


def _lazy_image(store, ns: Args, cfg) -> tuple[str, dict, str] | None:
    """--pull lazy (or image.pull = "lazy") for a registry reference: (digest, config, squashfs path) of the
    image read through the user's FUSE reader, or None to pull in full (a note says why)."""
    from nagaya.image.lazy import mount

    if mount.mode(cfg, ns.pull) != "lazy" or not fuse_usable(cfg):
        return None
    from nagaya.image.reference import parse

    try:
        ref = parse(ns.image)
    except UsageError:
        return None
    if not ref.registry:
        return None
    if cfg.image.policy or getattr(cfg.image, "vuln_block", None):
        from nagaya.trust.gate import covers

        rule = covers(cfg, ref.name)
        if rule:                            # the artifact is verified against its block list, not signed
            mount.note(f"{ref.name} is covered by {rule}: pulling in full (a lazy image's squashfs is not "
                       "what was signed or scanned)")
            return None
    from nagaya.errors import RegistryUnreachable

    try:
        img = mount.prepare(store, ns.image, cfg)
    except RegistryUnreachable:
        return None                         # the full path says so, or runs a cached full copy
    if img is None:
        return None
    reader = mount.Reader(store, img, cfg)
    _LAZY_READERS.append(reader)
    return img.digest, img.config, reader.path


def _cached_local_image(cfg, text: str) -> tuple[str, dict, str] | None:
    """ImageStore.resolve for the common case, a local NAME[:TAG] or NAME@DIGEST already in the cache, as
    (digest, image config, squashfs path) without importing the image store (pathlib, json, contextlib: a few ms
    of every start). It reads the image store's layout (refs/NAME/TAG, images/HEX.json and .sqfs; the user's
    cache first, then the site's shared ones) exactly as ImageStore does. Anything else (digest prefixes,
    registry references, which re-resolve on every run, misses and errors) returns None: the image store decides."""
    from nagaya.image.reference import is_digest, parse

    if text.startswith("sha256:") or (len(text) >= 6 and all(c in "0123456789abcdef" for c in text)):
        return None                         # a digest or prefix: ImageStore.resolve matches those first
    try:
        ref = parse(text)
    except UsageError:
        return None
    if ref.registry:
        return None
    from nagaya.image.cachedirs import own_cache, shared_caches

    shared = shared_caches(cfg.image.shared_cache_dirs)
    bases = ([cfg.cache_root] if own_cache(cfg.cache_root) else []) + shared
    digest = ref.digest
    if not digest:
        for base in bases:
            try:
                with open(os.path.join(base, "refs", ref.name, ref.tag_or_latest)) as f:
                    digest = f.read().strip()
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                return None
            if is_digest(digest):
                break
            digest = None
        if not digest:
            return None
    if not is_digest(digest):
        return None
    from nagaya.runtime.fastjson import loads

    h = digest[7:]
    for base in bases:
        try:
            with open(os.path.join(base, "images", h + ".json"), "rb") as f:
                meta = loads(f.read())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("digest") != digest or not isinstance(meta.get("config"), dict):
            return None
        break
    else:
        return None
    for base in shared:
        p = os.path.join(base, "images", h + ".sqfs")
        if os.path.exists(p):
            return digest, meta["config"], p
    return digest, meta["config"], os.path.join(cfg.cache_root, "images", h + ".sqfs")


def fuse_usable(cfg) -> bool:
    return (cfg.runtime.fuse and os.access("/dev/fuse", os.R_OK | os.W_OK)
            and os.access(cfg.runtime.squashfuse, os.X_OK))


def wants_unpacked(cfg) -> bool:
    """Run from the unpacked copy rather than squashfuse: `runtime.unpack`, or in auto mode a job that may
    use runtime.unpack_threads CPUs or more (its affinity: what the scheduler gave it). squashfuse_ll 0.1.105
    serves one request at a time, so all of such a job's reads would queue on one thread (bench/io)."""
    mode = cfg.runtime.unpack
    if mode not in ("auto", "always", "never"):
        raise UsageError(f"runtime.unpack = {mode!r}: choose auto, always or never")
    if mode != "auto":
        return mode == "always"
    return 0 < cfg.runtime.unpack_threads <= len(os.sched_getaffinity(0))


def ensure_unpacked(store, digest: str, nsq=None, fuse: bool = False) -> str:
    """The unpacked-directory fallback, made once per image (atomically: temp dir + rename). `nsq`: the
    checked header of a single-file image, unpacked from where its squashfs lies in that file."""
    from nagaya.image import squash

    dest = store.unpacked_path(digest)
    if dest.is_dir():
        return str(dest)
    src, offset = (nsq.path, nsq.offset) if nsq is not None else (store.squashfs_path(digest), 0)
    squash.check(src, offset)
    with store.lock(f"image-{digest[7:]}"):
        if dest.is_dir():
            return str(dest)
        print("nagaya: " + ("unpacking the image once for this many-CPU job (runtime.unpack)" if fuse else
                            "FUSE is not usable here; unpacking the image once") + " to run it from a directory",
              file=sys.stderr)
        with store.tmpdir("unpack-") as tmp:
            squash.unpack(src, tmp / "root", offset)
            os.replace(tmp / "root", dest)
    return str(dest)
