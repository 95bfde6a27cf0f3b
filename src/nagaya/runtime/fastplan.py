"""The start-up plan for the compiled starter (src/starter/nagaya-starter.c).

A `nagaya run|exec IMAGE CMD...` with no options, on an image in the user's own cache, builds the same
container every time: only the command, the current directory, the host environment and /etc/hosts,
resolv.conf and localtime change between runs. After such a run this module writes down exactly what the
launcher did (the bwrap argv, the image's environment and entrypoint, the staging directory, the files made
in the overlay's upper layer, where the audit record goes) together with what it depended on (config files,
the image's files, /etc/passwd and /etc/group, nagaya's own sources, a few environment variables). The
starter replays the plan without starting Python when every dependency is unchanged, and otherwise execs
this Python CLI, which decides as always (and writes a fresh plan).

The plan lives in $XDG_CACHE_HOME/nagaya/starter (0700, the user's own; the config's cache_dir is not
needed to find it) and is only ever read by the same user's starter, which refuses a plan that is not a
regular single-link file of theirs in a directory only they can write (safefs's rules).
"""

from __future__ import annotations

import os
import stat

FORMAT = "nagaya-starter-plan 3"
FD_MARK = "\x01FD"                  # the starter puts the status pipe's fd number here
CWD_MARK = "\x01CWD"                # and the container's working directory here
ENV_DEPS = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "SLURMD_NODENAME")
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/localtime")
# Sources whose change may change what the launcher does: a plan made by older code is not replayed.
_SOURCES = ("runtime/launcher.py", "runtime/fastplan.py", "runtime/keeper.py", "runtime/environment.py",
            "runtime/identity.py", "runtime/rootpath.py", "runtime/backends/bwrap.py", "runtime/backends/__init__.py",
            "cli/run_cmd.py", "config.py", "audit.py", "safefs.py")

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nagaya.config import Config
    from nagaya.runtime.launcher import Launcher


def plan_dir_path() -> str:
    """Where the starter looks (it derives the same path from the same variables)."""
    home = os.environ.get("HOME") or os.path.expanduser("~")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(cache, "nagaya", "starter")


def plan_name(ref: str, node: str, gpus: str = "") -> str:
    """FNV-1a 64 of `ref NUL node [NUL gpus]`: the starter computes the same name; the plan repeats them."""
    h = 0xCBF29CE484222325
    for b in ref.encode() + b"\0" + node.encode() + (b"\0" + gpus.encode() if gpus else b""):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}.plan"


def open_plan_dir() -> int | None:
    """The plan directory, made and checked now, before the launcher enters its user namespace (where root's
    directories show as the overflow uid). None if it is not ours alone: no plan is written then."""
    from nagaya import safefs

    path = plan_dir_path()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = safefs.open_dir(path, (os.getuid(),))
    except (OSError, safefs.UnsafePath):
        return None
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd


def _esc(s: str | int) -> str:
    return str(s).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _line(*fields: str | int) -> str:
    return "\t".join(_esc(f) for f in fields) + "\n"


def _dep(path: str, mtime: bool = True) -> str:
    """`mtime`: False for a file whose mtime moves on every run (the image's metadata: the cache's LRU order);
    it is replaced by a rename, a new inode, whenever its content changes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _line("absent", path)
    return _line("dep", path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns if mtime else "-")


def snapshot_upper(upper: str) -> list[tuple[str, str, int, str]] | None:
    """What the launcher made in the upper layer: (type d|f|h, container path, mode, content or host file),
    parents first. None if something there cannot be replayed."""
    out: list[tuple[str, str, int, str]] = []
    for top, dirs, files in os.walk(upper):
        dirs.sort()
        rel_top = top[len(upper):] or "/"
        if rel_top != "/":
            out.append(("d", rel_top, stat.S_IMODE(os.lstat(top).st_mode), ""))
        for n in sorted(files):
            p = os.path.join(top, n)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                return None
            rel = os.path.join(rel_top, n)
            if rel in HOST_FILES:
                out.append(("h", rel, stat.S_IMODE(st.st_mode), rel))
                continue
            with open(p, "rb") as f:
                data = f.read()
            try:
                out.append(("f", rel, stat.S_IMODE(st.st_mode), data.decode()))
            except UnicodeDecodeError:
                return None
    return out


def _content(path: str) -> str:
    """A file whose identity says nothing (procfs, sysfs: the loaded driver's version), by its first 4 KiB."""
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError:
        return _line("absent", path)
    try:
        return _line("content", path, data.decode())
    except UnicodeDecodeError:
        return _line("absent", "/nonexistent/starter: unreadable " + path)    # never replayed


def _gpu_parts(la: Launcher, cfg: Config) -> list[str]:
    """What a --gpus run adds: the staged driver files and links, the environment, and what discovery and
    device selection depended on (the same inputs as runtime/gpudisc.py's per-node cache key)."""
    gp, g = la.gpu, cfg.gpu
    if gp is None:
        return []
    from nagaya.runtime.gpu import GPU_LIB_DIR

    parts = [_line("gpus", la.spec.gpus), _line("gpupaths", int(gp.paths))]
    parts += [_line("gpustage", src, rel) for src, rel in la.gpu_staged]
    for dst, target in gp.links.items():
        rel = ("lib/" if dst.startswith(GPU_LIB_DIR + "/") else "bin/") + os.path.basename(dst)
        parts.append(_line("gpulink", rel, target))
    parts += [_line("postenv", f"{k}={v}") for k, v in gp.env.items()]
    root = g.root.rstrip("/")
    path = g.path or os.environ.get("PATH", "/usr/bin:/bin")
    dirs = [g.dev_dir.rstrip("/") or "/dev", root + "/etc/ld.so.cache", *g.lib_dirs, *g.rocm_dirs,
            *path.split(":"), *g.bin_dirs, *g.cdi_dirs, *(src for src, _rel in la.gpu_staged),
            *(b.src for b in gp.binds)]
    if cfg.gpu.cache:
        dirs += [os.path.join(cfg.cache_root, "gpu", f"{os.uname().nodename}-{v}.marshal") for v in ("nvidia", "amd")]
    parts += [_dep(d) for d in dict.fromkeys(x for x in dirs if x)]
    parts += [_content(root + "/proc/driver/nvidia/version"), _content(root + "/sys/module/nvidia/version")]
    for k in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "ROCR_VISIBLE_DEVICES", *(() if g.path else ("PATH",))):
        v = os.environ.get(k)
        parts.append(_line("envdep", k, v) if v is not None else _line("envunset", k))
    return parts


def render(la: Launcher, cfg: Config, template: list[str], view_binds: list[tuple[str, str, str]],
           upper: list[tuple[str, str, int, str]], lock: str, bypass: list[str]) -> str:
    spec, ident, img = la.spec, la.ident, la.image
    import nagaya

    pkg = os.path.dirname(os.path.realpath(nagaya.__file__))
    umask = os.umask(0)
    os.umask(umask)
    node = os.uname().nodename
    parts = [FORMAT + "\n", _line("ref", spec.image_ref), _line("node", node),
             _line("ident", ident.uid, ident.gid, ",".join(str(g) for g in sorted(ident.groups)), ident.name,
                   ident.home),
             _line("umask", umask), _line("digest", spec.digest), _line("squashfs", spec.squashfs),
             _line("lock", lock), _line("touch", os.path.join(cfg.cache_root, "images", spec.digest[7:] + ".json")),
             _line("staging", la.stage, "site" if la.stage == cfg.runtime.staging_dir else "own"),
             _line("pidns", int(cfg.runtime.pid_namespace)), _line("squashfuse", cfg.runtime.squashfuse),
             # the image came from the user's keeper (runtime/keeper.py): the starter asks it the same way
             _line("keeper", cfg.runtime.keep_mounted if la.keeper_conn is not None else 0, cfg.runtime.keeper),
             _line("unpack_threads", cfg.runtime.unpack_threads if cfg.runtime.unpack == "auto" else 0),
             _line("audit_file", cfg.audit_file), _line("audit_site", cfg.audit.site_dir or ""),
             _line("audit_syslog", int(bool(cfg.audit.syslog)))]
    for k in ENV_DEPS:
        v = os.environ.get(k)
        parts.append(_line("envdep", k, v) if v is not None else _line("envunset", k))
    from nagaya import config

    # the variables the config reads (NAGAYA_<SECTION>_<KEY>): a run with any of them set is Python's
    parts += [_line("envprefix", f"NAGAYA_{section.upper()}_") for section in config._SECTIONS]

    site_cfg = str(getattr(config, "SITE_CONFIG", config._SITE_CONFIG))
    user_cfg = os.path.join(config._user_dir_strs()[1], "nagaya", "nagaya.toml")
    deps = [site_cfg, user_cfg, "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", spec.squashfs,
            cfg.runtime.squashfuse, template[0], *(os.path.join(pkg, s) for s in _SOURCES)]
    from nagaya.image.reference import parse

    ref = parse(spec.image_ref)
    if not ref.digest:
        deps.append(os.path.join(cfg.cache_root, "refs", ref.name, ref.tag_or_latest))
    parts += [_dep(d) for d in deps]
    parts.append(_dep(os.path.join(cfg.cache_root, "images", spec.digest[7:] + ".json"), mtime=False))
    parts += [_line("tmpl", a) for a in template]
    parts += [_line("viewbind", s, d, kind) for s, d, kind in view_binds]
    parts += _gpu_parts(la, cfg)
    parts += [_line("imgenv", e) for e in img.env]
    parts += [_line("entry", e) for e in img.entrypoint]
    parts += [_line("upper", kind, path, f"{mode:o}", data) for kind, path, mode, data in upper]
    parts += [_line("bypass", n) for n in bypass]       # bound from the image past the overlay, in this order
    have = {p for k, p, _m, _d in upper if k == "h"}
    parts += [_line("hostabsent", h) for h in HOST_FILES if h not in have]
    parts.append("end\n")
    return "".join(parts)


def write(dirfd: int, ref: str, text: str, gpus: str = "") -> None:
    """Atomically (temp name, rename) in the checked directory; a failure only costs the next run its speed."""
    from nagaya import safefs

    name = plan_name(ref, os.uname().nodename, gpus)
    try:
        safefs.write_at(dirfd, name, text.encode(), mode=0o600)
    except (OSError, safefs.UnsafePath):
        pass
