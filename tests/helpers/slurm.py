"""A real Slurm cluster for tests and benchmarks: munged, slurmctld and three slurmd (n1..n3), all under one
temp dir, started as root without systemd and stopped by pid.

Default: every slurmd on this host and 127.0.0.1 (a port each). `SlurmCluster(netns=True)`: each slurmd in a
network and UTS namespace of its own (hostname n1.., address 10.77.0.11..) joined to a host bridge
(10.77.0.1, where slurmctld listens), so jobs see distinct hostnames and IPs as on real nodes. The mount
namespace stays shared (one munge socket, one home). slurmd is started with `nsenter --net --uts`, not
`ip netns exec`, which would also remount /sys."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.ports import free_port

CONF = """\
ClusterName=nagaya
SlurmctldHost={host}({ctld_addr})
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
SlurmdDebug=info
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=2
OverTimeLimit=0
InactiveLimit=0
MinJobAge={min_job_age}
MessageTimeout=10
SlurmdTimeout=60
JobAcctGatherType=jobacct_gather/none
{accounting}
JobCompType=jobcomp/none
PropagateResourceLimitsExcept=ALL
{nodes}
PartitionName=debug Nodes=n[1-{n}] Default=YES MaxTime=INFINITE State=UP
{extra}"""


SUBNET = "10.77.0"          # netns mode: the host bridge is .1, node nK is .(10+K)


class SlurmCluster:
    def __init__(self, nodes: int = 3, cpus: int = 2, extra_conf: str = "", netns: bool = False,
                 gpus: int = 0, accounting: bool = False, min_job_age: int = 600) -> None:
        self.accounting = accounting        # slurmdbd on a private MariaDB: sacct works, as on real clusters
        self.min_job_age = min_job_age      # seconds slurmctld remembers a finished job (then: sacct only)
        self.gpus = gpus                    # per node: GRES gpu backed by fake /dev/nvidiaN nodes (gpu_dev_dir)
        self.n = nodes
        self.netns = netns
        # Interface and namespace names are global: this cluster's own, short enough for IFNAMSIZ (15).
        self.tag = os.urandom(2).hex()
        self.bridge = f"nyb{self.tag}"
        self.made: list[list[str]] = []     # undo commands for what start() set up, run in reverse by stop()
        self.extra_conf = extra_conf      # more slurm.conf lines (e.g. AuthAltTypes for slurmrestd)
        self.cpus = cpus
        self.dir = Path(tempfile.mkdtemp(prefix="nagaya-slurm-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.pids: list[int] = []
        self.stepds_before: set[int] = set()

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    @property
    def nodes(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.n + 1)]

    def addr(self, node: str) -> str:
        return f"{SUBNET}.{10 + int(node[1:])}" if self.netns else "127.0.0.1"

    def _ns_name(self, node: str) -> str:
        return f"nagaya-{self.tag}-{node}"

    def nsenter(self, node: str) -> list[str]:
        """The prefix that runs a command on `node` (its network and UTS namespaces); empty without netns."""
        if not self.netns:
            return []
        return ["nsenter", f"--net=/run/netns/{self._ns_name(node)}", f"--uts={self.dir}/ns/{node}.uts"]

    def node_of(self, pid: int | str) -> str | None:
        """Which node's network namespace a process lives in (None: the host's, or it is gone)."""
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        for n in self.nodes:
            with contextlib.suppress(OSError):
                if os.stat(f"/run/netns/{self._ns_name(n)}").st_ino == ino:
                    return n
        return None

    def _sh(self, *argv: str, undo: list[str] | None = None) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
        if undo:
            self.made.append(undo)

    def _make_nodes_net(self) -> None:
        """A bridge with the host at .1, and per node a network namespace (veth eth0 at .1N) and a UTS
        namespace whose hostname is the node's name. Namespaces persist as bind mounts until stop()."""
        held = subprocess.run(["ip", "-4", "-o", "addr", "show", "to", f"{SUBNET}.1"], capture_output=True,
                              text=True).stdout.split()
        if held:
            raise RuntimeError(f"{SUBNET}.1 is already on {held[1]} (a cluster that was not stopped? "
                               f"ip link del {held[1]}; ip netns del each nagaya-* namespace)")
        self._sh("ip", "link", "add", self.bridge, "type", "bridge", undo=["ip", "link", "del", self.bridge])
        self._sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", self.bridge)
        self._sh("ip", "link", "set", self.bridge, "up")
        (self.dir / "ns").mkdir()
        for n in self.nodes:
            ns, veth = self._ns_name(n), f"nyv{self.tag}{n}"
            self._sh("ip", "netns", "add", ns, undo=["ip", "netns", "del", ns])
            self._sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                     undo=["ip", "link", "del", veth])
            self._sh("ip", "link", "set", veth, "master", self.bridge, "up")
            self._sh("ip", "-n", ns, "addr", "add", f"{self.addr(n)}/24", "dev", "eth0")
            self._sh("ip", "-n", ns, "link", "set", "eth0", "up")
            self._sh("ip", "-n", ns, "link", "set", "lo", "up")
            uts = self.dir / "ns" / f"{n}.uts"
            uts.touch()
            self._sh("unshare", f"--uts={uts}", "hostname", n, undo=["umount", "-l", str(uts)])

    @property
    def gpu_dev_dir(self) -> Path:
        return self.dir / "gpu" / "dev"

    def _make_gpus(self) -> str:
        """Fake GPUs: character devices with the NVIDIA driver's major (195) that nothing can open, listed
        in gres.conf as real ones would be; returns the slurm.conf lines. Every node shares them (one host)."""
        dev = self.gpu_dev_dir
        dev.mkdir(parents=True)
        for i in range(self.gpus):
            os.mknod(dev / f"nvidia{i}", 0o666 | 0o020000, os.makedev(195, i))
        os.mknod(dev / "nvidiactl", 0o666 | 0o020000, os.makedev(195, 255))
        for p in (self.dir / "gpu", dev):
            p.chmod(0o755)
        (self.dir / "gres.conf").write_text(f"NodeName=n[1-{self.n}] Name=gpu File={dev}/nvidia[0-{self.gpus - 1}]\n")
        return "GresTypes=gpu\n"

    def start(self) -> SlurmCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()                     # no daemon, namespace or bridge outlives a failed start
            raise

    def _start(self) -> SlurmCluster:
        d = self.dir
        self.stepds_before = self._stepds()
        for sub in ("munge", "state", "spool"):
            (d / sub).mkdir()
        (d / "munge").chmod(0o755)           # users reach the socket; the key stays 0400
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon(["munged", "--force", f"--socket={d}/munge/munge.socket", f"--key-file={key}",
                      f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed"],
                     d / "munged.pid")
        if self.netns:
            self._make_nodes_net()
        gres = self._make_gpus() if self.gpus else ""
        gres_attr = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        nodes = "\n".join(f"NodeName={n} NodeHostname={n if self.netns else socket.gethostname()} "
                          f"NodeAddr={self.addr(n)} Port={free_port()} CPUs={self.cpus} RealMemory=1000 "
                          f"State=UNKNOWN{gres_attr}" for n in self.nodes)
        acct = "AccountingStorageType=accounting_storage/none"
        if self.accounting:
            dbd_port = free_port()
            acct = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                    f"AccountingStoragePort={dbd_port}\nAccountingStoreFlags=job_comment\n"
                    f"AccountingStoragePass={d}/munge/munge.socket")     # slurmdbd's munge: ours, not the default
        self.conf.write_text(CONF.format(host=socket.gethostname(), ctld_addr=f"{SUBNET}.1" if self.netns else
                                         "127.0.0.1", ctld_port=free_port(), dir=d, nodes=nodes, n=self.n,
                                         extra=gres + self.extra_conf, accounting=acct,
                                         min_job_age=self.min_job_age))
        self.conf.chmod(0o644)
        env = {**os.environ, **self.env}
        if self.accounting:
            self._start_accounting(dbd_port, env)
        self._daemon(["slurmctld", "-i"], d / "slurmctld.pid", env)
        for n in self.nodes:
            (d / "spool" / n).mkdir()
            self._daemon([*self.nsenter(n), "slurmd", "-N", n], d / f"slurmd-{n}.pid", env)
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=env)
            idle = sum(int(x.split()[1]) for x in r.stdout.splitlines() if x.split()[0] == "idle")
            if idle == self.n:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm did not come up: {r.stdout} {r.stderr}\n{self.logs()}")
            time.sleep(0.2)

    def _start_accounting(self, dbd_port: int, env: dict[str, str]) -> None:
        """A private MariaDB (as the mysql user, loopback and a socket in our dir), then slurmdbd on it, and the
        cluster registered, before slurmctld starts."""
        d = self.dir
        db, run = d / "mysql" / "data", d / "mysql" / "run"
        run.mkdir(parents=True)
        db.mkdir()
        for p in (d / "mysql", db, run):
            shutil.chown(p, "mysql", "mysql")
        as_mysql = ["setpriv", "--reuid=mysql", "--regid=mysql", "--init-groups"]
        r = subprocess.run([*as_mysql, "mariadb-install-db", "--no-defaults", f"--datadir={db}", "--skip-test-db",
                            "--auth-root-authentication-method=socket"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"mariadb-install-db: {r.stderr}")
        my_port, sock = free_port(), run / "sock"
        p = subprocess.Popen([*as_mysql, "mariadbd", "--no-defaults", f"--datadir={db}", f"--socket={sock}",
                              f"--port={my_port}", "--bind-address=127.0.0.1", f"--pid-file={run}/mariadbd.pid",
                              f"--log-error={run}/mariadbd.log", "--skip-name-resolve", "--skip-log-bin",
                              "--innodb-buffer-pool-size=16M"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.pids.append(p.pid)             # setpriv execs: this is mariadbd itself
        password = os.urandom(12).hex()
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(["mariadb", f"--socket={sock}", "-u", "root", "-e",
                                f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
                                "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError(f"MariaDB did not come up: {r.stderr}")
            time.sleep(0.1)
        conf = d / "slurmdbd.conf"         # next to slurm.conf: slurmdbd finds it through SLURM_CONF
        conf.write_text(f"AuthType=auth/munge\nAuthInfo=socket={d}/munge/munge.socket\nDbdHost=localhost\n"
                        f"DbdAddr=127.0.0.1\nDbdPort={dbd_port}\nSlurmUser=root\n"
                        f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={my_port}\n"
                        f"StorageUser=slurm\nStoragePass={password}\nStorageLoc=slurm_acct_db\n"
                        f"PidFile={d}/slurmdbd.pid\nLogFile={d}/slurmdbd.log\nDebugLevel=info\n")
        conf.chmod(0o600)
        self._daemon(["slurmdbd"], d / "slurmdbd.pid", env)
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(["sacctmgr", "-i", "add", "cluster", "nagaya"], env=env, capture_output=True,
                               text=True, timeout=30)
            if r.returncode == 0 or "already exists" in r.stdout + r.stderr:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sacctmgr add cluster: {r.stdout} {r.stderr}\n{self.logs()}")
            time.sleep(0.2)

    def _daemon(self, argv: list[str], pidfile: Path, env: dict[str, str] | None = None) -> None:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {r.stderr}\n{self.logs()}")
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} wrote no pid file\n{self.logs()}")
            time.sleep(0.05)
        self.pids.append(int(pidfile.read_text().split()[0]))

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log")))

    def _stepds(self) -> set[int]:
        r = subprocess.run(["pgrep", "-x", "slurmstepd"], capture_output=True, text=True)
        return {int(x) for x in r.stdout.split()}

    def stop(self) -> None:
        env = {**os.environ, **self.env}
        # Jobs first, while slurmd can still end their steps; a slurmstepd cut off from its slurmd lingers.
        subprocess.run(["scancel", "--partition=debug"], env=env, capture_output=True, check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = subprocess.run(["squeue", "-h", "-t", "PD,R,S,CG,CF"], env=env, capture_output=True, text=True)
            if r.returncode != 0 or not r.stdout.strip():
                break
            time.sleep(0.2)
        for pid in reversed(self.pids):     # slurmds, slurmctld, then munged
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 15
        for pid in self.pids:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in self._stepds() - self.stepds_before:     # ours: started while this cluster ran
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for undo in reversed(self.made):    # namespaces (their veth ends go with them), veths, bridge
            subprocess.run(undo, capture_output=True, check=False)
        self.made.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
