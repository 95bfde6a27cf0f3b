"""Run a compose project: place replicas, launch them with `nagaya run` (local processes or srun steps),
order start-up by depends_on and healthchecks, and tear everything down on a signal, a failure or `down`.

The `up` process is the stack's only supervisor. Every replica and healthcheck is its child, in a session of
its own (a terminal's ^C reaches the supervisor alone, which then stops the stack in order) and with
PR_SET_PDEATHSIG, so even a supervisor killed outright takes its children with it: `nagaya run` then
leaves no process and no mount, and srun ends its step on every node.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nagaya.compose.placement import (
    Replica,
    gpu_pools,
    hosts_file,
    in_slurm_job,
    job_gpus,
    job_nodes,
    node_addrs,
    place,
    service_env,
)
from nagaya.compose.spec import Healthcheck, Project, Service
from nagaya.errors import NagayaError, UsageError

STOP_GRACE = 10.0               # seconds from TERM to KILL when the stack stops
_PR_SET_PDEATHSIG = 1
_JOB_GPU_VARS = ("SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_SOCKET", "SLURM_GPUS_PER_TASK",
                 "SLURM_TRES_PER_TASK")


def _pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def state_dir(compose_file: Path) -> Path:
    """One directory per compose file (and Slurm job): `up`, `ps`, `logs` and `down` meet there."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "nagaya" / "compose"
    key = f"{compose_file.resolve()}\0{os.environ.get('SLURM_JOB_ID', '')}"
    d = base / f"{compose_file.resolve().parent.name or 'root'}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    (d / "logs").mkdir(exist_ok=True, mode=0o700)
    return d


def read_state(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None


def supervisor_alive(st: dict[str, Any] | None) -> bool:
    return bool(st and st.get("pid") and proc_start(int(st["pid"])) == st.get("pid_start"))


@dataclass
class Running:
    replica: Replica
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    state: str = "created"          # created | running | exited
    exit_code: int | None = None
    health: str = ""                # "" (no check) | starting | healthy | unhealthy, as Docker reports it
    fails: int = 0                  # failed checks in a row (Docker's FailingStreak)
    check: subprocess.Popen[bytes] | None = None
    check_started: float = 0.0
    next_check: float = 0.0
    started: float = 0.0
    last_output: str = ""

    @property
    def healthy(self) -> bool:
        return self.health == "healthy"


@dataclass
class Stack:
    project: Project
    compose_file: Path
    cfg: Any
    backend: str = ""               # local | slurm; default: slurm inside a Slurm job
    out: IO[str] = field(default_factory=lambda: sys.stderr)

    def __post_init__(self) -> None:
        if not self.backend:
            self.backend = "slurm" if in_slurm_job() else "local"
        if self.backend == "slurm" and not in_slurm_job():
            raise UsageError("compose on Slurm runs inside a job (salloc, or nagaya submit --compose)")
        self.dir = state_dir(self.compose_file)
        self.base = self.compose_file.resolve().parent
        self.nagaya = self.cfg.sched.nagaya or shutil.which("nagaya") or "nagaya"
        self.stop_signal = 0
        self.failed: tuple[str, int, str] | None = None
        self.status = "starting"
        self.replicas: dict[str, list[Running]] = {}
        # srun reads the job's GPU request from these (sbatch --gpus 6 -> SLURM_GPUS=6) and would ask it of
        # every one-node step besides its own --gres (see _on_node).
        self.step_env = {k: v for k, v in os.environ.items() if k not in _JOB_GPU_VARS}

    # -- planning ---------------------------------------------------------------------------------------------
    def plan(self) -> None:
        self.nodes = job_nodes(self.backend)
        self.gres = job_gpus() if self.backend == "slurm" else {}
        pools = None
        if any(s.x_nagaya.gpus for s in self.project.services.values()):
            pools = gpu_pools(self.backend, self.nodes, self.cfg.gpu.dev_dir.rstrip("/") or "/dev", self.gres)
        placed = place(self.project, self.nodes, pools)
        self.addrs = node_addrs(self.backend, sorted({r.node for r in placed} | set(self.nodes)))
        self.hosts = self.dir / "hosts"
        tmp = self.hosts.with_suffix(".tmp")
        tmp.write_text(hosts_file(self.project, placed, self.addrs))
        tmp.chmod(0o644)
        tmp.replace(self.hosts)
        self.env = service_env(self.project, placed, self.addrs)
        for r in placed:
            self.replicas.setdefault(r.service, []).append(Running(r, log=self.dir / "logs" / f"{r.name}.log"))
        from nagaya.sched import pin_image

        # Every replica on every node runs the same digest, whatever happens to the tag meanwhile.
        self.images = {name: pin_image(self.cfg, svc.image)[0] for name, svc in self.project.services.items()}

    def _path(self, p: str) -> str:
        return str((self.base / os.path.expanduser(p)).resolve())

    def _run_opts(self, name: str, svc: Service, r: Replica) -> list[str]:
        opts = ["--bind", f"{self.hosts}:/etc/hosts:ro"]
        env = {**self.env, "NAGAYA_COMPOSE_PROJECT": self.project.name, "NAGAYA_COMPOSE_SERVICE": name,
               "NAGAYA_COMPOSE_REPLICA": str(r.index)}
        for f in svc.env_file:
            opts += ["--env-file", self._path(f)]
        env.update(svc.environment)
        for k, v in env.items():
            opts += ["--env", f"{k}={v}"]
        for v in svc.volumes:
            opts += ["--bind", f"{self._path(v.source)}:{v.target}" + (":ro" if v.read_only else "")]
        if svc.working_dir:
            opts += ["--pwd", svc.working_dir]
        if r.gpus:
            # This replica's own GPUs (placement never gives one to two replicas). Only their device nodes
            # exist in the container, so CUDA numbers them from 0, as under Slurm's ConstrainDevices.
            # `nagaya run --gpus` counts within the scheduler's allocation when it sees one (the step's
            # SLURM_STEP_GPUS: all of the job's GPUs on the node; locally whatever SLURM_*_GPUS we run in).
            from nagaya.runtime.gpu import allocation

            alloc = sorted(self.gres[r.node]) if self.gres.get(r.node) else \
                None if self.backend == "slurm" else allocation()
            idx = r.gpus if alloc is None else [alloc.index(g) for g in r.gpus]
            opts += ["--gpus", ",".join(map(str, idx)),
                     "--env", "CUDA_VISIBLE_DEVICES=" + ",".join(str(i) for i in range(len(r.gpus)))]
        return opts

    def _on_node(self, node: str, argv: list[str], label: str, gpus: bool = False) -> list[str]:
        if self.backend != "slurm":
            return argv
        srun = [shutil.which("srun") or "srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--overlap",
                "--quiet", f"--job-name={label}", "--cpus-per-task=1", "--mem=0"]
        if self.gres:
            # A step would ask for the job's whole GPU request (e.g. gpu:6 over three nodes) on its one node,
            # which Slurm refuses. A GPU replica's step gets every GPU the job has on its node (overlapping
            # steps share them; placement decides which replica uses which); others none.
            srun.append(f"--gres=gpu:{len(self.gres.get(node, []))}" if gpus and self.gres.get(node) else
                        "--gres=none")
        return [*srun, *argv]

    def replica_argv(self, r: Replica) -> list[str]:
        svc = self.project.services[r.service]
        argv = [self.nagaya, "run", *self._run_opts(r.service, svc, r)]
        if svc.entrypoint is not None:
            argv += ["--entrypoint", "", self.images[r.service], *svc.entrypoint, *(svc.command or [])]
        else:
            argv += [self.images[r.service], *(svc.command or [])]
        return self._on_node(r.node, argv, f"{self.project.name}_{r.name}", bool(r.gpus))

    def check_argv(self, r: Replica, check: list[str]) -> list[str]:
        svc = self.project.services[r.service]
        argv = [self.nagaya, "exec", *self._run_opts(r.service, svc, r), self.images[r.service], *check]
        return self._on_node(r.node, argv, f"{self.project.name}_{r.name}_health", bool(r.gpus))

    # -- state ------------------------------------------------------------------------------------------------
    def save(self) -> None:
        reps = []
        for name in self.project.services:
            for x in self.replicas.get(name, []):
                reps.append({"name": x.replica.name, "service": name, "replica": x.replica.index,
                             "node": x.replica.node, "state": x.state,
                             "health": x.health if x.state == "running" else "",
                             "failing_streak": x.fails, "health_output": x.last_output,
                             "exit_code": x.exit_code, "pid": x.proc.pid if x.proc else None,
                             "ports": x.replica.ports, "gpus": x.replica.gpus,
                             "image": self.images.get(name, ""), "log": str(x.log)})
        doc = {"project": self.project.name, "compose_file": str(self.compose_file.resolve()),
               "backend": self.backend, "job": os.environ.get("SLURM_JOB_ID", ""), "pid": os.getpid(),
               "pid_start": proc_start(os.getpid()), "status": self.status,
               "failed": None if not self.failed else {"service": self.failed[0], "exit_code": self.failed[1],
                                                       "message": self.failed[2]},
               "replicas": reps}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.dir / "state.json")

    def say(self, msg: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.write(f"compose: {msg}\n")
            self.out.flush()

    # -- running ----------------------------------------------------------------------------------------------
    def _spawn(self, argv: list[str], out: IO[bytes] | int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_pdeathsig, cwd=str(self.base), env=self.step_env)

    def _ready(self, name: str) -> bool:
        """May `name` start: every dependency in the state its condition asks for."""
        for dep, cond in self.project.services[name].depends_on.items():
            reps = self.replicas.get(dep, [])
            if cond.condition == "service_started" and any(x.state == "created" for x in reps):
                return False
            if cond.condition == "service_healthy" and not all(x.healthy for x in reps):
                return False
            if cond.condition == "service_completed_successfully" and \
                    not all(x.state == "exited" and x.exit_code == 0 for x in reps):
                return False
        return True

    def _start(self, name: str) -> None:
        hc = self.project.services[name].healthcheck
        for x in self.replicas.get(name, []):
            assert x.log is not None
            with open(x.log, "ab") as log:
                x.proc = self._spawn(self.replica_argv(x.replica), log)
            x.state, x.started = "running", time.monotonic()
            if hc is not None and hc.argv is not None:
                x.health = "starting"
                x.next_check = x.started + min(self._interval(hc, x), 0.5)
            self.say(f"started {x.replica.name} on {x.replica.node}")

    def _fail(self, service: str, code: int, msg: str) -> None:
        if self.failed is None and not self.stop_signal:
            self.failed = (service, code, msg)
            self.say(msg)

    @staticmethod
    def _interval(hc: Healthcheck, x: Running) -> float:
        return hc.start_interval if x.health == "starting" and hc.start_interval is not None else hc.interval

    def _poll_health(self, name: str, x: Running, now: float) -> bool:
        """Run the replica's healthcheck every interval for as long as it runs (Docker's semantics). Returns
        whether its health changed. Unhealthy while the stack is starting fails the stack (the service never
        came up, as `docker compose up --wait` fails); once the stack is up it is reported, not acted upon."""
        hc = self.project.services[name].healthcheck
        if hc is None or hc.argv is None or x.state != "running":
            return False
        if x.check is None:
            if now >= x.next_check:
                x.check = self._spawn(self.check_argv(x.replica, hc.argv), subprocess.PIPE)
                x.check_started = now
            return False
        rc = x.check.poll()
        if rc is None and now - x.check_started < hc.timeout:
            return False
        if rc is None:                  # timed out
            self._kill(x.check)
            rc = -1
        out = x.check.stdout.read().decode(errors="replace").strip() if x.check.stdout else ""
        if x.check.stdout:
            x.check.stdout.close()
        x.check = None
        before, streak = x.health, x.fails
        if rc == 0:
            x.health, x.fails, x.last_output = "healthy", 0, ""
        else:
            x.last_output = out.splitlines()[-1] if out else "timed out" if rc == -1 else f"exit {rc}"
            # Failures within start_period do not count, unless the replica was already healthy once.
            if x.health != "starting" or now - x.started >= hc.start_period:
                x.fails += 1
                if x.fails >= hc.retries:
                    x.health = "unhealthy"
        x.next_check = now + self._interval(hc, x)
        if x.health == before:
            return x.fails != streak    # ps shows the streak
        if x.health == "healthy":
            self.say(f"{x.replica.name} is healthy")
        else:
            msg = f"{x.replica.name} on {x.replica.node} is unhealthy after {x.fails} checks ({x.last_output})"
            if self.status == "starting":
                self._fail(name, 1, f"service {name}: {msg}")
            else:
                self.say(msg)
        return True

    def _kill(self, p: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stop_signal:
            self.stop_signal = signum

    def up(self, ready: Any = None) -> int:
        """Run until every replica has exited, a required one fails, or a signal asks to stop. Returns the
        exit status: 0, the failed replica's code (the message names the service), or 128+signal."""
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        self.plan()
        self.save()
        pending = list(self.project.order())
        announced = False
        try:
            while not self.stop_signal and self.failed is None:
                now = time.monotonic()
                for name in [n for n in pending if self._ready(n)]:
                    pending.remove(name)
                    self._start(name)
                changed = False
                for name, reps in self.replicas.items():
                    for x in reps:
                        if x.state == "running" and x.proc is not None and (rc := x.proc.poll()) is not None:
                            x.state, x.exit_code, changed = "exited", rc if rc >= 0 else 128 - rc, True
                            self.say(f"{x.replica.name} exited with {x.exit_code}")
                            if x.exit_code != 0:
                                self._fail(name, x.exit_code, f"service {name} failed: {x.replica.name} on "
                                                              f"{x.replica.node} exited with {x.exit_code}")
                        changed = self._poll_health(name, x, now) or changed
                blocked = [n for n in pending if self._blocked(n)]
                if blocked:
                    self._fail(blocked[0], 1, f"service {blocked[0]} can never start: a dependency ended "
                                              f"without reaching its condition")
                all_up = not pending and all(x.state != "created" and (x.healthy or x.state == "exited" or
                                             self.project.services[n].healthcheck is None or
                                             self.project.services[n].healthcheck.argv is None)
                                             for n, reps in self.replicas.items() for x in reps)
                if all_up and self.status == "starting" and self.failed is None:
                    self.status, changed = "running", True
                    self.say("all services are up")
                if changed or not announced:
                    self.save()
                    announced = True
                if all_up and ready is not None:
                    ready()
                    ready = None
                if not pending and all(x.state == "exited" for reps in self.replicas.values() for x in reps):
                    break
                time.sleep(0.1)
        finally:
            self.teardown()
        if self.failed:
            self.status = "failed"
            self.save()
            return self.failed[1] if 0 < self.failed[1] < 256 else 1
        self.status = "down"
        self.save()
        return 128 + self.stop_signal if self.stop_signal else 0

    def _blocked(self, name: str) -> bool:
        for dep, cond in self.project.services[name].depends_on.items():
            reps = self.replicas.get(dep, [])
            if cond.condition == "service_completed_successfully":
                if any(x.state == "exited" and x.exit_code != 0 for x in reps):
                    return True
            elif cond.condition == "service_healthy" and any(x.state == "exited" and not x.healthy for x in reps):
                return True
        return False

    def teardown(self) -> None:
        """TERM every replica and check (nagaya run and srun pass it to the app), KILL what outlives the grace."""
        if self.status != "failed":
            self.status = "stopping"
        with contextlib.suppress(OSError):
            self.save()
        procs = [p for reps in self.replicas.values() for x in reps for p in (x.proc, x.check) if p is not None]
        live = [p for p in procs if p.poll() is None]
        if live:
            self.say(f"stopping {len(live)} process(es)")
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(p)
        for reps in self.replicas.values():
            for x in reps:
                if x.proc is not None and x.state == "running":
                    rc = x.proc.returncode
                    x.state, x.exit_code = "exited", rc if rc >= 0 else 128 - rc
                if x.check is not None and x.check.stdout:
                    x.check.stdout.close()


def stop(d: Path, timeout: float = STOP_GRACE + 20) -> bool:
    """`compose down`: ask the supervisor to tear the stack down and wait until it has. False: nothing ran."""
    st = read_state(d)
    if not supervisor_alive(st):
        return False
    assert st is not None
    pid = int(st["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc_start(pid) == st["pid_start"]:
        if time.monotonic() > deadline:
            raise NagayaError(f"the stack's supervisor (pid {pid}) did not stop within {timeout:.0f}s")
        time.sleep(0.1)
    return True
