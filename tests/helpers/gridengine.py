"""A real Grid Engine (Debian 12's Son of Grid Engine 8.1.9) for tests: the packaged cell `default`
(SGE_ROOT /var/lib/gridengine, berkeleydb spool), qmaster and one execd on this host, started as root without
systemd and stopped by pid. Facts and pitfalls: shared/notes/gridengine.md.

Config is applied with qconf on every start (add, or modify what an earlier run left in the spool): a 1 s
scheduler, accounting flushed every second, a queue `all.q` with the `smp` PE, `notify 5 s`, no load
thresholds (a busy 2-core box would put it in alarm), and a consumable `gpu` backed by fake /dev/nvidiaN nodes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SGE_ROOT = "/var/lib/gridengine"
CELL = "default"
QMASTER_PID = "/var/spool/gridengine/qmaster/qmaster.pid"
EXECD_PIDS = "/var/spool/gridengine/execd/*/execd.pid"

# qconf's EDITOR: applies the sed script in $GE_SED to the object's template, so -a*/-m* need no terminal.
EDITOR = '#!/bin/sh\nexec sed -i -e "$GE_SED" "$1"\n'


def _alive(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here may reap late: notes, pitfall 10)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pid(path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path(path).read_text().split()[0])
    return None


SUBNET = "10.78.0"          # extra exec hosts: the host bridge is .1, host geK is .(10+K) (Slurm's tests use 10.77.0)
BRIDGE = "nygebr0"
HOSTS = Path("/etc/hosts")
MARK = "# nagaya-ge-netns"


class GridEngineCluster:
    """`extra_hosts=N`: N more exec hosts (nyge1..), each an execd in a network and UTS namespace of its own on
    a host bridge, seeing its own /etc/hosts (`ip netns exec`'s /etc/netns/NS/hosts); the host's /etc/hosts
    gets their names (marked lines, removed at stop) so the qmaster can resolve them (notes: multi-host)."""

    def __init__(self, gpus: int = 2, slots: int = 4, extra_hosts: int = 0) -> None:
        self.gpus = gpus
        self.slots = slots
        self.extra = [f"nyge{i}" for i in range(1, extra_hosts + 1)]
        self.made: list[list[str]] = []
        self.host = socket.gethostname()
        self.dir = Path(tempfile.mkdtemp(prefix="nagaya-ge-"))
        self.dir.chmod(0o755)
        self.editor = self.dir / "editor.sh"
        self.editor.write_text(EDITOR)
        self.editor.chmod(0o755)
        self.common = Path(SGE_ROOT) / CELL / "common"

    @property
    def env(self) -> dict[str, str]:
        """What users' nagaya needs: the cell, the fake GPUs and the node's GPU lock directory."""
        return {"SGE_ROOT": SGE_ROOT, "SGE_CELL": CELL, "NAGAYA_GPU_DEV_DIR": str(self.gpu_dev_dir),
                "NAGAYA_SCHED_GPU_LOCK_DIR": str(self.lock_dir)}

    @property
    def gpu_dev_dir(self) -> Path:
        return self.dir / "gpu" / "dev"

    @property
    def lock_dir(self) -> Path:
        return self.dir / "gpu-locks"

    def qconf(self, *args: str, sed: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SGE_ROOT": SGE_ROOT, "SGE_CELL": CELL, "EDITOR": str(self.editor), "GE_SED": sed}
        r = subprocess.run(["/usr/bin/qconf", *args], capture_output=True, text=True, env=env, timeout=30)
        if check and r.returncode != 0:
            raise RuntimeError(f"qconf {' '.join(args)}: {r.stdout.strip()} {r.stderr.strip()}")
        return r

    def _object(self, add: str, mod: str, name: str, sed: str) -> None:
        """Add the object (from its template, edited by `sed`), or modify the one an earlier run left."""
        r = self.qconf(add, *([name] if add != "-ae" else []), sed=sed, check=False)
        if r.returncode != 0 or "already exists" in r.stdout + r.stderr:
            m = self.qconf(mod, name, sed=sed, check=False)
            if m.returncode != 0 and "not been changed" not in m.stdout + m.stderr \
                    and "unchanged" not in m.stdout + m.stderr:
                raise RuntimeError(f"qconf {mod} {name}: {m.stdout.strip()} {m.stderr.strip()}")

    def start(self) -> GridEngineCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> GridEngineCluster:
        self._stop_daemons()                # one cell per host: an earlier run's daemons go first
        # The host name resolves to 127.0.0.1, whose reverse lookup is `localhost` (pitfall 1).
        (self.common / "host_aliases").write_text(f"{self.host} localhost localhost.localdomain\n")
        (self.common / "act_qmaster").write_text(f"{self.host}\n")
        env = {**os.environ, "SGE_ROOT": SGE_ROOT, "SGE_CELL": CELL}
        if self.extra:
            self._make_hosts_net()          # names first: the qmaster caches failed lookups (pitfall 9)
        subprocess.run(["/usr/sbin/sge_qmaster"], env=env, check=True, timeout=30)
        self._until(lambda: self.qconf("-sh", check=False).returncode == 0, 30, "qmaster")
        self._configure()
        self._make_gpus()
        subprocess.run(["/usr/sbin/sge_execd"], env=env, check=True, timeout=30)
        for h in self.extra:
            subprocess.run(["ip", "netns", "exec", f"nagaya-{h}", "unshare", "--uts", "sh", "-c",
                            f"hostname {h} && exec /usr/sbin/sge_execd"], env=env, check=True, timeout=30)
        self._until(self._queue_up, 60, "the execution hosts")
        return self

    def _sh(self, *argv: str, undo: list[str] | None = None) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
        if undo:
            self.made.append(undo)

    def _make_hosts_net(self) -> None:
        self._unmark_hosts()
        self._sh("ip", "link", "add", BRIDGE, "type", "bridge", undo=["ip", "link", "del", BRIDGE])
        self._sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        self._sh("ip", "link", "set", BRIDGE, "up")
        names = [f"{SUBNET}.{10 + i} {h}" for i, h in enumerate(self.extra, 1)]
        for i, h in enumerate(self.extra, 1):
            ns, veth = f"nagaya-{h}", f"nygev{i}"
            self._sh("ip", "netns", "add", ns, undo=["ip", "netns", "del", ns])
            self._sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                     undo=["ip", "link", "del", veth])
            self._sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            self._sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", "eth0")
            self._sh("ip", "-n", ns, "link", "set", "eth0", "up")
            self._sh("ip", "-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(["127.0.0.1 localhost", f"{SUBNET}.1 {self.host}", *names]) + "\n")
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

    def _configure(self) -> None:
        g = self.dir / "global"             # qconf -Mconf takes the object's name from the file's name
        conf = self.qconf("-sconf", "global").stdout.splitlines()
        lines = [x for x in conf if not x.startswith("#")]
        text = "\n".join(lines) + "\n"
        for key, value in (("load_report_time", "00:00:05"), ("max_unheard", "00:01:00"),
                           ("execd_params", "NONE")):
            text = "\n".join(f"{key} {value}" if x.split(" ", 1)[0] == key else x for x in text.splitlines()) + "\n"
        text = text.replace("flush_time=00:00:15", "flush_time=00:00:01")
        g.write_text(text)
        self.qconf("-Mconf", str(g))
        s = self.dir / "sched"
        s.write_text("\n".join(
            {"schedule_interval": "schedule_interval 0:0:1", "flush_submit_sec": "flush_submit_sec 1",
             "flush_finish_sec": "flush_finish_sec 1"}.get(x.split(" ", 1)[0], x)
            for x in self.qconf("-ssconf").stdout.splitlines()) + "\n")
        self.qconf("-Msconf", str(s))
        c = self.qconf("-sc").stdout
        if not any(x.split()[:1] == ["gpu"] for x in c.splitlines()):
            (self.dir / "complex").write_text(c + "gpu gpu INT <= YES YES 0 0\n")
            self.qconf("-Mc", str(self.dir / "complex"))
        self.qconf("-ah", self.host, check=False)
        self.qconf("-as", self.host, check=False)
        self._object("-ae", "-me", self.host,
                     f"s/^hostname.*/hostname {self.host}/;s/^complex_values.*/complex_values gpu={self.gpus}/")
        for h in self.extra:
            self.qconf("-ah", h, check=False)
            self._object("-ae", "-me", h, f"s/^hostname.*/hostname {h}/;s/^complex_values.*/complex_values gpu=0/")
        self._object("-ahgrp", "-mhgrp", "@allhosts", f"s/^hostlist.*/hostlist {' '.join([self.host, *self.extra])}/")
        # control_slaves: qrsh -inherit reaches the job's hosts (a multi-host job's tasks, nagaya job exec);
        # job_is_first_task FALSE: the job script is not one of the tasks.
        pe = "s/^slots.*/slots 999/;s/^control_slaves.*/control_slaves TRUE/;" \
             "s/^job_is_first_task.*/job_is_first_task FALSE/;"
        self._object("-ap", "-mp", "smp", pe + "s/^allocation_rule.*/allocation_rule $pe_slots/")
        self._object("-ap", "-mp", "mpi", pe + "s/^allocation_rule.*/allocation_rule $round_robin/")
        self._object("-aq", "-mq", "all.q",
                     f"s/^hostlist.*/hostlist @allhosts/;s/^pe_list.*/pe_list smp mpi/;s/^slots.*/slots {self.slots}/;"
                     "s/^load_thresholds.*/load_thresholds NONE/;s|^shell .*|shell /bin/bash|;"
                     "s/^shell_start_mode.*/shell_start_mode unix_behavior/;s/^notify.*/notify 00:00:05/")

    def _make_gpus(self) -> None:
        dev = self.gpu_dev_dir
        dev.mkdir(parents=True)
        for i in range(self.gpus):
            os.mknod(dev / f"nvidia{i}", 0o666 | 0o020000, os.makedev(195, i))
        os.mknod(dev / "nvidiactl", 0o666 | 0o020000, os.makedev(195, 255))
        for p in (self.dir / "gpu", dev):
            p.chmod(0o755)
        r = subprocess.run(["nagaya", "job", "prepare-node"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **self.env})
        if r.returncode != 0:
            raise RuntimeError(f"nagaya job prepare-node: {r.stderr}")

    def _queue_up(self) -> bool:
        r = subprocess.run(["/usr/bin/qstat", "-f", "-q", "all.q"], capture_output=True, text=True,
                           env={**os.environ, "SGE_ROOT": SGE_ROOT, "SGE_CELL": CELL})
        rows = [x.split() for x in r.stdout.splitlines() if x.startswith("all.q@")]
        # queuename qtype used/tot load arch [states]: up once it reports a load and has no state flags
        return bool(rows) and all(len(x) == 5 and x[3] != "-NA-" for x in rows)

    @staticmethod
    def _until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Grid Engine: {what} did not come up")
            time.sleep(0.1)

    def _stop_daemons(self) -> None:
        pids = [p for p in [*(_pid(x) for x in glob.glob(EXECD_PIDS)), _pid(QMASTER_PID)] if p]
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20    # a second qmaster beside a stopping one breaks both (pitfall 2)
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        env = {**os.environ, "SGE_ROOT": SGE_ROOT, "SGE_CELL": CELL}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["/usr/bin/qdel", "-f", "-u", "*"], env=env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = subprocess.run(["/usr/bin/qstat", "-u", "*"], env=env, capture_output=True, text=True)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.2)
        if self.extra:      # out of the config, or the next qmaster cannot resolve them (pitfall 9)
            with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
                self.qconf("-mhgrp", "@allhosts", sed=f"s/^hostlist.*/hostlist {self.host}/", check=False)
                for h in self.extra:
                    self.qconf("-de", h, check=False)
                    self.qconf("-dh", h, check=False)
        self._stop_daemons()
        for undo in reversed(self.made):
            subprocess.run(undo, capture_output=True, timeout=30)
        self.made.clear()
        self._unmark_hosts()
        shutil.rmtree(self.dir, ignore_errors=True)
