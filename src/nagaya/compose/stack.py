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
import shlex
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
    batch_job,
    gpu_pools,
    hosts_file,
    in_slurm_job,
    job_gpus,
    job_nodes,
    node_addrs,
    node_info,
    place,
    service_env,
)
from nagaya.compose.spec import Healthcheck, Project, Service, signal_number
from nagaya.errors import NagayaError, UsageError

STOP_GRACE = 10.0               # seconds from TERM to KILL when the stack stops (stop_grace_period's default)
BACKOFF_MAX = 60.0              # the longest wait before a restart
BACKOFF_RESET = 10.0            # `restart:` (no window): a replica that ran this long starts a fresh count
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
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("NAGAYA_BATCH_JOB", "").partition(" ")[2]
    key = f"{compose_file.resolve()}\0{job}"
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
    state: str = "created"          # created | running | restarting | exited
    exit_code: int | None = None
    health: str = ""                # "" (no check) | starting | healthy | unhealthy, as Docker reports it
    fails: int = 0                  # failed checks in a row (Docker's FailingStreak)
    check: subprocess.Popen[bytes] | None = None
    check_started: float = 0.0
    next_check: float = 0.0
    started: float = 0.0
    last_output: str = ""
    restarts: int = 0               # restarts so far (ps shows them)
    attempts: int = 0               # restarts in a row, for back-off and max_attempts
    restart_at: float = 0.0         # state "restarting": when the next start is due
    cpu_set: list[int] = field(default_factory=list)    # local backend: the CPUs it is pinned to

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
        if not self.backend:        # Grid Engine / PBS: inside a job nagaya's wrapper runs ($PE_HOSTFILE...)
            self.backend = "slurm" if in_slurm_job() else batch_job() or "local"
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
    def plan(self, build: bool = False) -> None:
        self.nodes = job_nodes(self.backend)
        self.gres = job_gpus() if self.backend == "slurm" else {}
        pools = None
        if any(s.gpu_request[0] or s.gpu_request[1] for s in self.project.services.values()):
            pools = gpu_pools(self.backend, self.nodes, self.cfg.gpu.dev_dir.rstrip("/") or "/dev", self.gres)
        self.info = node_info(self.backend, self.nodes)
        placed = place(self.project, self.nodes, pools, self.info)
        self.addrs = node_addrs(self.backend, sorted({r.node for r in placed} | set(self.nodes)))
        self.hosts = self.dir / "hosts"
        self._write(self.hosts, hosts_file(self.project, placed, self.addrs))
        self.env = service_env(self.project, placed, self.addrs)
        self.files = self._files()
        self.volumes = self._volumes()
        cursor = 0
        cpus = sorted(os.sched_getaffinity(0)) if self.backend == "local" else []
        for r in placed:
            x = Running(r, log=self.dir / "logs" / f"{r.name}.log")
            if cpus and r.cpus:
                x.cpu_set = sorted({cpus[(cursor + k) % len(cpus)] for k in range(r.cpus)})
                cursor += r.cpus
            self.replicas.setdefault(r.service, []).append(x)
        self.build(force=build)
        from nagaya.image.resolve import pin as pin_image

        # Every replica on every node runs the same digest, whatever happens to the tag meanwhile.
        self.images = {name: pin_image(self.cfg, self.project.image_of(name))[0] for name in self.project.services}

    def _write(self, path: Path, text: str, mode: int = 0o644) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)

    def build(self, force: bool = False) -> None:
        """`build:` services: `nagaya build` their image when it is missing (always with --build or
        pull_policy: build), before anything starts."""
        from nagaya.errors import ImageNotFound
        from nagaya.image.store import open_store

        store = open_store(self.cfg)
        for name, svc in self.project.services.items():
            if svc.build is None:
                continue
            image = self.project.image_of(name)
            if not force and svc.pull_policy != "build":
                try:
                    store.resolve(image)
                    continue
                except (ImageNotFound, UsageError):
                    pass
            b = svc.build
            ctx = Path(self._path(b.context))
            argv = [self.nagaya, "build", "-t", image]
            if b.dockerfile_inline is not None:
                df = self.dir / f"Dockerfile.{name}"
                self._write(df, b.dockerfile_inline, 0o600)
                argv += ["-f", str(df)]
            elif b.dockerfile:
                argv += ["-f", str((ctx / b.dockerfile).resolve())]
            for k, v in b.args.items():
                argv += ["--build-arg", f"{k}={v}"]
            if b.no_cache:
                argv.append("--no-cache")
            self.say(f"building {image} for {name} ({ctx})")
            with open(self.dir / "logs" / f"build-{name}.log", "wb") as log:
                r = subprocess.run([*argv, str(ctx)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=str(self.base))
            if r.returncode != 0:
                tail = (self.dir / "logs" / f"build-{name}.log").read_text(errors="replace").strip().splitlines()
                raise NagayaError(f"services.{name}.build: nagaya build failed: "
                                  f"{tail[-1] if tail else 'exit ' + str(r.returncode)}", r.returncode)

    def _files(self) -> dict[tuple[str, str], str]:
        """Top-level secrets and configs as host files: (kind, key) -> path. `file` is yours, checked readable
        now (it is bound read-only, with your rights); `environment` and `content` are written to the stack's
        own directory, readable by you alone."""
        out: dict[tuple[str, str], str] = {}
        fdir = self.dir / "files"
        for kind, top in (("secrets", self.project.secrets), ("configs", self.project.configs)):
            for key, f in top.items():
                if not any(r.source == key for svc in self.project.services.values()
                           for r in getattr(svc, kind)):
                    continue
                if f.file is not None:
                    p = self._path(f.file)
                    if os.path.exists(p) and not os.path.isfile(p):     # a FIFO would block the open below
                        raise UsageError(f"{self.compose_file}: {kind}.{key}.file: {f.file}: not a regular file")
                    try:
                        with open(p, "rb"):
                            pass
                    except OSError as e:
                        raise UsageError(f"{self.compose_file}: {kind}.{key}.file: {f.file}: {e.strerror}") from None
                    out[(kind, key)] = p
                    continue
                if f.environment is not None:
                    if f.environment not in os.environ:
                        raise UsageError(f"{self.compose_file}: {kind}.{key}.environment: {f.environment} is not set")
                    text = os.environ[f.environment]
                else:
                    text = f.content or ""
                fdir.mkdir(mode=0o700, exist_ok=True)
                p = fdir / f"{kind}-{key}"
                self._write(p, text, 0o600 if kind == "secrets" else 0o644)
                out[(kind, key)] = str(p)
        return out

    def _volumes(self) -> dict[str, str]:
        """Named volumes: directories of yours, kept between runs (and jobs) of this project."""
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "nagaya" / "compose" / \
            "volumes"
        out: dict[str, str] = {}
        for key, v in self.project.volumes.items():
            name = (v.name if v is not None and v.name else f"{self.project.name}_{key}")
            if "/" in name or name in (".", ".."):
                raise UsageError(f"{self.compose_file}: volumes.{key}.name: {name!r} is not a directory name")
            d = base / name
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            out[key] = str(d)
        return out

    def _path(self, p: str) -> str:
        return str((self.base / os.path.expanduser(p)).resolve())

    def _replica_hosts(self, svc: Service, r: Replica) -> Path:
        """The stack's hosts file, plus the replica's own hostname and extra_hosts when it has them."""
        if not svc.hostname and not svc.extra_hosts:
            return self.hosts
        lines = [self.hosts.read_text()]
        if svc.hostname:
            lines.append(f"{self.addrs[r.node]}\t{svc.hostname}\n")
        for host, addr in svc.extra_hosts.items():
            lines.append(f"{self.addrs[r.node] if addr == 'host-gateway' else addr}\t{host}\n")
        p = self.dir / f"hosts-{r.name}"
        self._write(p, "".join(lines))
        return p

    def _scratch(self, r: Replica, n: int) -> str:
        """An empty directory of the replica's own (tmpfs mounts, anonymous volumes), made afresh for each
        start and removed with the stack."""
        d = self.dir / "scratch" / r.name / str(n)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, mode=0o700)
        return str(d)

    def _run_opts(self, name: str, svc: Service, r: Replica, fresh: bool = False) -> list[str]:
        opts = ["--bind", f"{self._replica_hosts(svc, r) if fresh else self._hosts_of(svc, r)}:/etc/hosts:ro"]
        env = {**self.env, "NAGAYA_COMPOSE_PROJECT": self.project.name, "NAGAYA_COMPOSE_SERVICE": name,
               "NAGAYA_COMPOSE_REPLICA": str(r.index)}
        for f in svc.env_file:
            p = self._path(f.path)
            if not f.required and not os.path.exists(p):
                continue
            opts += ["--env-file", p]
        env.update(svc.environment)
        for k, v in env.items():
            opts += ["--env", f"{k}={v}"]
        scratch = 0
        for v in svc.volumes:
            if v.type == "bind":
                assert v.source is not None
                src = self._path(v.source)
                if v.bind.create_host_path and not os.path.exists(src):
                    os.makedirs(src, exist_ok=True)
            elif v.type == "volume" and v.source:
                src = self.volumes[v.source]
                if v.volume.subpath:
                    src = os.path.join(src, v.volume.subpath)
                    os.makedirs(src, exist_ok=True)
            else:               # tmpfs or an anonymous volume
                scratch += 1
                src = self._scratch(r, scratch) if fresh else str(self.dir / "scratch" / r.name / str(scratch))
            opts += ["--bind", f"{src}:{v.target}" + (":ro" if v.read_only else "")]
        for t in svc.tmpfs:
            scratch += 1
            src = self._scratch(r, scratch) if fresh else str(self.dir / "scratch" / r.name / str(scratch))
            opts += ["--bind", f"{src}:{t.split(':')[0]}"]
        for kind, refs in (("secrets", svc.secrets), ("configs", svc.configs)):
            for ref in refs:
                t = ref.target or ref.source
                if not t.startswith("/"):
                    t = f"/run/secrets/{t}" if kind == "secrets" else f"/{t}"
                opts += ["--bind", f"{self.files[(kind, ref.source)]}:{t}:ro"]
        if svc.working_dir:
            opts += ["--pwd", svc.working_dir]
        if svc.hostname:
            opts += ["--hostname", svc.hostname]
        if not svc.read_only:
            opts.append("--writable-tmpfs")
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

    def _hosts_of(self, svc: Service, r: Replica) -> Path:
        return self.dir / f"hosts-{r.name}" if svc.hostname or svc.extra_hosts else self.hosts

    def _on_node(self, node: str, argv: list[str], label: str, gpus: bool = False, r: Replica | None = None) \
            -> list[str]:
        if self.backend in ("gridengine", "pbs"):
            return self._on_host(node, argv, r)
        if self.backend != "slurm":
            return argv
        # deploy.resources: the step's CPUs and memory (placement checked they fit the job on that node).
        cpus = r.cpus if r is not None and r.cpus else 1
        mem = f"{max(1, r.mem >> 20)}M" if r is not None and r.mem else "0"
        srun = [shutil.which("srun") or "srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--overlap",
                "--quiet", f"--job-name={label}", f"--cpus-per-task={cpus}", f"--mem={mem}"]
        if self.gres:
            # A step would ask for the job's whole GPU request (e.g. gpu:6 over three nodes) on its one node,
            # which Slurm refuses. A GPU replica's step gets every GPU the job has on its node (overlapping
            # steps share them; placement decides which replica uses which); others none.
            srun.append(f"--gres=gpu:{len(self.gres.get(node, []))}" if gpus and self.gres.get(node) else
                        "--gres=none")
        return [*srun, *argv]

    def _on_host(self, node: str, argv: list[str], r: Replica | None = None) -> list[str]:
        """Grid Engine / PBS: a replica on another host of the job runs as a task of the job through the
        scheduler's own launcher (qrsh -inherit, with GE's -notify warnings ignored as in the job's wrapper;
        pbs_tmrsh, a replica under PBS's task relay: see _signal); on the job's first host, where this
        supervisor runs, directly."""
        if node == self.nodes[0]:
            return argv
        if self.backend == "pbs":
            tmrsh = os.path.join(self.cfg.sched.pbs_bin, "pbs_tmrsh")
            if r is None:                       # a healthcheck: short, its output is what the client prints
                return [tmrsh, node, *argv]
            from nagaya.sched.pbs import task_argv

            svc = self.project.services[r.service]
            return task_argv(tmrsh, node, f"c-{r.name}", int(svc.stop_grace_period),
                             str(self.dir / "logs" / f"{r.name}.log"), argv)
        inner = ["bash", "-c", 'trap "" USR1 USR2; exec "$@"', "replica", *argv]
        return [os.path.join(self.cfg.sched.gridengine_bin, "qrsh"), "-inherit", "-nostdin", node,
                " ".join(shlex.quote(a) for a in inner)]       # qrsh joins its arguments for a shell

    def replica_argv(self, r: Replica) -> list[str]:
        svc = self.project.services[r.service]
        argv = [self.nagaya, "run", *self._run_opts(r.service, svc, r, fresh=True)]
        if svc.entrypoint is not None:
            argv += ["--entrypoint", "", self.images[r.service], *svc.entrypoint, *(svc.command or [])]
        else:
            argv += [self.images[r.service], *(svc.command or [])]
        return self._on_node(r.node, argv, f"{self.project.name}_{r.name}", bool(r.gpus), r)

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
                             "restarts": x.restarts,
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
    def _spawn(self, argv: list[str], out: IO[bytes] | int, cpus: list[int] | None = None) -> subprocess.Popen[bytes]:
        def pre() -> None:
            _pdeathsig()
            if cpus:            # deploy.resources.limits.cpus on the local backend
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, cpus)

        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=pre, cwd=str(self.base), env=self.step_env)

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
        for x in self.replicas.get(name, []):
            self._start_one(name, x)

    def _start_one(self, name: str, x: Running) -> None:
        hc = self.project.services[name].healthcheck
        assert x.log is not None
        with open(x.log, "ab") as log:
            x.proc = self._spawn(self.replica_argv(x.replica), log, x.cpu_set)
        x.state, x.started, x.exit_code = "running", time.monotonic(), None
        x.health, x.fails = "", 0
        if hc is not None and hc.argv is not None:
            x.health = "starting"
            x.next_check = x.started + min(self._interval(hc, x), 0.5)
        self.say(f"{'restarted' if x.restarts else 'started'} {x.replica.name} on {x.replica.node}"
                 + (f" (restart {x.restarts})" if x.restarts else ""))

    def _exited(self, name: str, x: Running, rc: int, now: float) -> None:
        """A replica ended: restart it as its policy says (with back-off), else record it; a failure that
        will not be restarted fails the stack."""
        x.exit_code = rc if rc >= 0 else 128 - rc
        if x.check is not None:
            self._kill(x.check)
            if x.check.stdout:
                x.check.stdout.close()
            x.check = None
        rule = self.project.services[name].restart_rule
        ran = now - x.started
        if rule is not None and not self.stop_signal and (rule.condition == "any" or x.exit_code != 0):
            window = rule.window
            if window is None and self.project.services[name].deploy.restart_policy is None:
                window = BACKOFF_RESET          # `restart:`, as Docker resets its back-off
            if window is not None and ran >= window:
                x.attempts = 0
            if rule.max_attempts is None or x.attempts < rule.max_attempts:
                delay = min(max(BACKOFF_MAX, rule.delay), rule.delay * 2 ** x.attempts)
                x.attempts += 1
                x.restarts += 1
                x.state, x.restart_at, x.health = "restarting", now + delay, ""
                self.say(f"{x.replica.name} exited with {x.exit_code}; restarting in {delay:g}s "
                         f"(attempt {x.attempts}" + (f" of {rule.max_attempts})" if rule.max_attempts else ")"))
                return
            self.say(f"{x.replica.name} exited with {x.exit_code}; giving up after {x.attempts} restart(s)")
        x.state = "exited"
        self.say(f"{x.replica.name} exited with {x.exit_code}")
        if x.exit_code != 0:
            self._fail(name, x.exit_code, f"service {name} failed: {x.replica.name} on {x.replica.node} exited "
                                          f"with {x.exit_code}" + (f" after {x.restarts} restart(s)"
                                                                   if x.restarts else ""))

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

    def up(self, ready: Any = None, build: bool = False) -> int:
        """Run until every replica has exited, a required one fails, or a signal asks to stop. Returns the
        exit status: 0, the failed replica's code (the message names the service), or 128+signal."""
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        self.plan(build)
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
                            self._exited(name, x, rc, now)
                            changed = True
                        elif x.state == "restarting" and now >= x.restart_at and self.failed is None:
                            self._start_one(name, x)
                            changed = True
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
        """Each replica gets its stop_signal (default TERM; nagaya run and srun pass it to the app) and is
        KILLed once its stop_grace_period is over; healthchecks are TERMed with the default grace."""
        if self.status != "failed":
            self.status = "stopping"
        with contextlib.suppress(OSError):
            self.save()
        now = time.monotonic()
        live: list[tuple[subprocess.Popen[bytes], int, float]] = []
        for name, reps in self.replicas.items():
            svc = self.project.services[name]
            sig = signal_number(svc.stop_signal) if svc.stop_signal else signal.SIGTERM
            for x in reps:
                if x.state == "restarting":
                    x.state = "exited"
                for p, s_, grace in ((x.proc, sig, svc.stop_grace_period), (x.check, signal.SIGTERM, STOP_GRACE)):
                    if p is not None and p.poll() is None:
                        live.append((p, s_, now + grace))
        if live:
            self.say(f"stopping {len(live)} process(es)")
        for p, sig, _ in live:
            self._signal(p, sig)
        for p, _, deadline in sorted(live, key=lambda t: t[2]):
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
        shutil.rmtree(self.dir / "scratch", ignore_errors=True)

    def _signal(self, p: subprocess.Popen[bytes], sig: int) -> None:
        """Send the stop signal. srun forwards signals to its step's task (nagaya run, which passes them to
        the app), except SIGINT, which it answers with a status report: that one goes through scancel."""
        if self.backend == "slurm" and sig == signal.SIGINT and isinstance(p.args, list):
            label = next((a.split("=", 1)[1] for a in p.args if str(a).startswith("--job-name=")), "")
            step = self._step_of(label)
            if step:
                r = subprocess.run([shutil.which("scancel") or "scancel", "--signal=INT", step],
                                   capture_output=True, timeout=30, env=self.step_env)
                if r.returncode == 0:
                    return
            sig = signal.SIGTERM
        if self.backend == "pbs" and isinstance(p.args, list):
            from nagaya.sched.pbs import relayed, signal_argv

            if (task := relayed(p.args)) is not None:
                # A replica on another host: PBS's pbs_tmrsh client passes no signal on (it would only die, and
                # its task live on until the job's end), so a second task there tells the replica's relay.
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(signal_argv(*task, signal.Signals(sig).name.removeprefix("SIG")),
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30, env=self.step_env)
                return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)

    def _step_of(self, label: str) -> str:
        job = os.environ.get("SLURM_JOB_ID", "")
        try:
            r = subprocess.run([shutil.which("squeue") or "squeue", "--steps", "--noheader", "--jobs", job,
                                "--format=%i %j"], capture_output=True, text=True, timeout=30, env=self.step_env)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        for line in r.stdout.splitlines():
            step, _, name = line.strip().partition(" ")
            if name.strip() == label:
                return step
        return ""


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
