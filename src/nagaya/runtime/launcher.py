"""`nagaya run`: the supervisor that builds a container in namespaces of its own and waits for it.

Process tree (no daemon; everything is a descendant of the user's `nagaya run`):

    nagaya run (S)          user+mount+pid namespaces unshared in-process; mounts the image (FUSE, fd
    │                       passed to squashfuse), the overlay; forwards signals; records the audit entry
    └── backend (B, pid 1)  bwrap or runc, exec'd by a fork of S; pid 1 of the new pid namespace
        ├── squashfuse_ll   serves the image; started by B before its exec, so B reaps it
        └── the app         in S's process group, so TTY job control and group STOP/CONT just work

Cleanup needs no code on the failure paths: every mount lives only in S's private mount namespace, and
B (with PDEATHSIG) is pid 1 of the pid namespace, so when S dies for any reason, B dies, the kernel
kills every process of the container, and the namespace with all its mounts goes away.
"""

from __future__ import annotations

import _signal as signal  # the `signal` module only adds enum wrappers, and `import enum` costs ~1.5 ms
import errno
import marshal
import os
import stat
import time

from nagaya import audit
from nagaya.config import FUSE_SERVER_COMMS, Config
from nagaya.errors import (
    CommandNotExecutable,
    CommandNotFound,
    NagayaError,
    RuntimeSetupError,
    UsageError,
)
from nagaya.runtime import environment, identity, linux
from nagaya.runtime.backends import SandboxPlan, get
from nagaya.runtime.identity import Identity
from nagaya.runtime.rootpath import RootView
from nagaya.runtime.spec import Bind, RunConfig, RunSpec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nagaya.runtime.gpu import GpuPlan

FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGALRM)
SI_KERNEL = 0x80
# System directories: never shadowed by binding the caller's cwd over them.
SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/proc",
               "/root", "/run", "/sbin", "/srv", "/sys", "/usr", "/var")
SYSTEM_TREES = ("/bin/", "/boot/", "/dev/", "/etc/", "/lib", "/proc/", "/run/", "/sbin/", "/sys/", "/usr/")
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/localtime")


def _fail_child(msg: str) -> None:
    try:
        os.write(2, f"nagaya: {msg}\n".encode())
    except OSError:
        pass
    os._exit(125)


def _create_empty(path: str) -> None:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        pass


class Launcher:
    def __init__(self, spec: RunSpec, image: RunConfig, cfg: Config, starter_plan: bool = False) -> None:
        self.spec = spec
        self.image = image
        self.cfg = cfg
        self.ident = Identity.current()
        self.stage = ""
        self.prefetch = ""                  # the command's file in the image, to read ahead
        self.gpu: GpuPlan | None = None     # --gpus / --device: what the devices add
        self.job_record: tuple[int, str] | None = None   # in a batch job: (runtime dir fd, record name)
        # the compiled starter's plan (runtime/fastplan.py): wanted, its directory, and its text once made
        self.starter_plan = starter_plan
        self.plan_dir: int | None = None
        self.plan_text = ""
        self.bypass: list[str] = []         # the image's top-level directories bound past the overlay
        self.keeper_conn: object = None     # held open while the container runs: the keeper counts it
        self.gpu_staged: list[tuple[str, str]] = []     # (host file, lib/NAME or bin/NAME) bound in stage/gpu

    # -- checks that need no namespace -----------------------------------------------------------
    def _binds(self, cwd: str) -> list[Bind]:
        binds: list[Bind] = []
        home = self.ident.home
        if not self.spec.no_home and home and home != "/" and os.path.isdir(home):
            binds.append(Bind(home, home))
        binds.append(Bind("/tmp", "/tmp"))
        under = [b.dst.rstrip("/") + "/" for b in binds]
        if (cwd not in SYSTEM_DIRS and not cwd.startswith(SYSTEM_TREES)
                and not any((cwd + "/").startswith(u) for u in under)):
            binds.append(Bind(cwd, cwd))
        for b in self.spec.binds:
            if not os.path.exists(b.src):
                raise UsageError(f"bind source {b.src} does not exist")
            if not b.dst.startswith("/") or "/../" in b.dst + "/" or b.dst.rstrip("/") in ("", "/proc", "/dev"):
                raise UsageError(f"bind destination {b.dst!r} must be an absolute path other than /, /proc, /dev")
            binds.append(b)
        return binds

    def _overlay_dirs(self) -> tuple[str, str]:
        d = os.path.abspath(os.path.expanduser(self.spec.overlay_dir))
        try:
            st = os.stat(d)
        except FileNotFoundError:
            try:
                os.makedirs(d, mode=0o700)
            except OSError as e:
                raise UsageError(f"cannot create overlay directory {d}: {e.strerror}") from None
            st = os.stat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"overlay {d} is not a directory")
        from nagaya import safefs

        try:                    # yours, and on a path nobody else can swap under you
            d = safefs.private_dir(d)
        except (OSError, safefs.UnsafePath) as e:
            raise UsageError(f"overlay directory {d} is not yours alone: {safefs.describe(e)}; "
                             "choose one of your own") from None
        for sub in ("upper", "work"):
            os.makedirs(os.path.join(d, sub), mode=0o755, exist_ok=True)
        return os.path.join(d, "upper"), os.path.join(d, "work")

    # -- namespace set-up -----------------------------------------------------------------------
    def _enter_namespaces(self) -> None:
        flags = linux.CLONE_NEWUSER | linux.CLONE_NEWNS
        if self.cfg.runtime.pid_namespace:
            flags |= linux.CLONE_NEWPID
        if self.spec.hostname:
            flags |= linux.CLONE_NEWUTS
        helper = self._start_idmap_helper() if self._wants_idmap() else None
        audit.open_spool(self.cfg)
        self._open_job_record()
        if self.starter_plan:
            from nagaya.runtime import fastplan

            self.plan_dir = fastplan.open_plan_dir()
        stages = self._staging_candidates()
        try:
            linux.unshare(flags)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOSPC, errno.EINVAL):
                raise RuntimeSetupError(
                    "unprivileged user namespaces are disabled on this host "
                    "(sysctl user.max_user_namespaces / kernel.unprivileged_userns_clone): ask your admin"
                ) from None
            raise
        if helper is None:
            linux.map_self(self.ident.uid, self.ident.gid)
        else:
            pid, w = helper
            os.write(w, b"g")
            os.close(w)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise RuntimeSetupError("newuidmap/newgidmap could not map the container's root "
                                        "(see the message above)")
        if self.spec.hostname:
            import socket

            socket.sethostname(self.spec.hostname)
        linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
        for cand, ident in stages:
            # on the directory checked before unsharing (same device and inode), through an fd of this
            # mount namespace: never on whatever the name leads to now
            try:
                fd = os.open(cand, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != ident:
                    continue
                linux.mount("tmpfs", f"/proc/self/fd/{fd}", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0700")
            except OSError:
                continue
            finally:
                os.close(fd)
            self.stage = cand
            break
        if not self.stage:
            raise RuntimeSetupError("no staging directory could be mounted")
        for d in ("lower", "upper", "work", "root", "gen"):
            os.mkdir(os.path.join(self.stage, d), 0o755)

    def _staging_candidates(self) -> list[tuple[str, tuple[int, int]]]:
        return staging_candidates(self.ident.uid, self.cfg.runtime.staging_dir)

    def _wants_idmap(self) -> bool:
        """Map the image's ids (0..65535) onto the user's subordinate range, keeping the user's own id.
        Needed by runc (it needs a root) and by writable runs (overlayfs copy-up must chown to the
        image's owners); read-only bwrap runs map only the user, which needs no setuid helper."""
        return self.spec.backend in ("runc", "oci") or bool(self.spec.writable_tmpfs or self.spec.overlay_dir)

    def _start_idmap_helper(self) -> tuple[int, int] | None:
        """Only setuid newuidmap/newgidmap may map subordinate ids, and only from outside the namespace:
        a helper forked now waits until we have unshared, then writes our maps."""
        import shutil

        from nagaya.runtime import subids

        su = subids.ranges("/etc/subuid", self.ident.name, self.ident.uid)
        sg = subids.ranges("/etc/subgid", self.ident.name, self.ident.uid)
        if not su or not sg or not shutil.which("newuidmap"):
            if self.spec.backend in ("runc", "oci"):
                raise RuntimeSetupError(
                    f"the runc backend needs a subordinate uid/gid range for {self.ident.name} in /etc/subuid "
                    f"and /etc/subgid: ask your admin (`nagaya admin subid {self.ident.name}` prints the lines), "
                    "or use --backend bwrap")
            return None
        r, w = os.pipe()
        target = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                if os.read(r, 1) != b"g":
                    os._exit(1)
                for exe, own, (start, count) in (("newuidmap", self.ident.uid, su[0]),
                                                 ("newgidmap", self.ident.gid, sg[0])):
                    rc = os.spawnvp(os.P_WAIT, exe, [exe, str(target), *_keep_id_map(own, start, count)])
                    if rc != 0:
                        os._exit(1)
                os._exit(0)
            except BaseException:
                os._exit(1)
        os.close(r)
        return pid, w

    def _mount_image(self, fusefd: int) -> None:
        """Mount the image. The FUSE mount is made before squashfuse runs (the kernel queues its INIT
        request), so that squashfuse can start at once and its start-up overlaps our host-side work."""
        lower = os.path.join(self.stage, "lower")
        if fusefd >= 0:
            # default_permissions: the kernel checks modes and owners, as the overlay above it does for every
            # path it covers (the image's directories bound past it, _bypass_overlay, must answer the same)
            opts = (f"fd={fusefd},rootmode=40000,user_id={self.ident.uid},group_id={self.ident.gid},"
                    "default_permissions")
            linux.mount("nagaya", lower, "fuse.squashfuse", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_RDONLY, opts)
        else:
            linux.mount(self.spec.unpacked, lower, None, linux.MS_BIND | linux.MS_REC)
            linux.mount("none", lower, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY |
                        linux.MS_NOSUID | linux.MS_NODEV)

    def _keepable(self) -> bool:
        """Read-only runs that map only the user (as the keeper's namespace does), of an image file in a cache
        (not a lazy reader's, which ends with its run): served by the user's keeper (runtime.keeper)."""
        sq, cfg = self.spec.squashfs, self.cfg
        roots = [r.rstrip("/") + "/" for r in (cfg.cache_root, *cfg.image.shared_cache_dirs) if r]
        return (cfg.runtime.keep_mounted > 0 and os.access(cfg.runtime.keeper, os.X_OK) and bool(sq)
                and not self._wants_idmap()
                and any(sq.startswith(r) for r in roots) and not sq.startswith(cfg.cache_root + "/lazy/"))

    def _keeper_mount(self) -> int:
        """A clone of the keeper's mount of the image (attached after unsharing), or -1: mount it ourselves.
        The connection stays open (close-on-exec) until this supervisor exits: the keeper counts it."""
        from nagaya.runtime import fastplan, keeper

        staging = self._keeper_staging()
        dirfd = fastplan.open_plan_dir() if staging else None
        if dirfd is None:
            return -1
        try:
            image = os.open(self.spec.squashfs, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(dirfd)
            return -1               # mounting it ourselves gives the usual error
        try:
            rt = self.cfg.runtime
            self.keeper_conn, fd = keeper.request(dirfd, image, self.spec.squashfs_offset, rt.squashfuse,
                                                  rt.keeper, rt.keep_mounted, staging)
            return fd
        except keeper.ImageRefused:
            raise RuntimeSetupError(f"image {self.spec.image_ref} could not be mounted: its file "
                                    f"{self.spec.squashfs} is corrupt; remove and re-import it") from None
        except keeper.KeeperUnavailable:
            return -1
        finally:
            os.close(image)
            os.close(dirfd)

    def _keeper_staging(self) -> str:
        """The directory the keeper mounts its tmpfs over, in its own mount namespace: this run's staging
        directory, checked as ever (a keeper started from here lives on after this run)."""
        cands = self._staging_candidates()
        return cands[0][0] if cands else ""

    def _check_image(self) -> None:
        try:
            os.listdir(os.path.join(self.stage, "lower"))   # the first request: fails at once if squashfuse
        except OSError:                                     # refused the file (or could not start)
            raise RuntimeSetupError(f"image {self.spec.image_ref} could not be mounted: its file "
                                    f"{self.spec.squashfs} is corrupt; remove and re-import it") from None

    def _prepare_upper(self, upper: str, binds: list[Bind], extra: dict[str, str]) -> None:
        """Create mount points that the image lacks, in the overlay's upper layer (the image's own
        directories belong to its root, which is not mapped in the user namespace)."""
        lower_view = RootView(os.path.join(self.stage, "lower"), [])
        targets = [(b.dst, os.path.isdir(b.src)) for b in binds] + [(d, False) for d in extra]
        # Directories already looked at, each a lookup in the image (a FUSE round trip): a driver's
        # libraries are a dozen binds into one directory the image lacks.
        seen: dict[str, str] = {}
        hops = 0
        while targets:
            dst, is_dir = targets.pop(0)
            parts = [p for p in dst.split("/") if p]
            cur = ""
            for i, p in enumerate(parts):
                parent, cur = cur, f"{cur}/{p}"
                last = i == len(parts) - 1
                if not last and seen.get(cur) == "dir":
                    continue
                if seen.get(parent) == "made":      # below a directory we made: nothing in the image
                    target = upper + cur
                    if last and not is_dir:
                        _create_empty(target)
                    else:
                        os.makedirs(target, exist_ok=True)
                        seen[cur] = "made"
                    continue
                resolved = lower_view.resolve(cur)
                if last and dst in extra and os.path.islink(lower_view.host_path(cur)):
                    # /etc/resolv.conf or /etc/localtime as a symlink (often dangling in minimal images):
                    # a plain file in the upper layer hides it, and the host's file is bound there.
                    os.makedirs(os.path.dirname(upper + cur), exist_ok=True)
                    _create_empty(upper + cur)
                    break
                if resolved is not None and resolved != cur:
                    # A symlink in the image (/lib -> usr/lib): the backend follows it, so the mount point
                    # is made at the link's target, which may be missing (/usr/lib/firmware/nvidia/V).
                    hops += 1
                    if not last and hops <= 40:
                        targets.append(("/".join([resolved.rstrip("/"), *parts[i + 1:]]), is_dir))
                    break
                host_lower = lower_view.host_path(cur)
                if os.path.lexists(host_lower) and (not last or os.path.isdir(host_lower) == is_dir):
                    if not last:
                        seen[cur] = "dir"
                    continue
                target = upper + cur
                if last and not is_dir:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    _create_empty(target)
                else:
                    os.makedirs(target, exist_ok=True)
                    if not os.path.lexists(host_lower):
                        seen[cur] = "made"

    def _bypass_overlay(self, root: str, upper: str, binds: list[Bind]) -> list[str]:
        """Read-only runs: each top-level directory of the image that the upper layer leaves alone is bound from
        the image straight over the overlay's (the bind keeps the image mount's ro, nosuid, nodev; bwrap's
        --remount-ro covers it too). overlayfs gives every file below it a second inode and dentry and every
        lookup a second walk: a fresh container's first `find` over 20k files cost 277 ms through it against
        177 ms past it, the second `find` 106 against 61 ms (bench/io). Writable runs and CDI hooks (which
        may write into the image's directories) keep the whole overlay. The compiled starter replays the list."""
        lower = os.path.join(self.stage, "lower")
        # (and none the backend mounts over whole: /proc, /dev, /sys, /tmp)
        touched = {*os.listdir(upper), "proc", "dev", "sys", *(b.dst[1:] for b in binds if b.dst.count("/") == 1)}
        names = []
        with os.scandir(lower) as it:
            for e in it:
                if e.name not in touched and e.is_dir(follow_symlinks=False):
                    names.append(e.name)
        names.sort()
        for n in names:
            linux.mount(os.path.join(lower, n), os.path.join(root, n), None, linux.MS_BIND)
        return names

    def _mount_overlay(self, upper: str, work: str) -> str:
        root = os.path.join(self.stage, "root")
        lower = os.path.join(self.stage, "lower")
        try:
            linux.mount("overlay", root, "overlay", linux.MS_NOSUID | linux.MS_NODEV,
                        f"lowerdir={lower},upperdir={upper},workdir={work},userxattr")
        except OSError as e:
            raise RuntimeSetupError(f"cannot mount the container's overlay ({e.strerror}); "
                                    "the kernel must allow overlayfs in user namespaces (Linux >= 5.11)") from None
        return root

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> int:
        started = time.monotonic()
        code: int | None = None
        try:
            code = self._run()
            return code
        finally:
            if self.job_record is not None:
                from nagaya.runtime import jobrecord

                jobrecord.remove(*self.job_record)
            if code is not None:
                self._audit(code, time.monotonic() - started)
            if self.plan_dir is not None:
                if self.plan_text:
                    from nagaya.runtime import fastplan

                    fastplan.write(self.plan_dir, self.spec.image_ref, self.plan_text, self.spec.gpus)
                os.close(self.plan_dir)

    def _audit(self, code: int, duration: float) -> None:
        audit.record(audit.AuditEvent(
            action="run", user=self.ident.name, uid=self.ident.uid, image=self.spec.image_ref,
            digest=self.spec.digest, command=self.final_argv if hasattr(self, "final_argv") else self.spec.argv,
            cwd=self.host_cwd, host=os.uname().nodename, exit_code=code, duration_s=round(duration, 4),
            details=self._run_options()), self.cfg)

    def _run_options(self) -> dict[str, object]:
        """What `nagaya reproduce --run ID` needs besides digest and command (environment values excepted)."""
        spec = self.spec
        d: dict[str, object] = {"backend": spec.backend}
        if hasattr(self, "container_cwd"):
            d["pwd"] = self.container_cwd
        if spec.binds:
            d["binds"] = [f"{b.src}:{b.dst}:{'ro' if b.readonly else 'rw'}" for b in spec.binds]
        for key in ("writable_tmpfs", "overlay_dir", "gpus", "devices", "cleanenv", "no_home", "hostname"):
            if getattr(spec, key):
                d[key] = getattr(spec, key)
        if spec.env:
            d["env_keys"] = sorted(spec.env)
        return d

    def _run(self) -> int:
        spec, cfg = self.spec, self.cfg
        try:
            self.host_cwd = os.getcwd()
        except FileNotFoundError:
            self.host_cwd = self.ident.home
        binds = self._binds(self.host_cwd)
        gpu_env: dict[str, str] = {}
        gp = None
        if spec.gpus or spec.devices:
            from nagaya.runtime import gpu

            gp = gpu.plan(spec.gpus, cfg.gpu, cache_root=cfg.cache_root) if spec.gpus else None
            if spec.devices:
                gp = gpu.device_plan(spec.devices, cfg.gpu, cfg.cache_root, gp)
            for note in gp.notes:
                os.write(2, f"nagaya: note: {note}\n".encode())
            binds += [b for b in gp.binds if all(b.dst != o.dst for o in binds)]
            gpu_env = gp.env
        self.gpu = gp
        overlay = self._overlay_dirs() if spec.overlay_dir else None
        backend = get(spec.backend, cfg.runtime.runc if spec.backend in ("runc", "oci") else cfg.runtime.bwrap)
        if not os.access(backend.exe if hasattr(backend, "exe") else "", os.X_OK):  # type: ignore[attr-defined]
            raise RuntimeSetupError(f"{spec.backend} is not installed")
        use_fuse = not spec.unpacked
        lock_fd = self._hold_image()
        if overlay:
            import fcntl

            ofd = os.open(os.path.dirname(overlay[0]), os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(ofd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"overlay {spec.overlay_dir} is in use by another container") from None

        clone = self._keeper_mount() if use_fuse and self._keepable() else -1
        signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARD, signal.SIGCHLD})
        self._enter_namespaces()
        fusefd = -1
        kept = False
        if clone >= 0:
            try:
                linux.attach_mount(clone, os.path.join(self.stage, "lower"))  # served by the keeper, checked there
                kept = True
            except OSError:
                pass                        # refused (an LSM, an old kernel): mount the image ourselves
            finally:
                os.close(clone)
        if not kept and use_fuse:
            try:
                fusefd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise RuntimeSetupError(f"/dev/fuse cannot be opened ({e.strerror})") from None
        if not kept:
            self._mount_image(fusefd)
        b_r, b_w = os.pipe()
        st_r, st_w = os.pipe() if spec.backend == "bwrap" else (-1, -1)
        pid = os.fork()
        if pid == 0:
            self._backend_child(fusefd, b_r, b_w, st_r, lock_fd)
        if fusefd >= 0:
            os.close(fusefd)                # squashfuse's is then the only one: if it dies, requests fail
        os.close(b_r)
        if st_w >= 0:
            os.close(st_w)
        try:
            env = self._environment(gpu_env)    # host-side work first, while squashfuse starts
            if fusefd >= 0:
                self._check_image()
            upper, work = overlay or (os.path.join(self.stage, "upper"), os.path.join(self.stage, "work"))
            extra = self._generated_files()
            if not overlay and not spec.writable_tmpfs:
                extra = self._bake_files(upper, extra)
            if gp is not None and gp.paths:
                binds = self._stage_gpu_dir(binds, gp.links)
            self._prepare_upper(upper, binds, extra)
            root = self._mount_overlay(upper, work)
            if not (overlay or spec.writable_tmpfs or spec.backend != "bwrap" or (gp is not None and gp.hooks)):
                self.bypass = self._bypass_overlay(root, upper, binds)
            plan = self._plan(root, binds, extra, env)
            if st_w >= 0:
                plan.status_fd = st_w
            argv, env = backend.command(plan)
            if self.plan_dir is not None:
                self._starter_plan(argv, env, plan, upper, extra, gp, overlay, lock_fd)
            if gp is not None and gp.hooks:
                self._cdi_hooks(gp, ("createRuntime", "prestart", "createContainer"), root, env, "creating")
            os.write(b_w, marshal.dumps({"argv": argv, "env": env, "status_fd": st_w,
                                         "as_root": backend.name == "runc"}))
            os.close(b_w)
            if gp is not None and gp.hooks:
                self._cdi_hooks(gp, ("poststart",), root, env, "running")
            self._write_job_record(pid, plan)
        except BaseException:
            try:
                os.close(b_w)               # the backend child sees EOF and exits
            except OSError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            raise
        return self._supervise(pid, st_r)

    def _starter_plan(self, argv: list[str], env: dict[str, str], plan: SandboxPlan, upper: str,
                      extra: dict[str, str], gp: GpuPlan | None, overlay: tuple[str, str] | None, lock_fd: int) -> None:
        """Write down this run for the compiled starter if it is the plain case the starter replays: bwrap, a
        read-only image of the user's own cache on squashfuse, no option but --gpus (nagaya's own discovery,
        no CDI hooks), and only $HOME and /tmp bound besides the GPUs' (the current directory inside one of
        them, or a system directory). A batch job's record is the starter's own to write, as the Python
        launcher writes it."""
        spec, cfg = self.spec, self.cfg
        gpu_binds = [] if gp is None else [*gp.binds, *(b for b in plan.binds if b.dst == "/.nagaya/gpu"
                                                         and b.src == os.path.join(self.stage, "gpu"))]
        if gp is not None and (gp.source not in ("nvidia", "amd") or gp.hooks or gp.notes or spec.devices):
            return                          # a CDI spec, its hooks, or notes to print: the Python path's
        if (spec.backend != "bwrap" or overlay or spec.writable_tmpfs or spec.unpacked
                or spec.squashfs_offset or spec.hostname or spec.binds or spec.env or spec.cleanenv or spec.pwd
                or spec.no_home or spec.shell or extra or env is not plan.env or lock_fd < 0
                or cfg.image.policy or cfg.image.vuln_block or cfg.image.shared_cache_dirs
                or not spec.squashfs.startswith(cfg.cache_root + "/")
                or self.stage not in (cfg.runtime.staging_dir, f"/tmp/.nagaya-{self.ident.uid}")
                or any((b.dst not in (self.ident.home, "/tmp") or b.src != b.dst or b.readonly or b.device)
                       and b not in gpu_binds for b in plan.binds)):
            return
        tail = len(plan.argv)
        template = list(argv[:len(argv) - tail])
        if template[-1:] != ["--"] or "--chdir" not in template or "--json-status-fd" not in template:
            return
        from nagaya.runtime import fastplan

        template[template.index("--chdir") + 1] = fastplan.CWD_MARK
        template[template.index("--json-status-fd") + 1] = fastplan.FD_MARK
        upper_files = fastplan.snapshot_upper(upper)
        if upper_files is None:
            return
        lock = os.path.join(cfg.cache_root, "locks", f"use-{spec.digest[7:]}")
        views = [(b.src, b.dst, "gpu" if b in gpu_binds else "base") for b in plan.binds]
        self.plan_text = fastplan.render(self, cfg, template, views, upper_files, lock, self.bypass)

    def _open_job_record(self) -> None:
        """In a batch job: the private runtime dir, opened and checked before unsharing (where owners can
        still be told apart), for the record `nagaya job exec` finds the container by."""
        if "SLURM_JOB_ID" not in os.environ and "NAGAYA_JOB_ID" not in os.environ \
                and "NAGAYA_BATCH_JOB" not in os.environ:      # Grid Engine / PBS (sched/batchwrap.py)
            return
        from nagaya.runtime import jobrecord

        key = jobrecord.job_key()
        if key is None:
            return
        try:
            fd = jobrecord.open_dir(create=True)
        except Exception as e:          # the job runs on; only `job exec` will not find it
            os.write(2, f"nagaya: note: no record for `nagaya job exec`: {e}\n".encode())
            return
        self.job_record = (fd, jobrecord.record_name(*key))

    def _write_job_record(self, bpid: int, plan: SandboxPlan) -> None:
        if self.job_record is None:
            return
        from nagaya.runtime import jobrecord

        with open("/proc/self/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
        rec = {"pid": os.getpid(), "start": start, "backend_pid": bpid,
               "userns": os.stat("/proc/self/ns/user").st_ino,
               "pidns": os.stat("/proc/self/ns/pid_for_children").st_ino,
               "uid": self.ident.uid, "cwd": plan.cwd, "env": plan.env, "argv": plan.argv,
               "image": self.spec.image_ref, "digest": self.spec.digest, "backend": self.spec.backend}
        try:
            jobrecord.write(self.job_record[0], self.job_record[1], rec)
            jobrecord.prune(self.job_record[0], self.job_record[1])
        except OSError as e:
            os.write(2, f"nagaya: note: no record for `nagaya job exec`: {e.strerror}\n".encode())
            self.job_record = None

    def _stage_gpu_dir(self, binds: list[Bind], links: dict[str, str]) -> list[Bind]:
        """The driver's libraries and tools bound into one directory of our staging tmpfs, with their
        soname links, which the backend then binds as /.nagaya/gpu: a mount syscall here costs ~10 us,
        a bind the backend makes ~100 us (bwrap and runc resolve, create and remount each one)."""
        from nagaya.runtime.gpu import GPU_BIN_DIR, GPU_LIB_DIR

        top = os.path.join(self.stage, "gpu")
        for d in ("", "lib", "bin"):
            os.mkdir(os.path.join(top, d), 0o755)
        kept = []
        for b in binds:
            sub = "lib" if b.dst.startswith(GPU_LIB_DIR + "/") else "bin" if b.dst.startswith(GPU_BIN_DIR + "/") else ""
            if not sub:
                kept.append(b)
                continue
            target = os.path.join(top, sub, os.path.basename(b.dst))
            self.gpu_staged.append((b.src, f"{sub}/{os.path.basename(b.dst)}"))
            _create_empty(target)
            linux.mount(b.src, target, None, linux.MS_BIND)
            try:                # read-only, keeping the flags the kernel locks for a user namespace's remount
                st_flags = os.statvfs(b.src).f_flag     # ST_NOSUID..ST_NODIRATIME are the MS_ values
                locked = st_flags & (linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | 1024 | 2048)
                locked |= 1 << 21 if st_flags & 4096 else 0      # ST_RELATIME -> MS_RELATIME
                linux.mount("none", target, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | locked)
            except OSError:
                pass            # still root's files, which the user cannot write
        for dst, link in links.items():
            os.symlink(link, os.path.join(top, "lib" if dst.startswith(GPU_LIB_DIR + "/") else "bin",
                                          os.path.basename(dst)))
        kept.append(Bind(top, GPU_LIB_DIR.rsplit("/", 1)[0], readonly=True))
        return kept

    def _cdi_hooks(self, gp: GpuPlan, names: tuple[str, ...], root: str, env: dict[str, str], status: str) -> None:
        """CDI hooks, run by us as the user with the OCI state on stdin, the bundle's config.json naming the
        prepared root (nvidia-ctk's hooks read it). startContainer and poststop hooks would need to run in
        the container or after its pid namespace has gone: they are reported, not run."""
        from nagaya.runtime import gpu

        bundle = os.path.join(self.stage, "bundle")
        cfg_file = os.path.join(bundle, "config.json")
        if not os.path.exists(cfg_file):            # bwrap: a bundle of just what hooks read
            import json

            os.makedirs(bundle, exist_ok=True)
            with open(cfg_file, "w") as f:
                json.dump({"ociVersion": "1.0.2", "root": {"path": root, "readonly": False},
                           "process": {"env": [f"{k}={v}" for k, v in env.items()]}}, f)
        if status == "creating":
            for h in gp.hooks:
                if h["hookName"] in ("startContainer", "poststop"):
                    os.write(2, f"nagaya: note: CDI {h['hookName']} hook {h['path']} not run\n".encode())
        for w in gpu.run_hooks(gp.hooks, names, {"ociVersion": "1.0.2", "id": f"nagaya-{os.getpid()}",
                                                 "status": status, "pid": os.getpid(), "bundle": bundle,
                                                 "annotations": {}}):
            os.write(2, f"nagaya: warning: {w}\n".encode())

    def _hold_image(self) -> int:
        """A shared lock on the image for as long as the container runs: `cache gc` skips it."""
        import fcntl

        locks = os.path.join(self.cfg.cache_root, "locks")
        try:
            if self.spec.squashfs and not self.spec.squashfs.startswith(self.cfg.cache_root + "/"):
                # a read-only shared cache: lock the squashfs itself (`admin maintain` gc's those caches)
                fd = os.open(self.spec.squashfs, os.O_RDONLY | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_SH)
                return fd
            os.makedirs(locks, exist_ok=True)
            fd = os.open(os.path.join(locks, f"use-{self.spec.digest[7:]}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            return fd
        except OSError:
            return -1

    def _backend_child(self, fusefd: int, b_r: int, b_w: int, st_r: int, lock_fd: int) -> None:
        """Runs in the fork that becomes pid 1 of the container's pid namespace. Never returns."""
        try:
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            os.close(b_w)
            if st_r >= 0:
                os.close(st_r)
            if fusefd >= 0:
                # The image is already mounted on this fd. posix_spawn (vfork + exec) spares squashfuse a
                # copy of this Python process, which it would drop at once.
                os.set_inheritable(fusefd, True)
                try:
                    at = ["-o", f"offset={self.spec.squashfs_offset}"] if self.spec.squashfs_offset else []
                    exe = self.cfg.runtime.squashfuse
                    os.posix_spawn(exe, [os.path.basename(exe), "-f", *at, self.spec.squashfs, f"/dev/fd/{fusefd}"],
                                   os.environ,
                                   # stderr too: a file it refuses is reported once, by _check_image (one line)
                                   file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
                                                 (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])
                except BaseException as e:
                    _fail_child(f"cannot start squashfuse: {e}")
                os.close(fusefd)
            data = b""
            while chunk := os.read(b_r, 65536):
                data += chunk
            if not data:
                os._exit(125)
            req = marshal.loads(data)
            # A mount namespace of B's own, with /proc of the container's pid namespace over /proc:
            # the backend (runc reads /proc/PID of its children) must see its own pid namespace.
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
            if req["status_fd"] >= 0:
                os.set_inheritable(req["status_fd"], True)
            if req.get("as_root"):
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)     # root of nagaya's namespace only: runc keeps its capabilities
                linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)   # a credential change cleared it
            for s in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(s, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.execve(req["argv"][0], req["argv"], req["env"])
        except BaseException as e:
            _fail_child(f"cannot start the container: {e}")
        os._exit(125)

    def _generated_files(self) -> dict[str, str]:
        lower = os.path.join(self.stage, "lower")
        shell = self.ident.shell if os.path.exists(lower + self.ident.shell) else "/bin/sh"
        gen = os.path.join(self.stage, "gen")
        files = {
            "/etc/passwd": identity.passwd_file(identity.read_image_file(lower, "etc/passwd"), self.ident, shell),
            "/etc/group": identity.group_file(identity.read_image_file(lower, "etc/group"), self.ident),
        }
        out = {}
        for dst, content in files.items():
            p = os.path.join(gen, os.path.basename(dst))
            with open(p, "w") as f:
                f.write(content)
            out[dst] = p
        for h in HOST_FILES:
            if os.path.isfile(h):
                out[h] = h
        return out

    def _bake_files(self, upper: str, extra: dict[str, str]) -> dict[str, str]:
        """Read-only runs: /etc/passwd, group, hosts, resolv.conf and localtime written into the upper layer
        (our staging tmpfs), where the overlay shows them over the image's, instead of bound one by one: the
        backend makes each ro-bind with a mount, a read of mountinfo and a remount (~0.3 ms apiece, more on a
        busy node). The root is remounted read-only, so they stay as unwritable as the binds were. Returns
        the files still to bind (all of them if the image's /etc is not a plain directory)."""
        lower_etc = os.path.join(self.stage, "lower", "etc")
        if os.path.islink(lower_etc) or not os.path.isdir(lower_etc):
            return extra
        os.makedirs(os.path.join(upper, "etc"), mode=0o755, exist_ok=True)
        left: dict[str, str] = {}
        for dst, src in extra.items():
            if os.path.dirname(dst) != "/etc":
                left[dst] = src
                continue
            try:
                with open(src, "rb") as f:
                    data = f.read(1 << 20)
                fd = os.open(upper + dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError:
                left[dst] = src
                continue
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return left

    def _environment(self, gpu_env: dict[str, str]) -> dict[str, str]:
        spec = self.spec
        user_env = dict(gpu_env)
        user_env.update(spec.env)
        env = environment.build(dict(os.environ), self.image.env, user_env, spec.cleanenv, self.ident.home,
                                self.ident.name)
        env["NAGAYA_CONTAINER"] = spec.image_ref
        env["NAGAYA_IMAGE_DIGEST"] = spec.digest
        if self.gpu is not None and self.gpu.paths:
            from nagaya.runtime.gpu import GPU_BIN_DIR, GPU_LIB_DIR

            env["LD_LIBRARY_PATH"] = ":".join(x for x in (env.get("LD_LIBRARY_PATH", ""), GPU_LIB_DIR) if x)
            env["PATH"] = env["PATH"] + ":" + GPU_BIN_DIR
        return env

    def _plan(self, root: str, binds: list[Bind], extra: dict[str, str], env: dict[str, str]) -> SandboxPlan:
        spec, img = self.spec, self.image
        view = RootView(root, [*binds, *(Bind(s, d) for d, s in extra.items())])
        if spec.pwd:
            cwd = spec.pwd
        elif not spec.argv and img.working_dir and not spec.shell:
            cwd = img.working_dir
        else:
            cwd = self.host_cwd
        if view.resolve(cwd) is None:
            if spec.pwd:
                raise UsageError(f"--pwd {spec.pwd}: no such directory in the container")
            cwd = "/"
        if spec.shell:
            sh = "/bin/bash" if view.find_command("bash", env["PATH"], cwd)[0] else "/bin/sh"
            argv = [sh, *spec.argv]
            env.setdefault("PS1", "Nagaya> ")
        else:
            ep = list(spec.entrypoint) if spec.entrypoint is not None else list(img.entrypoint)
            argv = ep + (list(spec.argv) if spec.argv else ([] if spec.entrypoint is not None and not img.cmd
                                                             else list(img.cmd)))
            if spec.entrypoint is not None and spec.argv:
                argv = list(spec.entrypoint) + list(spec.argv)
        if not argv:
            raise UsageError(f"image {spec.image_ref} has no default command: give one, e.g. "
                             f"`nagaya run {spec.image_ref} sh`")
        self.container_cwd = cwd
        found, reason = view.find_command(argv[0], env["PATH"], cwd)
        if not found:
            if reason == "not found":
                raise CommandNotFound(f"{argv[0]}: command not found in image {spec.image_ref}")
            raise CommandNotExecutable(f"{argv[0]}: {reason}")
        self.final_argv = argv
        if not spec.unpacked and view.found_host.startswith(root + "/"):
            self.prefetch = view.found_host             # in the image, not in a bind from the host
        return SandboxPlan(staging=self.stage, root=root, proc="/proc", binds=binds,
                           readonly=not (spec.writable_tmpfs or spec.overlay_dir), cwd=cwd, argv=argv, env=env,
                           uid=self.ident.uid, gid=self.ident.gid, extra_files=extra)

    # -- supervision ----------------------------------------------------------------------------
    def _supervise(self, bpid: int, st_r: int) -> int:
        if self.spec.backend != "bwrap":
            self._stop_watcher(bpid)
        if self.prefetch:
            _start_prefetch(self.prefetch)
        waitset = {*FORWARD, signal.SIGCHLD}
        started = False
        status_buf = b""
        while True:
            info = signal.sigwaitinfo(waitset)
            if info.si_signo == signal.SIGCHLD:
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        pid, status = bpid, 0
                    if pid == 0:
                        break
                    if pid == bpid:
                        if st_r >= 0:
                            status_buf += _read_all(st_r)
                            started = b"child-pid" in status_buf
                        self._report_backend_errors()
                        code = os.waitstatus_to_exitcode(status)
                        if code < 0:
                            code = 128 - code
                        if st_r >= 0 and not started:
                            raise RuntimeSetupError(f"the container could not be started ({self.spec.backend} "
                                                    f"exit {code})")
                        return code
                continue
            self._forward(bpid, info)

    def _stop_watcher(self, bpid: int) -> None:
        """runc puts the container in a session of its own, so a SIGSTOP/SIGCONT of our process group
        does not reach it; a small watcher outside the group relays our stopped state to the app."""
        me = os.getpid()
        pid = os.fork()
        if pid != 0:
            return
        try:
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            os.setpgid(0, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            stopped = False
            while True:
                try:
                    with open(f"/proc/{me}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                except OSError:
                    os._exit(0)
                if (state == "T") != stopped:
                    stopped = state == "T"
                    app = _first_leaf(bpid)
                    here = _pid_here(app) if app else None
                    if here:
                        try:
                            os.kill(here, signal.SIGSTOP if stopped else signal.SIGCONT)
                        except OSError:
                            pass
                time.sleep(0.02)
        finally:
            os._exit(0)

    def _report_backend_errors(self) -> None:
        """runc logs to a file in the private tmpfs (its warnings about cgroups are noise here);
        its errors still reach the user."""
        try:
            with open(os.path.join(self.stage, "runc.log")) as f:
                for line in f:
                    if "level=error" in line or "level=fatal" in line:
                        msg = line.split("msg=", 1)[-1].strip().strip('"')
                        os.write(2, f"nagaya: runc: {msg}\n".encode())
        except OSError:
            pass

    def _forward(self, bpid: int, info: signal.struct_siginfo) -> None:
        sig = info.si_signo
        if info.si_code == SI_KERNEL and self.spec.backend == "bwrap":
            return                          # from the terminal: the app, in our process group, has it too
        app = _first_leaf(bpid)
        if app is None:
            return
        if info.si_pid and _in_subtree(info.si_pid, bpid):
            return                          # the container signalled its own process group
        if _pending(app, sig):
            return                          # a group-wide signal the app got directly: do not double it
        try:
            os.kill(app, sig)
        except ProcessLookupError:
            pass


def staging_candidates(uid: int, site_dir: str) -> list[tuple[str, tuple[int, int]]]:
    """The site's staging directory (root's), else /tmp/.nagaya-UID (ours): each opened and checked now,
    in the host's user namespace, where root's and strangers' files can still be told apart. A name
    someone else made first, or a link, is passed over: a tmpfs mounted through it could hide a
    directory of ours inside the container."""
    from nagaya import safefs

    out = []
    own = f"/tmp/.nagaya-{uid}"
    # the last resort, if someone took our name in /tmp: a fresh one (mkdir is exclusive), left empty
    spare = f"{own}-{os.urandom(6).hex()}"
    for cand in (site_dir, own, spare):
        if not cand:
            continue
        if out:
            break                   # one checked candidate is enough (the site's, on every normal run)
        if cand in (own, spare):
            try:
                os.mkdir(cand, 0o700)
            except FileExistsError:
                pass
            except OSError:
                continue
        mine = cand in (own, spare)
        try:
            fd = safefs.open_dir(cand, (uid,) if mine else ())
        except (OSError, safefs.UnsafePath):
            continue
        st = os.fstat(fd)
        os.close(fd)
        if mine and st.st_uid != uid:
            continue
        out.append((cand, (st.st_dev, st.st_ino)))
    return out


def _keep_id_map(own: int, start: int, count: int) -> list[str]:
    """newuidmap arguments: ids 0..count-1 onto the subordinate range, except `own`, kept as itself."""
    args = []
    below = min(own, count)
    if below:
        args += ["0", str(start), str(below)]
    args += [str(own), str(own), "1"]
    if own + 1 < count:
        args += [str(own + 1), str(start + own), str(count - own - 1)]
    return args


PREFETCH_MAX = 16 << 20             # bytes of the command's file read ahead
PREFETCH_CHUNK = 128 << 10          # FUSE's largest read and squashfs's default block size


def _prefetch(path: str) -> None:
    """Read the command's file into the page cache while the backend sets up, in a thread of its own.
    Otherwise exec and the loader fault it in page by page from a cold FUSE mount, in unaligned reads
    that make squashfuse (which keeps a single data block decompressed) decompress most blocks twice:
    ~15 ms for a 2 MB busybox in a zstd image. Read ahead in aligned, block-sized chunks, each block is
    decompressed once, and on squashfuse's threads, in parallel with the backend's work. (One
    WILLNEED for the whole file reads only the first 128 KiB: the kernel caps it at the readahead size.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return                              # e.g. execute-only: the app still runs, just without this
    try:
        end = min(os.fstat(fd).st_size, PREFETCH_MAX)
        for off in range(0, end, PREFETCH_CHUNK):
            os.posix_fadvise(fd, off, PREFETCH_CHUNK, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass                                # the container has gone (the mount with it): nothing to do
    finally:
        os.close(fd)


def _start_prefetch(path: str) -> None:
    """_prefetch in a child (a thread cannot be made once we have unshared the pid namespace), since
    FUSE blocks a WILLNEED while a dozen reads are in flight. The child is in the container's pid
    namespace, so it dies with it; _supervise reaps it like any child that is not the backend."""
    try:
        if os.fork() != 0:
            return
    except OSError:
        return                              # the backend has exited already
    try:
        _prefetch(path)
    finally:
        os._exit(0)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 65536):
            out += chunk
    except OSError:                         # BlockingIOError included: nothing more for now
        pass
    return out


def _children(pid: int) -> list[int]:
    """Children of `pid`, from each process's stat (readable even when the parent runs as another id,
    as runc does: /proc/PID/task/TID/children is not)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


def _first_leaf(bpid: int) -> int | None:
    """The app: the backend's (bwrap's or runc's) child that is not the FUSE server."""
    for c in _children(bpid):
        try:
            with open(f"/proc/{c}/comm") as f:
                if f.read().strip().startswith(FUSE_SERVER_COMMS):
                    continue
        except OSError:
            continue
        return c
    return None


def _pid_here(pid: int) -> int | None:
    """A host pid (as /proc, the host's, shows it) in the calling process's own pid namespace: the stop watcher
    is forked into the container's, where kill() takes that namespace's numbers. (Before, its STOP went to
    another number; the app only seemed to stop because each exec waited on the FUSE server, stopped with us.)"""
    def nspids(p: str) -> list[str]:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return line.split()[1:]
        return []
    try:
        depth, theirs = len(nspids("self")), nspids(str(pid))
    except OSError:
        return None
    return int(theirs[depth - 1]) if depth and len(theirs) >= depth else None


def _in_subtree(pid: int, root: int) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def _pending(pid: int, sig: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (1 << (sig - 1)):
                    return True
    except (OSError, ValueError):
        pass
    return False


def run(spec: RunSpec, image: RunConfig, cfg: Config, starter_plan: bool = False) -> int:
    """`starter_plan`: the run is one the compiled starter may replay (cli/run_cmd.py decides from the
    command line); the launcher then writes its plan (runtime/fastplan.py) if the run qualifies."""
    try:
        return Launcher(spec, image, cfg, starter_plan).run()
    except NagayaError:
        raise
    except OSError as e:
        raise RuntimeSetupError(f"container setup failed: {e.strerror or e}") from None


