"""The local backend's per-user runner (`python -m nagaya.sched.runner`) and each job's watcher.

The runner starts pending jobs while the limits allow (concurrent jobs, CPUs: each job gets its own CPUs
by affinity) and exits after `idle_exit` seconds without work. For each job it forks a watcher: the
watcher starts `nagaya run NAME@DIGEST CMD` in a new process group, relays cancel (TERM, KILL after the
grace period), suspend/resume (STOP/CONT to the group) and the time limit, and records the end itself.
Watchers do not depend on the runner: a killed runner leaves running jobs running and their records
complete; its successor finds them by pid (and start time) and starts what is still pending.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nagaya import config
from nagaya.sched.local import alive, connect, ensure_state_dir, nagaya_exe, proc_start, usable_cpus
from nagaya.sched.usage import GpuReader, Sampler, find_smi

PR_SET_PDEATHSIG = 1
ACTIVE_SQL = "state IN ('RUNNING', 'SUSPENDED')"


class Wakeup:
    """Signals become bytes on a pipe, so one select() waits for signals, child exits and timeouts."""

    def __init__(self, *signals: signal.Signals) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        for s in signals:
            signal.signal(s, lambda *_: None)

    def wait(self, timeout: float, *fds: int) -> None:
        with contextlib.suppress(InterruptedError):
            select.select([self.r, *fds], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self.r, 4096):
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self.r)
        os.close(self.w)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# -- the watcher: one per running job, forked from the runner ---------------------------------------------

def _config_of(env: dict[str, str]) -> Any:
    """The configuration the job's own `nagaya run` will see (its environment, not the runner's): where its
    GPUs are and where their locks live."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return config.load()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def watch(cfg: Any, state_dir: Path, job_id: int, cpus: list[int]) -> int:
    os.setsid()                             # independent of the runner: it may die, the job goes on
    wake = Wakeup(signal.SIGUSR1, signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    conn = connect(state_dir)
    me = os.getpid()
    conn.execute("UPDATE jobs SET pid = ?, pid_start = ? WHERE id = ?", (me, proc_start(me), job_id))
    r = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if r["cancel_requested"]:
        conn.execute("UPDATE jobs SET state = 'CANCELLED', end_time = ?, reason = 'cancelled at start' WHERE id = ?",
                     (time.time(), job_id))
        return 0
    env = json.loads(r["env"])
    for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID", "SLURM_PROCID"):
        env.pop(k, None)                    # submitted from within a Slurm job: this job is not part of it
    env.update(NAGAYA_JOB_ID=str(job_id), NAGAYA_JOB_NAME=r["name"], NAGAYA_JOB_CPUS=str(len(cpus) or r["cpus"]))
    cwd = r["cwd"] if os.path.isdir(r["cwd"]) else os.path.expanduser("~")
    run_args = json.loads(r["run_args"])
    log = os.open(state_dir / "logs" / f"{job_id}.out", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    gpu_fds: list[int] = []                 # flocks holding the job's GPUs: released when this watcher ends
    if r["gpus"].isdigit() and int(r["gpus"]) > 0 and "--gpus" in run_args:
        from nagaya.errors import NagayaError
        from nagaya.sched.gpulock import take

        def cancelled() -> bool:
            return bool(conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])

        try:
            got = take(_config_of(env), int(r["gpus"]), cancelled)
        except NagayaError as e:
            os.write(log, f"nagaya: {e.message}\n".encode())
            conn.execute("UPDATE jobs SET state = 'FAILED', end_time = ?, exit_code = 1, reason = ? WHERE id = ?",
                         (time.time(), e.message, job_id))
            return 0
        if got is None:
            conn.execute("UPDATE jobs SET state = 'CANCELLED', end_time = ?, reason = 'cancelled waiting for GPUs' "
                         "WHERE id = ?", (time.time(), job_id))
            return 0
        gpus, gpu_fds = got
        run_args[run_args.index("--gpus") + 1] = ",".join(map(str, gpus))
        env["NAGAYA_JOB_GPUS"] = ",".join(map(str, gpus))
    # A build job (no image: build/remote.py) runs its nagaya command on the host, as the user like any job.
    argv = ([nagaya_exe(cfg), "run", *run_args, r["ref"], *json.loads(r["command"])] if r["ref"]
            else [nagaya_exe(cfg), *json.loads(r["command"])])
    libc = ctypes.CDLL(None, use_errno=True)

    def pre() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)    # a killed watcher takes its job along
        if cpus:
            os.sched_setaffinity(0, cpus)
        signal.set_wakeup_fd(-1)

    try:
        child = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True, preexec_fn=pre)
    except OSError as e:
        os.write(log, f"nagaya: cannot start the job: {e}\n".encode())
        conn.execute("UPDATE jobs SET state = 'FAILED', end_time = ?, exit_code = 127, reason = ? WHERE id = ?",
                     (time.time(), str(e), job_id))
        return 0
    os.close(log)
    pidfd = os.pidfd_open(child.pid)
    pg = child.pid
    start = time.monotonic()
    # `nagaya job usage`: the job's CPU and memory every few seconds, beside its log
    held = [int(g) for g in env.get("NAGAYA_JOB_GPUS", "").split(",") if g.isdigit()]
    sampler = Sampler(child.pid, state_dir / "logs" / f"{job_id}.usage", gpus=len(held),
                      gpu=GpuReader(held, find_smi(cfg.gpu), cfg.gpu.root) if held else None)
    limit = r["time_limit"]
    grace = max(0, cfg.sched.kill_grace)
    ending = ""                             # CANCELLED | TIMEOUT once the job is being ended
    term_at = 0.0
    killed = False
    suspended_at = 0.0
    suspended_total = 0.0
    while child.poll() is None:
        now = time.monotonic()
        timeout = 1.0                       # requests are read from the database at least this often
        if limit and not ending and not suspended_at:
            timeout = min(timeout, start + limit + suspended_total - now)
        if ending and not killed:
            timeout = min(timeout, term_at + grace - now)
        wake.wait(timeout, pidfd)
        if child.poll() is not None:
            break
        now = time.monotonic()
        if not suspended_at:
            sampler.tick(now)
        q = conn.execute("SELECT cancel_requested, want_suspended FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if not ending:
            if q["cancel_requested"]:
                ending = "CANCELLED"
            elif limit and not suspended_at and now >= start + limit + suspended_total:
                ending = "TIMEOUT"
            if ending:                      # TERM first: the app may clean up; KILL after the grace period
                term_at = now
                if suspended_at:
                    _killpg(pg, signal.SIGCONT)
                _killpg(pg, signal.SIGTERM)
                continue
        elif not killed and now >= term_at + grace:
            _killpg(pg, signal.SIGKILL)
            killed = True
        if not ending and bool(q["want_suspended"]) != bool(suspended_at):
            if q["want_suspended"]:
                _killpg(pg, signal.SIGSTOP)
                suspended_at = now
                conn.execute("UPDATE jobs SET state = 'SUSPENDED' WHERE id = ?", (job_id,))
            else:
                _killpg(pg, signal.SIGCONT)
                suspended_total += now - suspended_at
                suspended_at = 0.0
                conn.execute("UPDATE jobs SET state = 'RUNNING', suspended_total = ? WHERE id = ?",
                             (suspended_total, job_id))
    rc = child.returncode
    for fd in gpu_fds:                      # the app is gone: its GPUs are free for the next job
        os.close(fd)
    code = rc if rc >= 0 else 128 - rc
    state = ending or ("COMPLETED" if rc == 0 else "FAILED")
    conn.execute("UPDATE jobs SET state = ?, exit_code = ?, end_time = ? WHERE id = ?",
                 (state, code, time.time(), job_id))
    conn.close()
    _poke_runner(state_dir)
    return 0


def _poke_runner(state_dir: Path) -> None:
    try:
        pid, start = (state_dir / "runner.pid").read_text().split()
    except (OSError, ValueError):
        return
    if alive(int(pid), start):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGUSR1)


# -- the runner ---------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, cfg: Any, state_dir: Path, lock_fd: int, wake: Wakeup) -> None:
        self.cfg = cfg
        self.wake = wake
        self.dir = state_dir
        self.lock_fd = lock_fd
        pool = usable_cpus()
        self.max_cpus = cfg.sched.max_cpus or len(pool)
        self.max_jobs = cfg.sched.max_jobs or len(pool)
        # Pin jobs to CPUs of their own when the limit fits the machine; otherwise only count them.
        self.pool = pool[:self.max_cpus] if self.max_cpus <= len(pool) else []
        self.host = socket.gethostname()
        self.children: set[int] = set()

    def reap(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    self.children.discard(pid)

    def check_lost(self, conn: sqlite3.Connection) -> None:
        """A job whose watcher is gone without recording the end (killed): FAILED, never RUNNING forever."""
        for r in conn.execute(f"SELECT id, pid, pid_start FROM jobs WHERE {ACTIVE_SQL}").fetchall():
            if r["pid"] is None or not alive(r["pid"], r["pid_start"]):
                # Conditional on the pid: a watcher that recorded its end before exiting wins.
                conn.execute(f"UPDATE jobs SET state = 'FAILED', end_time = ?, reason = 'job watcher lost' "
                             f"WHERE id = ? AND {ACTIVE_SQL} AND pid IS ?", (time.time(), r["id"], r["pid"]))

    def schedule(self, conn: sqlite3.Connection) -> list[tuple[int, list[int]]]:
        """Mark the jobs that fit as RUNNING; the caller starts them once the connection is closed."""
        todo: list[tuple[int, list[int]]] = []
        running = conn.execute(f"SELECT ntasks, cpus, cpu_list, array_id FROM jobs WHERE {ACTIVE_SQL}").fetchall()
        per_array: dict[int, int] = {}          # --array ...%N: running tasks of each array
        for x in running:
            if x["array_id"] is not None:
                per_array[x["array_id"]] = per_array.get(x["array_id"], 0) + 1
        nrun = len(running)
        used_n = sum(x["ntasks"] * x["cpus"] for x in running)
        used = {int(c) for x in running for c in x["cpu_list"].split(",") if c}
        for r in conn.execute("SELECT id, ntasks, cpus, depends, array_id, array_limit, interactive FROM jobs "
                              "WHERE state = 'PENDING' ORDER BY id").fetchall():
            if r["array_limit"] and per_array.get(r["array_id"], 0) >= r["array_limit"]:
                continue                        # its array's limit: later jobs may still go
            if r["depends"]:                    # --after: held jobs wait aside, they hold no one up
                verdict = self.dependencies(conn, json.loads(r["depends"]))
                if verdict == "wait":
                    continue
                if verdict == "never":
                    conn.execute("UPDATE jobs SET state = 'CANCELLED', end_time = ?, reason = 'dependency not "
                                 "satisfied' WHERE id = ? AND state = 'PENDING'", (time.time(), r["id"]))
                    continue
            need = r["ntasks"] * r["cpus"]
            if nrun >= self.max_jobs or used_n + need > self.max_cpus:
                break                           # first in, first out: no job jumps the queue
            cpus = [c for c in self.pool if c not in used][:need] if self.pool else []
            # `run --alloc`: its own process (the pid it recorded) is the watcher; it waits for this state.
            if conn.execute("UPDATE jobs SET state = 'RUNNING', start_time = ?, host = ?, cpu_list = ?, "
                            "pid = CASE WHEN interactive = 1 THEN pid ELSE NULL END WHERE id = ? AND state = 'PENDING'",
                            (time.time(), self.host, ",".join(map(str, cpus)), r["id"])).rowcount != 1:
                continue                        # cancelled meanwhile
            if not r["interactive"]:
                todo.append((r["id"], cpus))
            if r["array_id"] is not None:
                per_array[r["array_id"]] = per_array.get(r["array_id"], 0) + 1
            nrun += 1
            used_n += need
            used |= set(cpus)
        return todo

    @staticmethod
    def dependencies(conn: sqlite3.Connection, deps: list[list[str]]) -> str:
        """--after: "wait" while a job it names is active, "never" once an :ok one ended otherwise, else "go"."""
        for jid, kind in deps:
            states = {x["state"] for x in conn.execute("SELECT state FROM jobs WHERE id = ? OR array_id = ?",
                                                          (int(jid), int(jid)))} or {"CANCELLED"}
            if states & {"PENDING", "HELD", "RUNNING", "SUSPENDED"}:
                return "wait"                   # an array: every task
            if kind == "ok" and states != {"COMPLETED"}:
                return "never"
        return "go"

    def start(self, job_id: int, cpus: list[int]) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(self.lock_fd)          # the lock is the runner's alone, never a watcher's
                self.wake.close()
                code = watch(self.cfg, self.dir, job_id, cpus)
            except BaseException:               # a watcher never returns into the runner's loop
                import traceback

                with contextlib.suppress(Exception):
                    os.write(2, f"watcher of job {job_id}: {traceback.format_exc()}\n".encode())
            finally:
                os._exit(code)
        self.children.add(pid)
        with contextlib.closing(connect(self.dir)) as conn:
            conn.execute("UPDATE jobs SET pid = ?, pid_start = ? WHERE id = ? AND pid IS NULL",
                         (pid, proc_start(pid), job_id))

    def active(self, conn: sqlite3.Connection) -> bool:
        return conn.execute("SELECT 1 FROM jobs WHERE state IN ('PENDING', 'RUNNING', 'SUSPENDED') LIMIT 1"
                            ).fetchone() is not None

    def loop(self) -> None:
        idle_since = time.monotonic()
        while True:
            self.reap()
            with contextlib.closing(connect(self.dir)) as conn:
                self.check_lost(conn)
                todo = self.schedule(conn)
                busy = self.active(conn)
            for job_id, cpus in todo:           # SQLite connections must never be open across a fork
                self.start(job_id, cpus)
            now = time.monotonic()
            if busy:
                idle_since = now
            elif now - idle_since >= self.cfg.sched.idle_exit:
                # Release the lock, then look once more: a submit that raced us either sees the lock
                # free (and starts a runner) or was written before this check (and we stay).
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
                with contextlib.closing(connect(self.dir)) as conn:
                    if not self.active(conn):
                        return
                try:
                    fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return                      # a new runner has taken over
                idle_since = now
            self.wake.wait(1.0 if busy else min(1.0, self.cfg.sched.idle_exit))


def main() -> int:
    os.umask(0o077)
    cfg = config.load()
    state_dir = ensure_state_dir(cfg.sched_state_dir)
    lock_fd = os.open(state_dir / "runner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0                                # another runner is alive
    me = os.getpid()
    tmp = state_dir / "runner.pid.tmp"
    tmp.write_text(f"{me} {proc_start(me)}\n")
    tmp.replace(state_dir / "runner.pid")
    wake = Wakeup(signal.SIGUSR1, signal.SIGCHLD)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    Runner(cfg, state_dir, lock_fd, wake).loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
