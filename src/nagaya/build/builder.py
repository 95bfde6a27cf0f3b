"""Run a recipe through `buildah bud` as the calling user and put the result into the nagaya cache.

    build file --parse--> Recipe --bases--> Containerfile (FROM <buildah image id> for local bases)
      --buildah bud (rootless, runc, --layers)--> image id --buildah push oci:DIR--> Importer --> cache

buildah keeps its own storage (default: <cache>/build/storage) with a layer per step, which makes an
unchanged rebuild a series of "Using cache". Base images come from the nagaya cache (loaded into
buildah's storage once, by config digest, which is buildah's image id) or, for HOST/... references,
from the site registry through `nagaya pull` first, so builds see the same tag resolution and
credentials as runs. buildah's `--force-rm` removes the build container of a failed step; a failed
build tags nothing, in buildah or in nagaya.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nagaya.build import deffile, dockerfile
from nagaya.build.deffile import ScriptRun
from nagaya.build.recipe import BuildFailed, Instruction, Recipe
from nagaya.errors import ImageNotFound, NagayaError, RegistryUnreachable, UsageError
from nagaya.image.reference import parse as parse_ref
from nagaya.image.store import ImageMeta, ImageStore
from nagaya.runtime import subids

_STEP = re.compile(r"^(?:\[(\d+)/\d+\] )?STEP (\d+)/\d+: ")
_EXIT = re.compile(r"exit status (\d+)")
_TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:", "docker://", "containers-storage:", "dir:")
_ARG = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass
class BuildSettings:
    """The [build] config section's values (see config.BuildConfig)."""

    buildah: str = "/usr/bin/buildah"
    runtime: str = "/usr/sbin/runc"           # crun fails on hybrid cgroups (DESIGN.md)
    storage_dir: str = ""                     # default: <image cache>/build/storage
    storage_driver: str = "overlay"           # overlay (rootless, kernel >= 5.13) | vfs (any file system)

    @classmethod
    def from_config(cls, cfg: Any) -> BuildSettings:
        b = getattr(cfg, "build", None)
        if b is None:
            return cls()
        return cls(**{k: getattr(b, k) for k in ("buildah", "runtime", "storage_dir", "storage_driver")})


@dataclass
class BuildRequest:
    context: Path
    file: Path | None = None
    tag: str = ""
    build_args: list[str] = field(default_factory=list)
    no_cache: bool = False


@dataclass
class BuildResult:
    ref: str
    meta: ImageMeta
    seconds: float
    steps: int
    cached_steps: int
    file: str
    kind: str

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.meta.digest, "size": self.meta.squashfs_size,
                "seconds": round(self.seconds, 3), "steps": self.steps, "cached_steps": self.cached_steps,
                "file": self.file, "kind": self.kind}


def find_build_file(context: Path, file: Path | None) -> Path:
    if file is not None:
        if not file.is_file():
            raise UsageError(f"{file}: no such file")
        return file
    for name in ("Containerfile", "Dockerfile", "Singularity", "Apptainer"):
        if (context / name).is_file():
            return context / name
    defs = sorted(context.glob("*.def"))
    if len(defs) == 1:
        return defs[0]
    raise UsageError(f"no Containerfile, Dockerfile or definition file in {context}; name one with -f FILE")


def load_recipe(path: Path, context: Path) -> Recipe:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    name = str(path)
    if deffile.is_definition(text) or path.suffix == ".def":
        return deffile.parse(text, name, context)
    return dockerfile.parse(text, name)


def check_subids() -> str:
    """The user's name; a one-line error if they have no subordinate ids (rootless builds need them)."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    missing = [p for p in ("/etc/subuid", "/etc/subgid") if not subids.ranges(p, name, uid)]
    if missing:
        raise NagayaError(f"user {name} has no subordinate id range in {' and '.join(missing)}, which rootless "
                          f"builds need; ask your admin to add one (`nagaya admin subid {name}` prints the lines)",
                          exit_code=6)
    return name


def _runroot() -> Path:
    """buildah's run-time state: $XDG_RUNTIME_DIR, else a private /tmp directory (cleared on reboot)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        p = Path(xdg) / "nagaya-buildah"
        p.mkdir(mode=0o700, exist_ok=True)
        return p
    p = Path(f"/tmp/nagaya-buildah-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        p.mkdir(mode=0o700)
    st = os.lstat(p)
    if not p.is_dir() or p.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise NagayaError(f"{p} is not a private directory of yours; remove it and build again")
    return p


class Builder:
    def __init__(self, store: ImageStore, cfg: Any, out: Callable[[str], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.settings = BuildSettings.from_config(cfg)
        self.out = out if out is not None else _to_stderr
        self.progress = progress
        default = store.root / "build" / "storage"
        self.storage = Path(self.settings.storage_dir) if self.settings.storage_dir else default

    # -- buildah -------------------------------------------------------------------------------------
    def buildah_argv(self, *args: str) -> list[str]:
        return [self.settings.buildah, "--root", str(self.storage), "--runroot", str(_runroot()),
                "--storage-driver", self.settings.storage_driver, *args]

    def _buildah(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.buildah_argv(*args), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BuildFailed(f"buildah {args[0]} failed: {last}")
        return r

    def containers(self) -> list[str]:
        r = self._buildah("containers", "--quiet", "--notruncate", check=False)
        return r.stdout.split() if r.returncode == 0 else []

    # -- bases ---------------------------------------------------------------------------------------
    def _base_meta(self, image: str, where: str) -> ImageMeta:
        """A base image as the user's nagaya cache has it, pulling HOST/... references from the registry."""
        try:
            ref = parse_ref(image)
        except UsageError as e:
            raise NagayaError(f"{where}: {e.message}", exit_code=2) from None
        if ref.registry and not ref.digest:
            try:
                from nagaya.image.pull import pull
            except ImportError:                     # pull not available: the cached copy or nothing
                pull = None
            if pull is not None:
                try:
                    return pull(self.store, image, self.cfg, quiet=True)
                except RegistryUnreachable:
                    pass                            # fall back to the cached copy of that tag
        try:
            return self.store.resolve(image)
        except ImageNotFound:
            hint = ("pull it or check the name" if ref.registry else
                    "import it (`nagaya image import`) or name a registry image HOST/PROJECT/NAME:TAG")
            raise ImageNotFound(f"{where}: base image {image!r} is not in your images; {hint}") from None

    def _load_base(self, meta: ImageMeta, work: Path) -> str:
        """buildah's image id for a cached image, loading its blobs into buildah's storage once."""
        image_id = meta.config_digest.removeprefix("sha256:")
        if self._buildah("inspect", "--type", "image", image_id, check=False).returncode == 0:
            return image_id
        from nagaya.image.importer import write_oci_layout

        layout = work / f"base-{image_id[:12]}"
        write_oci_layout(self.store, meta, layout)
        # buildah names what it pulls after the path, which must then be a valid reference (lower case,
        # no "-_"); a symlink in the private run directory gives it such a path whatever the cache's is.
        link = _runroot() / f"base-{image_id[:12]}-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(layout)
        try:
            r = self._buildah("pull", "--quiet", f"oci:{link}")
        finally:
            link.unlink(missing_ok=True)
        got = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if got != image_id:
            raise BuildFailed(f"buildah loaded base {meta.short} as {got[:12] or 'nothing'}, expected {image_id[:12]}")
        # Give it a stable name and drop the one buildah derived from the temporary path.
        self._buildah("tag", image_id, f"localhost/nagaya-base:{meta.short}")
        self._buildah("rmi", f"localhost{link}:latest", check=False)
        return image_id

    def resolve_bases(self, recipe: Recipe, build_args: list[str], work: Path) -> dict[int, str]:
        args: dict[str, str] = {}
        for a in recipe.global_args:
            for word in a.text.split():
                k, _, v = word.partition("=")
                args[k] = v.strip("\"'")
        for ba in build_args:
            k, eq, v = ba.partition("=")
            if k in args:
                args[k] = v if eq else os.environ.get(k, args[k])
        aliases: set[str] = set()
        bases: dict[int, str] = {}
        for i, st in enumerate(recipe.stages):
            image = _ARG.sub(lambda m: args.get(m.group(1) or m.group(2), ""), st.base.image)
            where = f"{st.base.loc}: FROM {image}"
            if image.lower() == "scratch" or image.lower() in aliases or image.startswith(_TRANSPORTS):
                bases[i] = image
            else:
                bases[i] = self._load_base(self._base_meta(image, where), work)
            if st.base.alias:
                aliases.add(st.base.alias.lower())
        return bases

    # -- the build -----------------------------------------------------------------------------------
    def build(self, req: BuildRequest) -> BuildResult:
        t0 = time.monotonic()
        if not shutil.which(self.settings.buildah):
            raise NagayaError(f"{self.settings.buildah} is not installed; rootless builds need buildah "
                              "(apt install buildah)")
        context = req.context
        if not context.is_dir():
            raise UsageError(f"build context {context} is not a directory")
        path = find_build_file(context, req.file)
        recipe = load_recipe(path, context)
        tag = parse_ref(req.tag) if req.tag else None
        if tag is not None and tag.digest:
            raise UsageError("-t takes NAME[:TAG], not a digest")
        check_subids()
        self.storage.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self.store.tmpdir("build-") as work:
            bases = self.resolve_bases(recipe, req.build_args, work)
            containerfile = work / "Containerfile"
            containerfile.write_text(recipe.write(bases))
            iid = work / "iid"
            argv = self.buildah_argv("bud", "--runtime", self.settings.runtime, "--isolation", "rootless",
                                     "--layers", "--force-rm", "--iidfile", str(iid), "-f", str(containerfile))
            if req.no_cache:
                argv.append("--no-cache")
            for ba in req.build_args:
                argv += ["--build-arg", ba]
            argv.append(str(context))
            steps, cached = self._run(argv, recipe)
            image_id = iid.read_text().strip().removeprefix("sha256:")
            layout = work / "out"
            self._buildah("push", "--quiet", image_id, f"oci:{layout}")
            from nagaya.image.importer import Importer

            ref = tag or parse_ref(f"localhost/build-{image_id[:12]}")
            compression = self.cfg.image.compression
            meta = Importer(self.store, compression, self.cfg.image.jobs, self.progress).run(layout, ref)
        return BuildResult(f"{ref.name}:{ref.tag_or_latest}", meta, time.monotonic() - t0, steps, cached,
                           str(path), recipe.kind)

    def _run(self, argv: list[str], recipe: Recipe) -> tuple[int, int]:
        """Run buildah bud, streaming its output; a failure names the recipe's file, line and command."""
        before = set(self.containers())
        current: Instruction | None = None
        since: list[str] = []                   # output of the current step
        steps = cached = 0
        errors: list[str] = []
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, bufsize=1, errors="replace")
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self.out(line)
                text = line.rstrip("\n")
                m = _STEP.match(text)
                if m:
                    current = recipe.step(int(m.group(1) or 1) - 1, int(m.group(2)))
                    since = []
                    steps += 1
                    continue
                if text.startswith("--> Using cache"):
                    cached += 1
                if text.startswith(("Error:", "error")):
                    errors.append(text)
                since.append(text)
            rc = proc.wait()
        except BaseException:
            # Interrupted: let buildah clean up after itself, then remove what it may have left.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._remove_new_containers(before)
            raise
        if rc == 0:
            return steps, cached
        self._remove_new_containers(before)
        raise BuildFailed(_failure(current, since, errors, rc))

    def _remove_new_containers(self, before: set[str]) -> None:
        new = [c for c in self.containers() if c not in before]
        if new:
            self._buildah("rm", *new, check=False)


def _failure(ins: Instruction | None, output: list[str], errors: list[str], rc: int) -> str:
    err = errors[-1] if errors else f"buildah exited with status {rc}"
    if ins is None:
        return f"build failed: {err.removeprefix('Error: ')}"
    m = _EXIT.search(err)
    status = f"exit status {m.group(1)}" if m else err.removeprefix("Error: ")
    if isinstance(ins, ScriptRun):
        traced = [x[2:].strip() for x in output if x.startswith("+ ")]
        if traced:
            last = traced[-1]
            for n, t in reversed(ins.script):
                if t.strip() == last or last.startswith(t.strip()) or t.strip().startswith(last):
                    return f"{ins.loc.file}:{n}: {ins.describe()}: `{t.strip()}` failed ({status})"
            return f"{ins.loc}: {ins.describe()}: `{last}` failed ({status})"
    return f"{ins.loc}: {ins.describe()} failed ({status})"


def _to_stderr(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()
