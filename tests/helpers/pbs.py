"""A real OpenPBS for tests: a single host (pbs_server, pbs_sched, pbs_comm, pbs_mom and PBS's own PostgreSQL
data service) from the /opt/pbs that deploy/openpbs.sh builds, started as root by PBS's SysV script without
systemd, and purged at the end (/var/spool/pbs, /etc/pbs.conf, and /etc/hosts as it was). Facts and pitfalls:
shared/notes/openpbs.md.

Each start is fresh (a half-initialised datastore from a failed start breaks every later one, pitfall 2):
`pbs_postinstall`, PBS_START_MOM=1, a 1-2 s mom poll (SIGKILL after kill_delay waits for it), job history,
a consumable `ngpus` backed by fake /dev/nvidiaN nodes with nagaya's per-device locks, kill_delay, 4 CPUs.

`extra_hosts=N`: N more execution hosts (nypb1..), each a pbs_mom in a network and UTS namespace of its own
(its own host name and address on a host bridge, as tests/helpers/gridengine.py does for Grid Engine), with a
PBS_HOME and a pbs.conf of its own (PBS_SERVER = this host, PBS_START_MOM=1 only) that it alone reads: every
daemon is started with an explicit environment, one after the other, and each node must be `free` before the
next starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PBS_EXEC = "/opt/pbs"
PBS_HOME = "/var/spool/pbs"
CONF = Path("/etc/pbs.conf")
HOSTS = Path("/etc/hosts")
HOSTS_SAVED = Path("/etc/hosts.pre-nagaya-pbs")     # the original, while PBS runs (a crashed run is undone next time)
INIT = f"{PBS_EXEC}/libexec/pbs_init.d"
DAEMONS = ("pbs_server.bin", "pbs_sched", "pbs_comm", "pbs_mom", "pbs_ds_monitor")


def _host_address() -> str | None:
    """This host's first non-loopback IPv4 address (PBS cannot run on loopback only: pitfall 1)."""
    r = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", r.stdout)
    return m.group(1) if m else None


def _resolves_to_loopback(host: str) -> bool:
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return True


def _pbs_pids() -> list[int]:
    """Every PBS daemon and PBS's own postgres (its data directory is under PBS_HOME)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            exe = os.readlink(f"/proc/{d}/exe")
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if exe.startswith(PBS_EXEC + "/") or f"{PBS_HOME}/datastore" in cmd:
                out.append(int(d))
    return out


SUBNET = "10.79.0"      # extra hosts: the bridge is .1, host nypbK .(10+K) (GE's tests use 10.78.0, Slurm's 10.77.0)
BRIDGE = "nypbbr0"
MARK = "# nagaya-pbs-netns"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _daemon_env(**extra: str) -> dict[str, str]:
    """A PBS daemon's whole environment: nothing of the caller's PBS_* (a PBS_CONF_FILE meant for another
    mom would make this one read the wrong pbs.conf), a clean PATH (keeps pyenv's python out)."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TERM", "USER", "LOGNAME")}
    return {**keep, "PATH": CLEAN_PATH, **extra}


class PBSCluster:
    def __init__(self, gpus: int = 2, ncpus: int = 4, kill_delay: int = 5, extra_hosts: int = 0) -> None:
        self.gpus = gpus
        self.ncpus = ncpus
        self.kill_delay = kill_delay
        self.host = socket.gethostname().split(".")[0]
        self.extra = [f"nypb{i}" for i in range(1, extra_hosts + 1)]
        self.made: list[list[str]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="nagaya-pbs-"))
        self.dir.chmod(0o755)
        self.hosts_saved: bytes | None = None

    @staticmethod
    def home_of(h: str) -> Path:
        """An extra host's PBS_HOME (the first host's is PBS_HOME)."""
        return Path(f"{PBS_HOME}-{h}")

    @staticmethod
    def tmp_of(h: str) -> Path:
        """An extra host's $tmpdir: its jobs' $TMPDIR must not be the first host's (one file system here)."""
        return Path(f"/var/tmp/nagaya-pbs-{h}")

    def conf_of(self, h: str) -> Path:
        return self.dir / f"pbs-{h}.conf"

    @property
    def env(self) -> dict[str, str]:
        """What users' nagaya needs: PBS's own binaries, the fake GPUs and the node's GPU lock directory."""
        return {"NAGAYA_SCHED_PBS_BIN": f"{PBS_EXEC}/bin", "NAGAYA_GPU_DEV_DIR": str(self.gpu_dev_dir),
                "NAGAYA_SCHED_GPU_LOCK_DIR": str(self.lock_dir)}

    @property
    def gpu_dev_dir(self) -> Path:
        return self.dir / "gpu" / "dev"

    @property
    def lock_dir(self) -> Path:
        return self.dir / "gpu-locks"

    def cmd(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A PBS command as root (manager), by absolute path: Grid Engine's qsub/qstat/qdel share the names."""
        r = subprocess.run([f"{PBS_EXEC}/bin/{name}", *args], capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)}: {r.stdout.strip()} {r.stderr.strip()}")
        return r

    def qmgr(self, *commands: str) -> None:
        for c in commands:
            self.cmd("qmgr", "-c", c)

    def start(self) -> PBSCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> PBSCluster:
        self._stop_daemons()
        self._purge()
        self._undo_net()
        self._fix_hosts()
        if self.extra:
            self._make_hosts_net()          # names first: the server resolves its nodes when they are created
        env = _daemon_env()
        r = subprocess.run([f"{PBS_EXEC}/libexec/pbs_postinstall", "server", "", PBS_EXEC, PBS_HOME, "postgres"],
                           capture_output=True, text=True, env=env, timeout=120)
        if not CONF.exists():
            raise RuntimeError(f"pbs_postinstall: {r.stdout[-2000:]} {r.stderr[-2000:]}")
        text = re.sub(r"(?m)^PBS_START_MOM=.*$", "PBS_START_MOM=1", CONF.read_text())
        CONF.write_text(text)
        # Without systemd the init script must not think the machine is booting (it would start in the
        # background): not registered with systemd, and no stale boot-check file.
        for p in ("/etc/systemd/system/multi-user.target.wants/pbs.service", "/var/tmp/pbs_boot_check"):
            with contextlib.suppress(OSError):
                os.unlink(p)
        mom = Path(PBS_HOME) / "mom_priv" / "config"
        mom.write_text(f"$clienthost {self.host}\n$min_check_poll 1\n$max_check_poll 2\n")
        for h in self.extra:                # copies of a pristine mom home, made before any mom has run
            self._make_mom_home(h)
        r = subprocess.run([INIT, "start"], capture_output=True, text=True, env=env, timeout=180)
        self._until(lambda: self.cmd("qstat", "-B", check=False).returncode == 0, 60,
                    f"the server ({r.stdout[-1500:]} {r.stderr[-1500:]})")
        self._make_gpus()
        self.qmgr("set server job_history_enable = True",
                  "set server query_other_jobs = False",
                  "create resource ngpus type = long, flag = nh",
                  f"set node {self.host} resources_available.ncpus = {self.ncpus}",
                  f"set node {self.host} resources_available.ngpus = {self.gpus}",
                  f"set queue workq kill_delay = {self.kill_delay}")
        conf = Path(PBS_HOME) / "sched_priv" / "sched_config"
        conf.write_text(re.sub(r'(?m)^resources: "([^"]*)"', r'resources: "\1, ngpus"', conf.read_text()))
        for pid in _pbs_pids():             # the scheduler reads its resources line again on HUP
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/exe").resolve().name == "pbs_sched":
                    os.kill(pid, signal.SIGHUP)
        self._until(lambda: self._node_free(self.host), 60, "the node")
        for h in self.extra:                # one mom at a time, each free before the next starts
            self.qmgr(f"create node {h}", f"set node {h} resources_available.ncpus = {self.ncpus}",
                      f"set node {h} resources_available.ngpus = 0")
            ns = f"nagaya-{h}"
            r = subprocess.run(["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                                f"hostname {h} && exec {PBS_EXEC}/sbin/pbs_mom"],
                               capture_output=True, text=True, env=_daemon_env(PBS_CONF_FILE=str(self.conf_of(h))),
                               timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"pbs_mom on {h}: {r.stdout.strip()} {r.stderr.strip()}")
            self._until(lambda h=h: self._node_free(h), 60, f"the node {h}")
        return self

    def mount_tables(self) -> list[str]:
        """Every host's mount table: this one's, and each extra mom's (`ip netns exec` gives it a mount
        namespace of its own, which its jobs share)."""
        out = ["/proc/self/mounts"]
        for h in self.extra:
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.home_of(h) / "mom_priv" / "mom.lock").read_text().split()[0])
                out.append(f"/proc/{pid}/mounts")
        return out

    def _node_free(self, host: str) -> bool:
        r = self.cmd("pbsnodes", "-F", "json", host, check=False)
        with contextlib.suppress(ValueError, KeyError):
            node = json.loads(r.stdout)["nodes"][host]
            return bool(node.get("state") == "free")
        return False

    def _make_mom_home(self, h: str) -> None:
        """An extra host's PBS_HOME (a copy of the first host's mom parts), its pbs.conf and $tmpdir."""
        home = self.home_of(h)
        home.mkdir(mode=0o755)
        for part in ("aux", "checkpoint", "mom_logs", "mom_priv", "spool", "undelivered", "pbs_environment"):
            src = Path(PBS_HOME) / part
            if src.is_dir():
                shutil.copytree(src, home / part, symlinks=True)
            elif src.exists():
                shutil.copy2(src, home / part)
        (home / "mom_priv" / "config").write_text(
            f"$clienthost {self.host}\n$min_check_poll 1\n$max_check_poll 2\n$tmpdir {self.tmp_of(h)}\n")
        tmp = self.tmp_of(h)
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o1777)
        self.conf_of(h).write_text(f"PBS_EXEC={PBS_EXEC}\nPBS_HOME={home}\nPBS_SERVER={self.host}\n"
                                   "PBS_START_SERVER=0\nPBS_START_SCHED=0\nPBS_START_COMM=0\nPBS_START_MOM=1\n")

    def _sh(self, *argv: str, undo: list[str] | None = None) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
        if undo:
            self.made.append(undo)

    def _make_hosts_net(self) -> None:
        """Each extra host: a network namespace on a host bridge whose /etc/hosts (`ip netns exec`'s
        /etc/netns/NS/hosts) names this host by its real address, routed through the bridge: the moms talk
        through pbs_comm by name and address, so every host must see the same address for a name."""
        addr = socket.gethostbyname(self.host)
        self._sh("ip", "link", "add", BRIDGE, "type", "bridge", undo=["ip", "link", "del", BRIDGE])
        self._sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        self._sh("ip", "link", "set", BRIDGE, "up")
        names = [f"{SUBNET}.{10 + i} {h}" for i, h in enumerate(self.extra, 1)]
        for i, h in enumerate(self.extra, 1):
            ns, veth = f"nagaya-{h}", f"nypbv{i}"
            self._sh("ip", "netns", "add", ns, undo=["ip", "netns", "del", ns])
            self._sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                     undo=["ip", "link", "del", veth])
            self._sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            self._sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", "eth0")
            self._sh("ip", "-n", ns, "link", "set", "eth0", "up")
            self._sh("ip", "-n", ns, "link", "set", "lo", "up")
            self._sh("ip", "-n", ns, "route", "add", "default", "via", f"{SUBNET}.1")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(["127.0.0.1 localhost", f"{addr} {self.host}", *names]) + "\n")
            # No name server there: glibc then asks 127.0.0.1, refused at once, where the host's server would
            # only time out (it cost each mom start 20 s)
            (etc / "resolv.conf").write_text("# nagaya's PBS test host: names come from its hosts file\n")
            self.made.append(["rm", "-rf", str(etc)])
        with open(HOSTS, "r+b") as f:           # in place: /etc/hosts may be a bind mount
            text = f.read().decode()
            f.seek(0)
            f.write((text.rstrip("\n") + "\n" + "".join(f"{x} {MARK}\n" for x in names)).encode())
            f.truncate()

    @staticmethod
    def _unmark_hosts() -> None:
        with contextlib.suppress(OSError), open(HOSTS, "r+b") as f:
            lines = f.read().decode().splitlines(keepends=True)
            kept = [x for x in lines if not x.rstrip().endswith(MARK)]
            if kept != lines:
                f.seek(0)
                f.write("".join(kept).encode())
                f.truncate()

    def _undo_net(self) -> None:
        """What _make_hosts_net made (this run's, or an earlier run's that died before undoing it)."""
        for undo in reversed(self.made):
            subprocess.run(undo, capture_output=True, timeout=30)
        self.made.clear()
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
        for line in r.stdout.splitlines():
            ns = line.split()[0] if line.split() else ""
            if re.fullmatch(r"nagaya-nypb\d+", ns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
                shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, timeout=30)
        self._unmark_hosts()

    def _fix_hosts(self) -> None:
        """Only when the host name resolves to loopback: map it to the host's real address (the original
        bytes are written back by stop(), in place: /etc/hosts may be a bind mount)."""
        if HOSTS_SAVED.exists():           # an earlier run died before restoring it
            self.hosts_saved = HOSTS_SAVED.read_bytes()
            self._restore_hosts()
        if not _resolves_to_loopback(self.host):
            return
        addr = _host_address()
        if addr is None:
            raise RuntimeError("OpenPBS needs a non-loopback IPv4 address for the host name; this host has none")
        self.hosts_saved = HOSTS.read_bytes()
        HOSTS_SAVED.write_bytes(self.hosts_saved)
        lines = []
        for line in self.hosts_saved.decode().splitlines():
            words = line.split("#", 1)[0].split()
            if words and words[0].startswith("127.") and self.host in words[1:]:
                kept = [w for w in words[1:] if w != self.host]
                if not kept:
                    continue
                line = " ".join([words[0], *kept])
            lines.append(line)
        lines.insert(0, f"{addr} {self.host}")
        with open(HOSTS, "r+b") as f:
            f.write(("\n".join(lines) + "\n").encode())
            f.truncate()

    def _restore_hosts(self) -> None:
        if self.hosts_saved is not None:
            with open(HOSTS, "r+b") as f:
                f.write(self.hosts_saved)
                f.truncate()
            self.hosts_saved = None
            HOSTS_SAVED.unlink(missing_ok=True)

    def _make_gpus(self) -> None:
        dev = self.gpu_dev_dir
        dev.mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            os.mknod(dev / f"nvidia{i}", 0o666 | 0o020000, os.makedev(195, i))
        os.mknod(dev / "nvidiactl", 0o666 | 0o020000, os.makedev(195, 255))
        for p in (self.dir / "gpu", dev):
            p.chmod(0o755)
        r = subprocess.run(["nagaya", "job", "prepare-node"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **self.env})
        if r.returncode != 0:
            raise RuntimeError(f"nagaya job prepare-node: {r.stderr}")

    @staticmethod
    def _until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise RuntimeError(f"OpenPBS: {what} did not come up")
            time.sleep(0.2)

    def delete_all_jobs(self) -> None:
        """Every job, purged from history too (a job running at stop would be run again at the next start)."""
        r = self.cmd("qselect", check=False)
        ids = r.stdout.split()
        if ids:
            self.cmd("qdel", "-W", "force", *ids, check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.cmd("qselect", check=False).stdout.split():
            time.sleep(0.2)

    def _stop_daemons(self) -> None:
        if os.path.exists(INIT) and CONF.exists():
            with contextlib.suppress(subprocess.SubprocessError):
                subprocess.run([INIT, "stop"], capture_output=True, timeout=120, env=_daemon_env())
        for pid in _pbs_pids():             # the extra hosts' moms (the init script knows only this host's)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _pbs_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _pbs_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _purge() -> None:
        shutil.rmtree(PBS_HOME, ignore_errors=True)
        for p in Path(PBS_HOME).parent.glob(Path(PBS_HOME).name + "-nypb*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in Path("/var/tmp").glob("nagaya-pbs-nypb*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in (CONF, Path("/etc/init.d/pbs"), Path("/etc/systemd/system/multi-user.target.wants/pbs.service")):
            with contextlib.suppress(OSError):
                p.unlink()

    def stop(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
            if CONF.exists():
                self.delete_all_jobs()
        self._stop_daemons()
        self._purge()
        self._undo_net()
        self._restore_hosts()
        shutil.rmtree(self.dir, ignore_errors=True)
