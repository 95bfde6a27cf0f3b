"""Site and user configuration: one typed object, read from TOML files and NAGAYA_* variables.

Order (later wins): built-in defaults, /etc/nagaya/nagaya.toml (site), $XDG_CONFIG_HOME/nagaya/nagaya.toml
(user; a site may lock keys with `locked = [...]`), then NAGAYA_<SECTION>_<KEY> environment variables.
This module is on the `nagaya run` start-up path: it imports neither pathlib (the run path uses the
str-valued `cache_root` and `audit_file`) nor, for the plain files sites write, tomllib (see _parse_plain).
"""

from __future__ import annotations

import os

from nagaya.errors import UsageError
from nagaya.record import Factory, Record

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

_SITE_CONFIG = os.environ.get("NAGAYA_SITE_CONFIG", "/etc/nagaya/nagaya.toml")


def __getattr__(name: str) -> Any:
    # SITE_CONFIG is a Path for callers, made on first use so that loading a config needs no pathlib
    # (a monkeypatched SITE_CONFIG is a real attribute, which load() prefers).
    if name == "SITE_CONFIG":
        from pathlib import Path

        return Path(_SITE_CONFIG)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

DEFAULT_GPU_LIBS = (
    "libcuda.so", "libcudadebugger.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so", "libnvidia-opencl.so", "libnvidia-compiler.so", "libnvidia-fatbinaryloader.so",
    "libnvidia-allocator.so", "libnvidia-cfg.so", "libnvidia-gpucomp.so", "libnvidia-pkcs11.so",
    "libnvidia-eglcore.so", "libnvidia-glcore.so", "libnvidia-tls.so", "libnvidia-glsi.so",
    "libnvidia-rtcore.so", "libnvoptix.so", "libnvidia-encode.so", "libnvcuvid.so", "libnvidia-opticalflow.so",
    "libGLX_nvidia.so", "libEGL_nvidia.so", "libGLESv2_nvidia.so", "libGLESv1_CM_nvidia.so",
    "libnvidia-glvkspirv.so", "libnvidia-fbc.so", "libnvidia-ngx.so", "libnvidia-api.so", "libnvidia-nscq.so",
)
DEFAULT_AMD_LIBS = ("libamdhip64.so", "libhsa-runtime64.so", "libhsakmt.so", "libamd_comgr.so", "libhiprtc.so",
                    "librocm_smi64.so", "librocm-core.so", "libdrm_amdgpu.so", "libdrm.so")
DEFAULT_GPU_BINS = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
                    "nvidia-cuda-mps-server")


def _user_dir_strs() -> tuple[str, str, str]:
    home = os.environ.get("HOME") or os.path.expanduser("~")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    conf = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return cache, conf, data


def _expand(text: str) -> str:
    """${USER}, ${UID} and ${NODE} (Slurm's node name, else the short host name) in a path, from the
    process's own identity rather than the environment, which a job may not carry."""
    import pwd

    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0]
    for key, value in (("USER", user), ("UID", str(uid)), ("NODE", node)):
        text = text.replace("${" + key + "}", value).replace("$" + key, value)
    if "$" in text:
        raise UsageError(f"[image] cache_dir {text!r}: only ${{USER}}, ${{UID}} and ${{NODE}} are expanded")
    return text


def _user_dirs() -> tuple[Path, Path, Path]:
    from pathlib import Path

    cache, conf, data = _user_dir_strs()
    return Path(cache), Path(conf), Path(data)


# nagaya's own FUSE server for its images (src/sqfs, built by deploy/install.sh): multi-threaded and cached by
# the kernel. Where it is not installed, squashfuse_ll, which serves one request at a time.
NAGAYA_SQUASHFS = "/usr/local/libexec/nagaya/nagaya-squashfs"
# Keeps a user's images mounted between runs (runtime/keeper.py), built by deploy/install.sh beside it.
NAGAYA_KEEPER = "/usr/local/libexec/nagaya/nagaya-keeper"
# How the FUSE server's process is told from the app's (/proc/PID/comm prefixes; a comm is 15 characters).
FUSE_SERVER_COMMS = ("squashfuse", "nagaya-squashfs")


def _default_squashfuse() -> str:
    return NAGAYA_SQUASHFS if os.access(NAGAYA_SQUASHFS, os.X_OK) else "/usr/bin/squashfuse_ll"


class RuntimeConfig(Record):
    backend: str = "bwrap"                      # bwrap | runc
    bwrap: str = "/usr/bin/bwrap"
    runc: str = "/usr/sbin/runc"
    squashfuse: str = _default_squashfuse()     # the FUSE server: nagaya-squashfs, else squashfuse_ll
    # Where the private mount namespace stages the image (a tmpfs is mounted over it, so nothing is
    # ever written there on the host). Created empty by the site install, like Apptainer's session dir.
    staging_dir: str = "/var/lib/nagaya/mnt"
    pid_namespace: bool = True
    fuse: bool = True                           # False: always use the unpacked-directory fallback
    # squashfuse_ll (Debian 12: 0.1.105) serves one request at a time and its directories are not cached by
    # the kernel: a job with many CPUs runs from an unpacked copy in the user's cache instead (made once,
    # counted in cache_max_size). auto: when the job may use >= unpack_threads CPUs; always; never.
    unpack: str = "auto"
    unpack_threads: int = 16
    # Seconds a user's images stay mounted on a node after their last read-only run ends, held by one keeper
    # process per user and job (runtime.keeper): the next container finds the kernel's caches of the image
    # (directory entries, attributes, pages) warm and skips the FUSE server's start. 0: each run mounts its own.
    keep_mounted: int = 300
    keeper: str = NAGAYA_KEEPER                 # src/starter/nagaya-keeper.c; not installed: no keeping


class ImageConfig(Record):
    cache_dir: str = ""                         # default: $XDG_CACHE_HOME/nagaya
    compression: str = "zstd"                   # tar2sqfs compressor: zstd | lz4 | gzip | xz | lzo
    jobs: int = 0                               # compressor threads; 0 = number of CPUs
    shared_cache_dirs: list[str] = Factory(list)  # read-only site caches, searched first
    insecure_registries: list[str] = Factory(list)  # HOST[:PORT] spoken to over plain HTTP (loopback always is)
    pull_jobs: int = 4                          # parallel layer downloads/uploads
    pull: str = "full"                          # run/submit: full | lazy (start before the pull ends; --pull)
    lazy_publish: bool = True                   # `nagaya push` also uploads the squashfs for lazy runs
    # where lazily read blocks are kept ("" = CACHE/lazy); a directory on the shared file system (e.g.
    # "$HOME/.cache/nagaya-lazy") makes every node of a job share them: each block leaves the registry once
    lazy_cache_dir: str = ""
    cache_max_size: str = ""                    # e.g. "50G": `nagaya cache gc` and `admin maintain` shrink caches to it
    # Site only (a user's config and NAGAYA_IMAGE_* cannot change them): which images may run, and where
    # root keeps the public keys rules name (README "Signed images"; nagaya.trust.gate).
    policy: list[Any] = Factory(list)           # [{scope, require = "signed", keys} | {scope, allow = "unsigned"}]
    keys_dir: str = "/etc/nagaya/keys"          # "project" in a rule's keys: KEYS_DIR/projects/PROJECT/*.pub
    # Site only too: the vulnerability database scans read, and which images it blocks (nagaya.scan)
    vulndb: str = "/var/lib/nagaya/vulndb.sqlite"   # `nagaya admin vulndb update` writes it
    vuln_block: list[Any] = Factory(list)       # [{scope, severity = "high", except = ["CVE-..."]}]
    vuln_allow: list[str] = Factory(list)       # CVEs the admin lets run everywhere


class GpuConfig(Record):
    libs: list[str] = Factory(lambda: list(DEFAULT_GPU_LIBS))
    bins: list[str] = Factory(lambda: list(DEFAULT_GPU_BINS))
    lib_dirs: list[str] = Factory(list)   # searched before the ld.so cache
    bin_dirs: list[str] = Factory(lambda: ["/usr/bin", "/usr/local/bin"])   # searched after PATH
    dev_dir: str = "/dev"
    root: str = ""              # prefix of the driver's fixed paths (/proc, /sys, firmware, ICDs, ld.so.cache)
    path: str = ""              # where binaries are looked for (default: the caller's PATH)
    container_cli: str = "nvidia-container-cli"     # its `list` is preferred when installed ("" never)
    cdi_dirs: list[str] = Factory(lambda: ["/etc/cdi", "/var/run/cdi"])
    cdi: bool = True            # --gpus applies the site's CDI spec for nvidia.com/gpu or amd.com/gpu if any
    vendor: str = "auto"        # auto (NVIDIA if /dev/nvidiaN, else AMD if /dev/kfd), nvidia or amd
    amd_libs: list[str] = Factory(lambda: list(DEFAULT_AMD_LIBS))
    amd_bins: list[str] = Factory(lambda: ["rocm-smi", "rocminfo"])
    rocm_dirs: list[str] = Factory(lambda: ["/opt/rocm/lib"])   # searched before the ld.so cache
    cache: bool = True          # keep discovery results per node in the user's cache


class AuditConfig(Record):
    path: str = ""                              # default: $XDG_DATA_HOME/nagaya/audit.jsonl
    site_dir: str = ""                          # optional site-wide spool, one append-only file per user
    syslog: bool = False


class ServerConfig(Record):
    """The site registry and nagaya's server (token service + API): `nagaya site up` and the daemons."""

    state_dir: str = ""                         # default: /var/lib/nagaya/site (root), else ~/.local/share/...
    database: str = ""                          # SQLAlchemy URL; default sqlite:///STATE_DIR/nagaya.db
    url: str = ""                               # server clients log in to; default: the local site's
    host: str = "127.0.0.1"
    port: int = 0                               # 0: a free port
    registry_port: int = 0
    registry_bin: str = "/usr/bin/docker-registry"
    service: str = "nagaya-registry"            # the token `aud` and the registry's `service`
    issuer: str = "nagaya"
    user: str = "nagaya"                        # service account the daemons run as when started by root
    auth: str = "pam"                           # pam | ldap: how passwords are checked
    pam_service: str = "nagaya"                 # /etc/pam.d/<name>; "login" when that file is missing
    admin_users: list[str] = Factory(list)
    admin_groups: list[str] = Factory(lambda: ["nagaya-admins"])
    token_ttl: int = 300                        # registry bearer tokens, seconds
    login_ttl_days: int = 90                    # personal access tokens made by `nagaya login`
    workers: int = 0                            # server processes; 0: one per CPU (at most 4)
    job_log_days: int = 30                      # `admin maintain` removes portal job logs older than this; 0 keeps
    expired_token_days: int = 30                # ... and personal access tokens expired/revoked this long ago


class LdapConfig(Record):
    uri: str = ""                               # ldap://host or ldaps://host
    user_dn: str = "uid={username},ou=people,dc=example,dc=org"
    base_dn: str = "dc=example,dc=org"
    user_filter: str = "(&(objectClass=posixAccount)(uid={username}))"
    group_filter: str = "(&(objectClass=posixGroup)(memberUid={username}))"
    group_lookup_filter: str = "(&(objectClass=posixGroup)(cn={group}))"
    bind_dn: str = ""                           # for searches; empty: anonymous
    bind_password: str = ""
    start_tls: bool = False


class SchedConfig(Record):
    """`nagaya submit` and friends: which scheduler backend, and the local executor's limits."""

    backend: str = "local"                      # local | slurm | gridengine | pbs
    state_dir: str = ""                         # local: default $XDG_DATA_HOME/nagaya/jobs (one per user, 0700)
    max_jobs: int = 0                           # local: concurrent jobs; 0 = number of usable CPUs
    max_cpus: int = 0                           # local: CPUs handed out to jobs; 0 = all usable CPUs
    kill_grace: int = 10                        # seconds from TERM to KILL on cancel and time limit
    idle_exit: int = 300                        # local runner exits after this many idle seconds
    nagaya: str = ""                            # the nagaya executable jobs run; default: from PATH
    slurm_bin_dir: str = ""                     # where sbatch/squeue/... live; default: PATH
    partition: str = ""                         # default Slurm partition
    gridengine_bin: str = "/usr/bin"            # where Grid Engine's qsub/qstat/qacct/qdel/qmod live (never PATH:
                                                # PBS's qsub has the same name)
    sge_root: str = "/var/lib/gridengine"       # SGE_ROOT and SGE_CELL for those commands
    sge_cell: str = "default"
    gridengine_pe: str = "smp"                  # the parallel environment that gives a job CPUs (slots) on one host
    gridengine_pe_hosts: str = "mpi"            # the one for --nodes > 1 ($round_robin: one slot per host in turn);
                                                # both need control_slaves TRUE (qrsh -inherit: other hosts, job exec)
    gridengine_mem: str = "h_vmem"              # the complex for --mem (per slot, as Grid Engine counts it)
    gridengine_gpu: str = "gpu"                 # the consumable for --gpus
    gpu_lock_dir: str = "/var/lib/nagaya/gpu-locks"   # per node, made by root: jobs flock a file per GPU
    pbs_bin: str = "/opt/pbs/bin"               # where OpenPBS's qsub/qstat/qdel/qsig live (never PATH: Grid
                                                # Engine's qsub has the same name)
    portal_submit: str = "dispatcher"           # how the portal submits for users: dispatcher (root helper,
                                                # the user's own backend) | slurmrestd (JWT per user, no root)
    slurmrestd_url: str = ""                    # http://127.0.0.1:6820 or unix:/run/slurmrestd.socket
    slurmrestd_jwt_key: str = ""                # Slurm's jwt_key file (HS256), readable by the service account
    portal_pull_hours: int = 24                 # slurmrestd: the job's own pull token lives this long


class AppsConfig(Record):
    """The portal's interactive sessions (Jupyter, web apps, terminals): the site's limits, shown on the
    Sessions page and enforced by the server's cull pass."""

    idle_minutes: int = 60                      # no proxy traffic and no kernel activity this long: ended
    max_hours: int = 12                         # a session's whole life, extensions included (its job's limit)
    warn_minutes: int = 10                      # the page warns this long before a session is ended


class BuildsConfig(Record):
    """Builds from the portal, /api/builds and `nagaya build --submit` (server/builds.py): the site's limits."""

    upload_max: str = "256MiB"                  # an uploaded context's size at most
    unpacked_max: str = "2GiB"                  # ... once unpacked (the build job checks as it unpacks)
    git_hosts: str = ""                         # HOST or HOST:PORT builds may clone from, comma-separated; none: off
    git_schemes: str = "https"                  # git URL schemes allowed (never file/ssh/ext unless listed here)
    max_running: int = 2                        # one user's builds pending or running at once
    hours: int = 2                              # a build job's time limit


class BuildConfig(Record):
    """`nagaya build`: rootless buildah as the calling user (DESIGN.md: runc, since crun fails on hybrid cgroups)."""

    buildah: str = "/usr/bin/buildah"
    runtime: str = "/usr/sbin/runc"
    storage_dir: str = ""                       # buildah's layer cache; default: <cache_dir>/build/storage
    storage_driver: str = "overlay"             # overlay (rootless, kernel >= 5.13) | vfs (any file system, slower)


class Config(Record):
    runtime: RuntimeConfig = Factory(RuntimeConfig)
    image: ImageConfig = Factory(ImageConfig)
    gpu: GpuConfig = Factory(GpuConfig)
    audit: AuditConfig = Factory(AuditConfig)
    server: ServerConfig = Factory(ServerConfig)
    ldap: LdapConfig = Factory(LdapConfig)
    build: BuildConfig = Factory(BuildConfig)
    builds: BuildsConfig = Factory(BuildsConfig)
    sched: SchedConfig = Factory(SchedConfig)
    apps: AppsConfig = Factory(AppsConfig)

    @property
    def cache_root(self) -> str:
        """cache_dir as a str, for the run path (which does without pathlib). A node-local cache for a
        cluster whose $HOME is shared: cache_dir = "/var/tmp/nagaya-${USER}" (${UID}, ${NODE} also work)."""
        d = self.image.cache_dir
        return _expand(d) if "$" in d else d or os.path.join(_user_dir_strs()[0], "nagaya")

    @property
    def audit_file(self) -> str:
        """audit_path as a str."""
        return self.audit.path or os.path.join(_user_dir_strs()[2], "nagaya", "audit.jsonl")

    @property
    def cache_dir(self) -> Path:
        from pathlib import Path

        return Path(self.cache_root)

    @property
    def audit_path(self) -> Path:
        from pathlib import Path

        return Path(self.audit_file)

    @property
    def sched_state_dir(self) -> Path:
        from pathlib import Path

        return Path(self.sched.state_dir) if self.sched.state_dir else _user_dirs()[2] / "nagaya" / "jobs"

    @property
    def site_state_dir(self) -> Path:
        from pathlib import Path

        if self.server.state_dir:
            return Path(self.server.state_dir)
        return Path("/var/lib/nagaya/site") if os.geteuid() == 0 else _user_dirs()[2] / "nagaya" / "site"


_SECTIONS = ("runtime", "image", "gpu", "audit", "server", "ldap", "build", "sched", "builds", "apps")


def _coerce(current: Any, value: Any, where: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise UsageError(f"config {where}: expected true/false, got {value!r}")
        return bool(value)
    if isinstance(current, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"config {where}: expected a number, got {value!r}") from None
    if isinstance(current, list):
        if isinstance(value, str):
            return [v for v in value.split(":") if v]
        if not isinstance(value, list):
            raise UsageError(f"config {where}: expected a list, got {value!r}")
        return [v if isinstance(v, dict) else str(v) for v in value]     # tables: [image] policy rules
    if not isinstance(value, str):
        raise UsageError(f"config {where}: expected a string, got {value!r}")
    return value


def _apply(cfg: Config, data: dict[str, Any], origin: str, locked: set[str]) -> None:
    for section, values in data.items():
        if section == "locked":
            continue
        if section not in _SECTIONS or not isinstance(values, dict):
            raise UsageError(f"{origin}: unknown config section [{section}]")
        obj = getattr(cfg, section)
        names = set(obj._fields())
        for key, value in values.items():
            if key not in names:
                raise UsageError(f"{origin}: unknown config key {section}.{key}")
            if f"{section}.{key}" in locked:
                continue
            setattr(obj, key, _coerce(getattr(obj, key), value, f"{section}.{key}"))


_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _plain_string(text: str) -> tuple[str, str] | None:
    """A "basic" string without escapes or a 'literal' string at the start of `text`: (value, rest)."""
    if text[:1] not in ('"', "'") or text.startswith(('"""', "'''")):
        return None
    end = text.find(text[0], 1)
    if end < 0 or (text[0] == '"' and "\\" in text[1:end]):
        return None
    return text[1:end], text[end + 1:].lstrip(" \t")


def _plain_table(text: str) -> tuple[dict[str, Any], str] | None:
    """A one-line inline table of bare keys and plain strings or arrays of them (a policy rule): (value, rest)."""
    if text[:1] != "{":
        return None
    out: dict[str, Any] = {}
    rest = text[1:].lstrip(" \t")
    if rest[:1] == "}":
        return out, rest[1:].lstrip(" \t")
    while True:
        key, eq, rest = rest.partition("=")
        key, rest = key.strip(" \t"), rest.lstrip(" \t")
        if not eq or not key or not _BARE_KEY.issuperset(key) or key in out:
            return None
        value: Any
        if rest[:1] == "[":
            value, rest = [], rest[1:].lstrip(" \t")
            while rest[:1] != "]":
                item = _plain_string(rest)
                if item is None:
                    return None
                value.append(item[0])
                rest = item[1]
                if rest[:1] == ",":
                    rest = rest[1:].lstrip(" \t")
                elif rest[:1] != "]":
                    return None
            rest = rest[1:].lstrip(" \t")
        else:
            item = _plain_string(rest)
            if item is None:
                return None
            value, rest = item
        out[key] = value
        if rest[:1] == "}":
            return out, rest[1:].lstrip(" \t")
        if rest[:1] != ",":
            return None
        rest = rest[1:].lstrip(" \t")


def _code_depth(line: str) -> tuple[str, int]:
    """The line without its comment, and how many brackets it leaves open (quotes respected)."""
    depth, quote = 0, ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#":
            return line[:i], depth
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
    return line, depth


def _logical_lines(text: str) -> list[str] | None:
    """Lines, with a multi-line array value joined into its key's line (comments inside dropped)."""
    out: list[str] = []
    buf: str | None = None
    depth = 0
    for raw in text.split("\n"):
        if buf is None and "[" not in raw:
            out.append(raw)                 # nothing opens here: skip the character scan (every run parses this)
            continue
        code, d = _code_depth(raw)
        if buf is not None:
            buf, depth = buf + " " + code.strip(" \t"), depth + d
            if depth <= 0:
                out.append(buf)
                buf = None
            continue
        line = raw.strip(" \t")
        if line and line[0] not in "[#" and "=" in line and d > 0:
            buf, depth = code.strip(" \t"), d
            continue
        out.append(raw)
    return out if buf is None else None


def _parse_plain(text: str) -> dict[str, Any] | None:
    """The TOML config files use, without importing tomllib (and the `re` it pulls in): [table] headers,
    bare keys, and as values strings without escapes, integers, booleans and one-line arrays of such
    strings. Anything else, including every invalid document, returns None: tomllib decides those."""
    if "\r" in text or "\x7f" in text or any(c < " " and c not in "\t\n" for c in text):
        return None
    doc: dict[str, Any] = {}
    table = doc
    lines = _logical_lines(text)
    if lines is None:
        return None
    for raw in lines:
        line = raw.strip(" \t")
        if not line or line[0] == "#":
            continue
        if line[0] == "[":
            name, _, rest = line[1:].partition("]")
            rest = rest.lstrip(" \t")
            if not name or not _BARE_KEY.issuperset(name) or name in doc or (rest and rest[0] != "#"):
                return None
            table = doc[name] = {}
            continue
        key, eq, rest = line.partition("=")
        key, rest = key.rstrip(" \t"), rest.lstrip(" \t")
        if not eq or not key or not _BARE_KEY.issuperset(key) or key in table or not rest:
            return None
        value: Any
        if rest[0] == "[":
            value, rest = [], rest[1:].lstrip(" \t")
            while rest[:1] != "]":
                item = _plain_string(rest) or _plain_table(rest)
                if item is None:
                    return None
                value.append(item[0])
                rest = item[1]
                if rest[:1] == ",":
                    rest = rest[1:].lstrip(" \t")
                elif rest[:1] != "]":
                    return None
            rest = rest[1:].lstrip(" \t")
        elif rest[0] in "\"'":
            item = _plain_string(rest)
            if item is None:
                return None
            value, rest = item
        else:
            token, hash_, _comment = rest.partition("#")
            token, rest = token.rstrip(" \t"), hash_
            digits = token[1:] if token[:1] in "+-" else token
            if token in ("true", "false"):
                value = token == "true"
            elif digits.isascii() and digits.isdigit() and (digits == "0" or digits[0] != "0"):
                value = int(token)
            else:
                return None
        if rest and rest[0] != "#":
            return None
        table[key] = value
    return doc


CONFIG_MAX = 1 << 20           # bytes: far more than any configuration needs


def _read_toml(path: str | Path) -> dict[str, Any] | None:
    # A regular file only, opened non-blocking and size-capped: a FIFO, or a link to /dev/zero, placed as a
    # config must neither hang nor exhaust the process (the portal's dispatcher runs this as the user). A
    # link is resolved first (dotfile managers link configs): it leads nowhere the reader could not go.
    from nagaya import safefs

    try:
        raw = safefs.read_at(None, os.path.realpath(path), max_size=CONFIG_MAX)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    except safefs.UnsafePath as e:
        raise UsageError(f"{path}: {e.message} (a configuration must be a plain file)") from None
    try:
        plain = _parse_plain(raw.decode())
    except UnicodeDecodeError:
        plain = None
    if plain is not None:
        return plain
    import tomllib

    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: invalid TOML: {e}") from None


# what a user may not loosen for themselves
SITE_ONLY = frozenset({"image.policy", "image.keys_dir", "image.vulndb", "image.vuln_block", "image.vuln_allow"})


def load() -> Config:
    cfg = Config()
    locked: set[str] = set(SITE_ONLY)
    site_path = globals().get("SITE_CONFIG", _SITE_CONFIG)
    site = _read_toml(site_path)
    if site:
        _apply(cfg, site, str(site_path), set())
        locked = {str(x) for x in site.get("locked", [])} | SITE_ONLY
    user_file = os.path.join(_user_dir_strs()[1], "nagaya", "nagaya.toml")
    user = _read_toml(user_file)
    if user:
        _apply(cfg, user, str(user_file), locked)
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        for name in obj._fields():
            key = f"{section}.{name}"
            env = os.environ.get(f"NAGAYA_{section.upper()}_{name.upper()}")
            if env is not None and key not in locked:
                setattr(obj, name, _coerce(getattr(obj, name), env, key))
    return cfg
