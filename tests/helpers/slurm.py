"""A real Slurm cluster on loopback for tests and benchmarks: munged, slurmctld and three slurmd (n1..n3,
one host, a port each), all under one temp dir, started as root without systemd and stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CONF = """\
ClusterName=nagaya
SlurmctldHost={host}(127.0.0.1)
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
MinJobAge=600
MessageTimeout=10
SlurmdTimeout=60
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
PropagateResourceLimitsExcept=ALL
{nodes}
PartitionName=debug Nodes=n[1-{n}] Default=YES MaxTime=INFINITE State=UP
{extra}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, nodes: int = 3, cpus: int = 2, extra_conf: str = "") -> None:
        self.n = nodes
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

    def start(self) -> SlurmCluster:
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
        nodes = "\n".join(f"NodeName=n{i} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={_free_port()} "
                          f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN" for i in range(1, self.n + 1))
        self.conf.write_text(CONF.format(host=socket.gethostname(), ctld_port=_free_port(), dir=d, nodes=nodes,
                                         n=self.n, extra=self.extra_conf))
        self.conf.chmod(0o644)
        env = {**os.environ, **self.env}
        self._daemon(["slurmctld", "-i"], d / "slurmctld.pid", env)
        for i in range(1, self.n + 1):
            (d / "spool" / f"n{i}").mkdir()
            self._daemon(["slurmd", "-N", f"n{i}"], d / f"slurmd-n{i}.pid", env)
        deadline = time.monotonic() + 30
        while True:
            r = subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=env)
            idle = sum(int(x.split()[1]) for x in r.stdout.splitlines() if x.split()[0] == "idle")
            if idle == self.n:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm did not come up: {r.stdout} {r.stderr}\n{self.logs()}")
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
        shutil.rmtree(self.dir, ignore_errors=True)
