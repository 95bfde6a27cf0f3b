"""A real OpenPBS for tests: a single host (pbs_server, pbs_sched, pbs_comm, pbs_mom and PBS's own PostgreSQL
data service) from the /opt/pbs that deploy/openpbs.sh builds, started as root by PBS's SysV script without
systemd, and purged at the end (/var/spool/pbs, /etc/pbs.conf, and /etc/hosts as it was). Facts and pitfalls:
shared/notes/openpbs.md.

Each start is fresh (a half-initialised datastore from a failed start breaks every later one, pitfall 2):
`pbs_postinstall`, PBS_START_MOM=1, a 1-2 s mom poll (SIGKILL after kill_delay waits for it), job history,
a consumable `ngpus` backed by fake /dev/nvidiaN nodes with nagaya's per-device locks, kill_delay, 4 CPUs.
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


class PBSCluster:
    def __init__(self, gpus: int = 2, ncpus: int = 4, kill_delay: int = 5) -> None:
        self.gpus = gpus
        self.ncpus = ncpus
        self.kill_delay = kill_delay
        self.host = socket.gethostname().split(".")[0]
        self.dir = Path(tempfile.mkdtemp(prefix="nagaya-pbs-"))
        self.dir.chmod(0o755)
        self.hosts_saved: bytes | None = None

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
        self._fix_hosts()
        env = {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
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
        self._until(self._node_free, 60, "the node")
        return self

    def _node_free(self) -> bool:
        r = self.cmd("pbsnodes", "-F", "json", self.host, check=False)
        with contextlib.suppress(ValueError):
            node = json.loads(r.stdout)["nodes"][self.host]
            return bool(node.get("state") == "free")
        return False

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
                subprocess.run([INIT, "stop"], capture_output=True, timeout=120)
        deadline = time.monotonic() + 20
        while _pbs_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _pbs_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _purge() -> None:
        shutil.rmtree(PBS_HOME, ignore_errors=True)
        for p in (CONF, Path("/etc/init.d/pbs"), Path("/etc/systemd/system/multi-user.target.wants/pbs.service")):
            with contextlib.suppress(OSError):
                p.unlink()

    def stop(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
            if CONF.exists():
                self.delete_all_jobs()
        self._stop_daemons()
        self._purge()
        self._restore_hosts()
        shutil.rmtree(self.dir, ignore_errors=True)
