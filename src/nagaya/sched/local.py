"""The local backend: jobs queue and run on this machine, under a per-user runner (runner.py).

Everything of a user's jobs lives in their state dir (0700, so no other user can read records or logs):
jobs.db (SQLite, WAL: the CLI, the runner and each job's watcher write to it concurrently), logs/ID.out,
scripts/ID.sh, runner.lock (flock held by the one live runner) and runner.pid.
The CLI only writes requests into the database and pokes the runner or a job's watcher with SIGUSR1;
the processes that own a job decide its state, so a runner restart loses nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nagaya.errors import Conflict, NotFound, PermissionDenied, UsageError
from nagaya.sched.models import ACTIVE, JobInfo, JobSpec, iso, parse_after

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL DEFAULT '', user TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
  image TEXT NOT NULL, ref TEXT NOT NULL, digest TEXT NOT NULL,
  command TEXT NOT NULL, run_args TEXT NOT NULL DEFAULT '[]', cwd TEXT NOT NULL, env TEXT NOT NULL,
  ntasks INTEGER NOT NULL DEFAULT 1, cpus INTEGER NOT NULL DEFAULT 1, mem TEXT NOT NULL DEFAULT '',
  gpus TEXT NOT NULL DEFAULT '', time_limit INTEGER NOT NULL DEFAULT 0, partition TEXT NOT NULL DEFAULT '',
  host TEXT NOT NULL DEFAULT '', cpu_list TEXT NOT NULL DEFAULT '',
  submit_time REAL NOT NULL, start_time REAL, end_time REAL, exit_code INTEGER,
  pid INTEGER, pid_start TEXT,
  cancel_requested INTEGER NOT NULL DEFAULT 0, want_suspended INTEGER NOT NULL DEFAULT 0,
  suspended_total REAL NOT NULL DEFAULT 0,
  depends TEXT NOT NULL DEFAULT '',
  array_id INTEGER, array_task INTEGER, array_limit INTEGER NOT NULL DEFAULT 0
);
"""


NEWER_COLUMNS = (("depends", "TEXT NOT NULL DEFAULT ''"), ("array_id", "INTEGER"), ("array_task", "INTEGER"),
                 ("array_limit", "INTEGER NOT NULL DEFAULT 0"), ("interactive", "INTEGER NOT NULL DEFAULT 0"))


def ensure_state_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionDenied(f"{path} belongs to another user")
    if st.st_mode & 0o077:
        path.chmod(0o700)           # records and logs are private to their owner
    for sub in ("logs", "scripts"):
        (path / sub).mkdir(mode=0o700, exist_ok=True)
    return path


def connect(state_dir: Path, readonly: bool = False) -> sqlite3.Connection:
    db = state_dir / "jobs.db"
    if readonly:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None)
    else:
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        have = {c[1] for c in conn.execute("PRAGMA table_info(jobs)")}
        for col, decl in NEWER_COLUMNS:
            if col not in have:
                # A database from before `submit --after/--array`: added once (a racing twin may win).
                with contextlib.suppress(sqlite3.OperationalError):
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")
    conn.row_factory = sqlite3.Row
    return conn


def proc_start(pid: int) -> str | None:
    """The process's start time (jiffies since boot): with the pid it names one process, never a reused pid.
    None for a process that is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def alive(pid: int | None, start: str | None) -> bool:
    return bool(pid) and start is not None and proc_start(pid) == start  # type: ignore[arg-type]


def poke(pid: int | None, start: str | None) -> bool:
    """SIGUSR1 to a runner or watcher of ours, only if the pid still names that very process."""
    if not alive(pid, start):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGUSR1)  # type: ignore[arg-type]
        return True
    return False


def task_id(r: sqlite3.Row) -> str:
    """A job's id as users see it: ID, or ARRAY.TASK for an array task."""
    if "array_task" in r.keys() and r["array_task"] is not None:  # noqa: SIM118 (Row's `in` tests values)
        return f"{r['array_id']}.{r['array_task']}"
    return str(r["id"])


def row_info(r: sqlite3.Row) -> JobInfo:
    # HELD: a user's hold (`nagaya job hold`), or a job still being written at submit: pending either way
    return JobInfo(id=task_id(r), user=r["user"], state=r["state"].replace("HELD", "PENDING"), name=r["name"],
                   image=r["image"],
                   digest=r["digest"], command=json.loads(r["command"]), nodes=r["host"] or "",
                   exit_code=r["exit_code"], submit_time=iso(r["submit_time"]), start_time=iso(r["start_time"]),
                   end_time=iso(r["end_time"]), time_limit=r["time_limit"], cpus=r["cpus"] * r["ntasks"],
                   reason=r["reason"], backend="local")


def is_admin(cfg: Any) -> bool:
    if os.geteuid() == 0:
        return True
    import grp

    me = pwd.getpwuid(os.getuid()).pw_name
    if me in cfg.server.admin_users:
        return True
    groups = {grp.getgrgid(g).gr_name for g in os.getgroups() if _has_gid(g)}
    return bool(groups & set(cfg.server.admin_groups))


def _has_gid(g: int) -> bool:
    import grp

    try:
        grp.getgrgid(g)
    except KeyError:
        return False
    return True


def nagaya_exe(cfg: Any) -> str:
    """The nagaya a job runs: [sched] nagaya, else the one on PATH."""
    import shutil

    return cfg.sched.nagaya or shutil.which("nagaya") or "/usr/local/bin/nagaya"


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class LocalScheduler:
    name = "local"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.dir = cfg.sched_state_dir

    # -- plumbing ----------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        ensure_state_dir(self.dir)
        return connect(self.dir)

    def _row(self, conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        base, _, task = job_id.partition(".")
        if not base.isdigit() or (task and not task.isdigit()):
            raise UsageError(f"invalid job id {job_id!r} (ID, or ID.TASK for an array task)")
        if task:
            r = conn.execute("SELECT * FROM jobs WHERE array_id = ? AND array_task = ?", (int(base), int(task))
                             ).fetchone()
        else:
            r = conn.execute("SELECT * FROM jobs WHERE id = ?", (int(base),)).fetchone()
        if r is None:
            raise NotFound(f"job {job_id} not found")
        return r

    def row_id(self, job_id: str) -> int:
        """The database row (NAGAYA_JOB_ID inside the job) of a job or array task of this user's."""
        with contextlib.closing(self._db()) as conn:
            return int(self._row(conn, job_id)["id"])

    def _tasks(self, conn: sqlite3.Connection, job_id: str) -> list[sqlite3.Row] | None:
        """An array's task rows when `job_id` names a whole array, else None."""
        r = self._row(conn, job_id)
        if "." in job_id or r["array_task"] is None or r["array_id"] != r["id"]:
            return None
        return conn.execute("SELECT * FROM jobs WHERE array_id = ? ORDER BY array_task", (r["id"],)).fetchall()

    def limits(self) -> tuple[int, int]:
        cpus = self.cfg.sched.max_cpus or len(usable_cpus())
        return (self.cfg.sched.max_jobs or len(usable_cpus())), cpus

    def ensure_runner(self) -> None:
        """Start the runner unless one holds the lock; poke it either way (it may be idle-waiting)."""
        lock = self.dir / "runner.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, start = self._runner_pid()
                poke(pid, start)
                return
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        log = os.open(self.dir / "runner.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Its own session: the runner outlives the CLI and is no part of the terminal's job control.
            subprocess.Popen([sys.executable, "-I", "-m", "nagaya.sched.runner"], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True, cwd="/",
                             env={**os.environ, "NAGAYA_SCHED_STATE_DIR": str(self.dir)})
        finally:
            os.close(log)

    def _runner_pid(self) -> tuple[int | None, str | None]:
        try:
            pid, start = (self.dir / "runner.pid").read_text().split()
            return int(pid), start
        except (OSError, ValueError):
            return None, None

    # -- the protocol --------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        if spec.compose:
            raise UsageError("--compose needs a Slurm backend; on this machine run: nagaya compose up -d")
        if spec.nodes > 1:
            raise UsageError("the local backend runs jobs on this one machine: --nodes must be 1")
        _, max_cpus = self.limits()
        need = spec.cpus * spec.ntasks
        if need > max_cpus:
            raise UsageError(f"the job asks for {need} CPUs; the local backend has {max_cpus}")
        if spec.ntasks > 1:
            raise UsageError("the local backend runs one task per job: --ntasks must be 1")
        tasks: list[int | None] = [None]
        limit = 0
        if spec.array:
            m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?(?:%(\d+))?", spec.array.strip())
            if not m or int(m.group(1)) < 1 or int(m.group(2) or m.group(1)) < int(m.group(1)):
                raise UsageError(f"invalid --array {spec.array!r} (e.g. 1-100, 1-100:2 or 1-100%10)")
            tasks = list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1, int(m.group(3) or 1)))
            limit = int(m.group(4) or 0)
        deps = parse_after(spec.after)
        for jid, _kind in deps:
            if "." in jid:
                raise UsageError(f"--after {jid}: the local backend has no array tasks")
            self.status(jid)                # a job of this user's (the database is theirs alone)
        if spec.build:                      # a build job: `nagaya build --recipe` on the host (runner.py)
            spec = JobSpec(**{**spec.to_dict(), "ref": "", "command": ["build", "--recipe", spec.build],
                              "script": "", "gpus": ""})
        run_args: list[str] = []
        if spec.gpus:
            run_args += ["--gpus", ",".join(str(i) for i in range(int(spec.gpus)))
                         if spec.gpus.isdigit() else spec.gpus]
        with contextlib.closing(self._db()) as conn:
            job_id = None
            held = bool(spec.script) or len(tasks) > 1     # PENDING once complete: the runner never sees half
            for t in tasks:
                env = spec.env if t is None else {**spec.env, "NAGAYA_ARRAY_TASK_ID": str(t)}
                cur = conn.execute(
                    "INSERT INTO jobs (name, user, state, image, ref, digest, command, run_args, cwd, env, ntasks,"
                    " cpus, mem, gpus, time_limit, partition, submit_time, depends, array_id, array_task,"
                    " array_limit) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (spec.name, spec.user, "HELD" if held else "PENDING", spec.image, spec.ref, spec.digest,
                     json.dumps(spec.command), json.dumps(run_args), spec.cwd, json.dumps(env), spec.ntasks,
                     spec.cpus, spec.mem, spec.gpus, spec.time_limit, spec.partition, time.time(),
                     json.dumps(deps) if deps else "", job_id, t, limit))
                if job_id is None:
                    job_id = cur.lastrowid
                    assert job_id is not None
                    if t is not None:
                        conn.execute("UPDATE jobs SET array_id = ? WHERE id = ?", (job_id, job_id))
            if spec.script:
                # The script is the job's command inside the container: keep a private copy (the user may
                # edit theirs before the job starts) and bind its directory read-only.
                path = self.dir / "scripts" / f"{job_id}.sh"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
                with os.fdopen(fd, "w") as f:
                    f.write(spec.script)
                cmd = [str(path)] if spec.script.startswith("#!") else ["/bin/sh", str(path)]
                cmd += spec.command             # the script's own arguments
                conn.execute("UPDATE jobs SET command = ?, run_args = ? WHERE id = ? OR array_id = ?",
                             (json.dumps(cmd), json.dumps([*run_args, "--bind", f"{path.parent}:{path.parent}:ro"]),
                              job_id, job_id))
            if held:
                conn.execute("UPDATE jobs SET state = 'PENDING' WHERE (id = ? OR array_id = ?) AND state = 'HELD'",
                             (job_id, job_id))
        self.ensure_runner()
        return str(job_id)

    def status(self, job_id: str) -> JobInfo:
        with contextlib.closing(self._db()) as conn:
            r = self._row(conn, job_id)
            tasks = self._tasks(conn, job_id)
        info = row_info(r)
        info.log = str(self.dir / "logs" / f"{r['id']}.out")
        if tasks:                               # the array as a whole: one state from its tasks'
            states: dict[str, int] = {}
            for t in tasks:
                states[t["state"]] = states.get(t["state"], 0) + 1
            order = ("RUNNING", "SUSPENDED", "PENDING", "HELD", "CANCELLED", "TIMEOUT", "FAILED", "COMPLETED")
            info.id = job_id
            info.state = next(x for x in order if x in states).replace("HELD", "PENDING")
            codes = [t["exit_code"] for t in tasks if t["exit_code"] is not None]
            info.exit_code = max(codes) if codes and info.state not in ACTIVE else None
            info.reason = "tasks: " + ", ".join(f"{n} {st}" for st, n in sorted(states.items()))
            info.end_time = "" if info.state in ACTIVE else iso(max((t["end_time"] or 0) for t in tasks))
            info.nodes = ""
        self._kick(info.state)
        return info

    def list(self, all_users: bool = False) -> list[JobInfo]:
        if all_users and not is_admin(self.cfg):
            raise PermissionDenied("only administrators may list all users' jobs")
        with contextlib.closing(self._db()) as conn:
            jobs = [row_info(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
        if any(j.state == "PENDING" for j in jobs):
            self._kick("PENDING")
        if all_users:
            jobs += self._others()
        return jobs

    def _others(self) -> list[JobInfo]:
        """An administrator's view: every other user's default state dir that exists."""
        out: list[JobInfo] = []
        me = os.getuid()
        for pw in pwd.getpwall():
            if pw.pw_uid == me:
                continue
            d = Path(pw.pw_dir) / ".local" / "share" / "nagaya" / "jobs"
            if not (d / "jobs.db").is_file():
                continue
            try:
                with contextlib.closing(connect(d, readonly=True)) as conn:
                    out += [row_info(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
            except sqlite3.Error:
                continue
        return out

    def _kick(self, state: str) -> None:
        # A runner that was killed leaves pending jobs behind: any command that sees them starts a new one.
        if state == "PENDING":
            self.ensure_runner()

    def cancel(self, job_id: str) -> None:
        with contextlib.closing(self._db()) as conn:
            tasks = self._tasks(conn, job_id)
        if tasks:                               # every task of the array that has not ended
            live = [task_id(t) for t in tasks if t["state"] in (*ACTIVE, "HELD")]
            if not live:
                raise Conflict(f"job {job_id} has already finished")
            for t in live:
                with contextlib.suppress(Conflict):
                    self.cancel(t)
            return
        with contextlib.closing(self._db()) as conn:
            r = self._row(conn, job_id)
            if conn.execute("UPDATE jobs SET state = 'CANCELLED', end_time = ?, reason = 'cancelled before start'"
                            " WHERE id = ? AND state IN ('PENDING', 'HELD')", (time.time(), r["id"])).rowcount:
                return
            if r["state"] not in ACTIVE:
                raise Conflict(f"job {job_id} has already finished ({r['state']})")
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (r["id"],))
            # Read the watcher's pid after the request is written: it reads requests after writing its pid.
            r = self._row(conn, job_id)
        poke(r["pid"], r["pid_start"])

    def _control(self, job_id: str, suspend: bool) -> None:
        with contextlib.closing(self._db()) as conn:
            tasks = self._tasks(conn, job_id)
        if tasks:                               # the array's running tasks
            running = [task_id(t) for t in tasks if t["state"] in ("RUNNING", "SUSPENDED")]
            if not running:
                raise Conflict(f"job {job_id} has no running task")
            for t in running:
                with contextlib.suppress(Conflict):
                    self._control(t, suspend)
            return
        with contextlib.closing(self._db()) as conn:
            r = self._row(conn, job_id)
            if r["state"] not in ("RUNNING", "SUSPENDED"):
                raise Conflict(f"job {job_id} is {r['state']}, not running")
            if r["interactive"]:
                raise Conflict(f"job {job_id} runs on a terminal (run --alloc): stop it there with Ctrl-Z")
            conn.execute("UPDATE jobs SET want_suspended = ? WHERE id = ?", (int(suspend), r["id"]))
            r = self._row(conn, job_id)
        poke(r["pid"], r["pid_start"])

    def suspend(self, job_id: str) -> None:
        self._control(job_id, True)

    def _hold(self, job_id: str, hold: bool) -> None:
        """A user's hold: a queued job (or an array's queued tasks) the runner leaves alone until released."""
        with contextlib.closing(self._db()) as conn:
            r = self._row(conn, job_id)             # the owner check: another user's job is not found
            tasks = self._tasks(conn, job_id)
            ids = [t["id"] for t in tasks] if tasks else [r["id"]]
            done = 0
            for i in ids:
                if hold:
                    done += conn.execute("UPDATE jobs SET state = 'HELD', reason = 'held' WHERE id = ? AND "
                                         "state = 'PENDING'", (i,)).rowcount
                else:
                    done += conn.execute("UPDATE jobs SET state = 'PENDING', reason = '' WHERE id = ? AND "
                                         "state = 'HELD' AND reason = 'held'", (i,)).rowcount
        if not done:
            state = self.status(job_id).state
            raise Conflict(f"job {job_id} is {state}: only a pending job can be held" if hold else
                           f"job {job_id} is not held ({state})")
        if not hold:
            self._kick("PENDING")

    def hold(self, job_id: str) -> None:
        self._hold(job_id, True)

    def release(self, job_id: str) -> None:
        self._hold(job_id, False)

    def resume(self, job_id: str) -> None:
        self._control(job_id, False)

    def usage(self, job_id: str) -> list[dict[str, Any]]:
        """What the job's watcher sampled (sched/usage.py): CPU and memory every few seconds."""
        from nagaya.sched.usage import read

        with contextlib.closing(self._db()) as conn:
            r = self._row(conn, job_id)
        return read(self.dir / "logs" / f"{r['id']}.usage")

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]:
        with contextlib.closing(self._db()) as conn:
            tasks = self._tasks(conn, job_id)
        if tasks:                               # every task's log in turn
            for t in tasks:
                yield from self.logs(task_id(t), follow)
            return
        info = self.status(job_id)
        path = Path(info.log)
        pos = 0
        while True:
            state = self.status(job_id).state if follow else ""
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    while chunk := f.read(65536):
                        pos += len(chunk)
                        yield chunk
            except FileNotFoundError:
                if not follow:
                    return
            if not follow or state not in ACTIVE:
                return
            time.sleep(0.2)


def run_interactive(cfg: Any, spec: JobSpec, run: list[str]) -> int:
    """`nagaya run --alloc` on the local backend: a job in the user's queue like any other (same limits,
    CPUs, records, `nagaya jobs`, `cancel`, the time limit), but this process is its watcher and the
    container runs on this terminal, in its foreground process group (Ctrl-C, Ctrl-Z and `fg` reach it
    as they reach `nagaya run`). The runner only grants it its CPUs: it forks no watcher for it."""
    sched = LocalScheduler(cfg)
    _, max_cpus = sched.limits()
    if spec.cpus > max_cpus:
        raise UsageError(f"--alloc asks for {spec.cpus} CPUs; the local backend has {max_cpus}")
    me = os.getpid()
    with contextlib.closing(sched._db()) as conn:
        job_id = conn.execute(
            "INSERT INTO jobs (name, user, state, image, ref, digest, command, run_args, cwd, env, cpus, mem, gpus,"
            " time_limit, partition, submit_time, pid, pid_start, interactive) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,"
            "?,?,1)",
            (spec.name, spec.user, "PENDING", spec.image, spec.ref, spec.digest, json.dumps(spec.command),
             json.dumps(run[1:]), spec.cwd, "{}", spec.cpus, spec.mem, spec.gpus, spec.time_limit, spec.partition,
             time.time(), me, proc_start(me))).lastrowid
    signal.signal(signal.SIGUSR1, lambda *_: None)      # `cancel` pokes the job's watcher: that is us
    sys.stderr.write(f"nagaya: job {job_id} queued for resources\n")
    sys.stderr.flush()
    sched.ensure_runner()
    try:
        while True:
            with contextlib.closing(sched._db()) as conn:
                r = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if r["state"] != "PENDING":
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        with contextlib.closing(sched._db()) as conn:
            conn.execute("UPDATE jobs SET state = 'CANCELLED', end_time = ?, reason = 'interrupted while pending' "
                         "WHERE id = ? AND state = 'PENDING'", (time.time(), job_id))
        return 130
    if r["state"] != "RUNNING":
        raise Conflict(f"job {job_id} was {r['state']} before it started")
    cpus = [int(c) for c in r["cpu_list"].split(",") if c]
    env = {**os.environ, "NAGAYA_JOB_ID": str(job_id), "NAGAYA_JOB_NAME": spec.name,
           "NAGAYA_JOB_CPUS": str(len(cpus) or spec.cpus)}
    for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID", "SLURM_PROCID"):
        env.pop(k, None)

    def pre() -> None:
        for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(s, signal.SIG_DFL)
        if cpus:
            os.sched_setaffinity(0, cpus)

    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT)}
    try:
        child = subprocess.Popen([nagaya_exe(cfg), *run, spec.ref, *spec.command], env=env, preexec_fn=pre)
    except OSError as e:
        _end(sched, job_id, "FAILED", 127, str(e))
        raise UsageError(f"cannot start the container: {e}") from None
    start = time.monotonic()
    grace = max(0, cfg.sched.kill_grace)
    ending, term_at, killed = "", 0.0, False
    try:
        while True:
            try:
                child.wait(0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if not ending:
                with contextlib.closing(sched._db()) as conn:
                    q = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if q["cancel_requested"]:
                    ending = "CANCELLED"
                elif spec.time_limit and now >= start + spec.time_limit:
                    ending = "TIMEOUT"
                    sys.stderr.write(f"nagaya: job {job_id}: time limit reached\n")
                if ending:
                    term_at = now
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signal.SIGTERM)   # nagaya run passes it to the app
            elif not killed and now >= term_at + grace:
                child.kill()
                killed = True
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    rc = child.returncode
    code = rc if rc >= 0 else 128 - rc
    _end(sched, job_id, ending or ("COMPLETED" if rc == 0 else "FAILED"), code, "")
    return code


def _end(sched: LocalScheduler, job_id: int, state: str, code: int, reason: str) -> None:
    with contextlib.closing(sched._db()) as conn:
        conn.execute("UPDATE jobs SET state = ?, exit_code = ?, end_time = ?, reason = ? WHERE id = ?",
                     (state, code, time.time(), reason, job_id))
    poke(*sched._runner_pid())             # the runner may start what was waiting for these CPUs
