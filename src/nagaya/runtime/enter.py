"""`nagaya job exec` on the job's node: join the namespaces of a running job's container and run a command.

The container is found by the record its `nagaya run` left (runtime/jobrecord.py). The record names the
supervisor S by pid *and* start time, and the inode numbers of S's user and pid namespaces; each is
checked on an fd of /proc/PID held open from then on (a pid reused after that check makes every read
through the fd fail), so a recycled pid never leads into anything else. The app (the backend's child that
is not the FUSE server) must be a child of S's backend child. The kernel checks the rest: a user may join only
namespaces whose owner is their own uid, so a record could at worst lead a user into their own container.

Order (what the kernel allows an unprivileged caller): S's user namespace (nagaya's, owned by the user),
the container's pid namespace (owned by it), then the app's own user namespace where the backend made a
nested one (bwrap), its UTS and mount namespaces; then the app's root (fchdir + chroot, like nsenter),
no-new-privs, the app's CPUs, and a fork (a pid namespace takes effect for children only), which
execs the command with the container's environment. Capabilities held in the joined namespace go at
exec, as the command runs as the user's own (non-zero) uid.
"""

from __future__ import annotations

import _signal as signal
import fcntl
import os

from nagaya.errors import Conflict, RuntimeSetupError
from nagaya.runtime import linux

CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
SI_KERNEL = 0x80
NS_GET_USERNS = 0xB701          # ioctl on a namespace fd: its owning user namespace


def setns(fd: int, nstype: int) -> None:
    linux._check(linux._fn("setns")(fd, nstype), "setns")


def _stat_at(dirfd: int) -> list[str]:
    fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        return os.read(fd, 4096).decode().rsplit(")", 1)[1].split()
    finally:
        os.close(fd)


class Target:
    """The open namespace fds of one running container, checked against its record."""

    def __init__(self, rec: dict, what: str) -> None:
        self.fds: list[int] = []
        gone = Conflict(f"{what} has ended: its container is no longer running")
        try:
            sdir = self._open(f"/proc/{int(rec['pid'])}", os.O_RDONLY | os.O_DIRECTORY)
            st = os.fstat(sdir)
            if st.st_uid != os.getuid() or _stat_at(sdir)[19] != str(rec["start"]):
                raise gone
            self.user_s = self._ns(sdir, "user", rec["userns"])
            self.pid_s = self._ns(sdir, "pid_for_children", rec["pidns"])
            if self.user_s < 0 or self.pid_s < 0:
                raise gone
            bpid = int(rec["backend_pid"])
            with open(f"/proc/{bpid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != int(rec["pid"]):
                    raise gone
            from nagaya.runtime.launcher import _first_leaf

            app = _first_leaf(bpid)
            if app is None:
                raise gone
            adir = self._open(f"/proc/{app}", os.O_RDONLY | os.O_DIRECTORY)
            if int(_stat_at(adir)[1]) != bpid:          # the pid we scanned is still that child
                raise gone
            self.user_a = self._open("ns/user", os.O_RDONLY, adir)
            self.mnt_a = self._open("ns/mnt", os.O_RDONLY, adir)
            self.uts_a = self._open("ns/uts", os.O_RDONLY, adir)
            self.root_a = self._open("root", os.O_RDONLY | os.O_DIRECTORY, adir)
            self.cpus = os.sched_getaffinity(app)
            if _stat_at(sdir)[19] != str(rec["start"]):     # S still alive: the fds above are its container's
                raise gone
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError, KeyError, TypeError):
            self.close()
            raise gone from None
        except OSError as e:
            self.close()
            if isinstance(e, PermissionError):
                raise gone from None
            raise RuntimeSetupError(f"cannot reach the container of {what}: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise

    def _open(self, path: str, flags: int, dirfd: int | None = None) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC, dir_fd=dirfd)
        self.fds.append(fd)
        return fd

    def _ns(self, dirfd: int, name: str, ino: object) -> int:
        fd = self._open(f"ns/{name}", os.O_RDONLY, dirfd)
        return fd if os.fstat(fd).st_ino == ino else -1

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def join(self) -> None:
        """Enter (this process: it must be single-threaded). Then fork: the child is in the pid namespace."""
        def ino(fd: int) -> int:
            return os.fstat(fd).st_ino

        own_user = os.stat("/proc/self/ns/user").st_ino
        try:
            step = "user namespace"
            if ino(self.user_s) != own_user:
                setns(self.user_s, CLONE_NEWUSER)
            step = "pid namespace"
            setns(self.pid_s, CLONE_NEWPID)
            step = "uts namespace"
            if ino(self.uts_a) != os.stat("/proc/self/ns/uts").st_ino:
                setns(self.uts_a, CLONE_NEWUTS)
            # bwrap makes its mount namespace in a user namespace of its own and runs the app in a further
            # one below it: the mount namespace is joined from its owner, the app's user namespace last.
            step = "mount namespace"
            owner = fcntl.ioctl(self.mnt_a, NS_GET_USERNS)
            self.fds.append(owner)
            if ino(owner) != ino(self.user_s):
                setns(owner, CLONE_NEWUSER)
            setns(self.mnt_a, CLONE_NEWNS)
            step = "the app's user namespace"
            if ino(self.user_a) != ino(owner):
                setns(self.user_a, CLONE_NEWUSER)
            step = "root"
            os.fchdir(self.root_a)
            os.chroot(".")
        except OSError as e:
            raise RuntimeSetupError(f"cannot enter the job's container ({step}): {e.strerror or e}") from None
        finally:
            self.close()
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)


def run_in(rec: dict, argv: list[str], what: str, stdin_null: bool = False, term: str = "") -> int:
    """Run `argv` in the container of `rec`; returns its exit code as `nagaya run` would (128+N: signal N)."""
    target = Target(rec, what)
    env = {str(k): str(v) for k, v in (rec.get("env") or {}).items()}
    if term:
        env["TERM"] = term
    cwd = str(rec.get("cwd") or "/")
    cpus = target.cpus
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARD, signal.SIGCHLD})
    target.join()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                os.chdir(cwd)
            except OSError:
                os.chdir("/")
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
            if stdin_null:
                fd = os.open("/dev/null", os.O_RDONLY)
                os.dup2(fd, 0)
                os.close(fd)
            for s in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(s, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            try:
                os.execvpe(argv[0], argv, env)
            except FileNotFoundError:
                os.write(2, f"nagaya: {argv[0]}: command not found in the job's container\n".encode())
                os._exit(127)
            except OSError as e:
                os.write(2, f"nagaya: {argv[0]}: {e.strerror}\n".encode())
                os._exit(126)
        finally:
            os._exit(127)
    return _wait(pid)


def _wait(pid: int) -> int:
    waitset = {*FORWARD, signal.SIGCHLD}
    while True:
        info = signal.sigwaitinfo(waitset)
        if info.si_signo == signal.SIGCHLD:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return 125
            if got == pid:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code
            continue
        if info.si_code == SI_KERNEL:
            continue                        # from the terminal: the command, in our process group, has it too
        try:
            os.kill(pid, info.si_signo)
        except ProcessLookupError:
            pass
