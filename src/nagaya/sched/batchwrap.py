"""What nagaya's Grid Engine and PBS backends share: the job's bash wrapper (a log and a record of how the job
ended in the submitter's state directory, the time limit, the GPU locks, `--after JOB:ok` checked by asking
nagaya, the app started with `nagaya run NAME@DIGEST`, one per host of a multi-host job) and the Python side
that reads it back (records, logs, arrays, usage). Each backend (gridengine.py, pbs.py) adds only its
scheduler's own terms: how signals arrive, how tasks are named, how other hosts of the job are reached.

The wrapper never goes around the scheduler: a multi-host job's other hosts are reached by the scheduler's
own task launcher (Grid Engine `qrsh -inherit`, PBS `pbs_tmrsh`, both inside the job's allocation and
accounting), as Slurm's backend uses srun.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nagaya.errors import Conflict, UsageError
from nagaya.sched.gpulock import GPU_TAKE
from nagaya.sched.models import ACTIVE, JobInfo, JobSpec, iso

# -- small shared parsers ----------------------------------------------------------------------------------------


def count_gpus(text: str) -> int:
    """--gpus N (Slurm's TYPE:N form too)."""
    try:
        return max(0, int(text.rsplit(":", 1)[-1]))
    except ValueError:
        raise UsageError(f"invalid GPU count {text!r}") from None


def job_name(text: str) -> str:
    """A name both schedulers take: no '/', ':', '@', '\\', '*', '?', space, and not starting with a digit."""
    s = re.sub(r"[/:@\\*?\s]", "_", text) or "job"
    return s if not s[0].isdigit() else "j" + s


def task_range(text: str) -> tuple[int, int, int]:
    """`1-100:2%10` as (first, last, step); a bad text as an empty range."""
    m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", text.split("%")[0])
    if not m:
        return 1, 0, 1
    first = int(m.group(1))
    return first, int(m.group(2) or first), int(m.group(3) or 1)


def task_ids(array: str) -> list[int]:
    first, last, step = task_range(array)
    return list(range(first, last + 1, step))


def job_order(info: JobInfo) -> tuple[int, int]:
    """Jobs by id, array tasks (ID.T, or ID.T-U:S for the pending rest) by task."""
    base, _, task = info.id.partition(".")
    m = re.match(r"\d*", task)
    return int(base), int(m.group() or 0) if m else 0


def directive(script: str, prefix: str, opt: str) -> str | None:
    """The value the script's `#$`/`#PBS` lines give this qsub option (the last one wins, as in qsub), or None."""
    value = None
    for line in script.splitlines():
        if line.strip().startswith(prefix):
            with contextlib.suppress(ValueError):
                words = shlex.split(line.strip()[len(prefix):], comments=True)
                for i, w in enumerate(words):
                    if w == opt:
                        value = words[i + 1] if i + 1 < len(words) else ""
    return value


def array_state(states: dict[str, int], default: str = "PENDING") -> str:
    """One state for an array from its tasks' states (counted)."""
    order = ("RUNNING", "SUSPENDED", "PENDING", "CANCELLED", "TIMEOUT", "FAILED", "COMPLETED")
    state = next((x for x in order if x in states), default)
    return "RUNNING" if state == "SUSPENDED" and "PENDING" in states else state


def tasks_reason(states: dict[str, int]) -> str:
    return "tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))


def hosts_of_file(text: str) -> list[str]:
    """The job's hosts, in order, once each, from Grid Engine's $PE_HOSTFILE (`host slots queue range` lines)
    or PBS's $PBS_NODEFILE (one line per slot or MPI process): the first word of each line."""
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] not in out:
            out.append(words[0])
    return out


# -- the job's wrapper ---------------------------------------------------------------------------------------------


class Terms:
    """A scheduler's own terms, as the wrapper needs them (bash fragments). A plain class: `dataclasses` costs
    `nagaya submit` milliseconds of imports (bench/submit-*)."""

    def __init__(self, backend: str, setup: str, traps: str, group: bool, relay_cancel: bool, quiet: str = "",
                 host: str = "$HOSTNAME", slots: str = "1", hostfile: str = "", own_tasks: bool = False,
                 remote: str = "", end_remote: str = "") -> None:
        self.backend = backend              # nagaya's name for it (`job show --backend`)
        self.setup = setup                  # sets $task, $endf, $gpuf, $log (and what the scheduler needs first)
        self.traps = traps                  # the scheduler's own signals (TERM and ALRM are the wrapper's)
        self.group = group                  # the app runs in a process group of its own, signalled as a group
        self.relay_cancel = relay_cancel    # a cancel reaches the app only through the wrapper
        self.quiet = quiet                  # prefixed to helper subshells and the app (signals they must ignore)
        self.host, self.slots = host, slots
        self.hostfile = hostfile            # the variable naming the job's host list (multi-host jobs)
        self.own_tasks = own_tasks          # a cancel reaches every host's task from the scheduler itself
        self.remote = remote                # bash: a function `remote HOST ARGV...` running ARGV there as a task
        #                                     (in multi-host jobs only: one host's wrapper has less to read)
        self.end_remote = end_remote        # bash, in end(): pass the ending on to the other hosts' tasks

    def with_setup(self, first: str) -> Terms:
        """These terms with `first` (bash) run before the setup."""
        t = Terms(**vars(self))
        t.setup = first + "\n" + self.setup.strip()
        return t


END = r"""
app=0; ending=""; timer=0; killer=0; fds=(); pids=()
end() {
  # `p`, `k` local: end() runs as a trap while the wait loop below is waiting on its own "$p"
  local p k
  [ -n "$ending" ] && return; ending=$1; echo "$1" > "$endf"
  [ "$app" -gt 0 ] || return
  @END_REMOTE@
  @RELAY@
  local to=("${pids[@]}")
  [ "$1" = CANCELLED ] && [ @OWN_TASKS@ = 1 ] && to=("$app")    # the scheduler signals the other hosts' tasks
  for p in "${to[@]}"; do kill -CONT @TARGET@ 2>/dev/null; kill -TERM @TARGET@ 2>/dev/null; done
  ( @QUIET@sleep "$grace"; for p in "${to[@]}"; do kill -KILL @TARGET@ 2>/dev/null; done ) &
  killer=$!; disown "$killer"     # no "Terminated" note in the job's log when it is not needed
}
trap 'end TIMEOUT' ALRM
trap 'end CANCELLED' TERM
"""

DEPS = r"""
for dep in $okdeps; do      # --after JOB:ok where the scheduler's own check is weaker: ask how it ended
  s=$("$nagaya" job show --backend @BACKEND@ --json "$dep" 2>/dev/null | sed -n 's/^ *"state": "\([A-Z]*\)".*/\1/p')
  if [ "$s" != COMPLETED ]; then
    echo "nagaya: job $dep ended ${s:-unknown}, so this one does not run (--after $dep:ok)" >&2
    printf 'CANCELLED\nwhy dependency\nexit 0\nhost %s\nend %s\n' "@HOST@" "$(date +%s)" > "$endf"
    exit 0
  fi
done
"""

START = r"""
[ -n "$ending" ] && exit 0
[ "$limit" -gt 0 ] && { ( @QUIET@sleep "$limit"; kill -ALRM $$ ) & timer=$!; disown "$timer"; }
"""

WAIT = r"""
app=${pids[0]}
if [ -n "$ending" ]; then      # cancelled while the GPUs were being taken
  e=$ending; ending=""; end "$e"
fi
rc=0
for p in "${pids[@]}"; do      # the first task's status, unless it succeeded and another did not
  # `wait PID` first: bash keeps the status of a task that ended before the loop reached it (kill -0 would
  # find it gone, and its status lost). A trapped signal interrupts wait (128+N): wait again while the task
  # lives, and once more after it ended (its status is still kept; 127 once it was already taken).
  while :; do
    wait "$p"; r=$?
    kill -0 "$p" 2>/dev/null && continue
    [ "$r" -gt 128 ] && { wait "$p"; x=$?; [ "$x" -ne 127 ] && r=$x; }
    break
  done
  [ "$rc" -eq 0 ] && rc=$r
done
[ "$timer" -gt 0 ] && kill "$timer" 2>/dev/null
[ "$killer" -gt 0 ] && kill "$killer" 2>/dev/null
printf 'exit %s\nhost %s\nslots %s\nend %s\n' "$rc" "@HOST@" "@SLOTS@" "$(date +%s)" >>"$endf"
exit "$rc"
"""

# A multi-host job's other hosts: one task each, through the scheduler's launcher; the hosts in order.
HOSTS = r"""
hosts=($(awk '!seen[$1]++ {print $1}' "@HOSTFILE@"))
printf '%s\n' "${hosts[@]}" > "${endf%.end}.hosts"     # rank order, for `nagaya job exec --task`
"""


def _fill(text: str, t: Terms) -> str:
    target = '-- -"$p"' if t.group else '"$p"'
    relay = "" if t.relay_cancel else '[ "$1" = TIMEOUT ] || return     # a cancel: the scheduler signals ' \
        'every process of the job itself'
    for key, value in (("TARGET", target), ("RELAY", relay), ("QUIET", t.quiet), ("BACKEND", t.backend),
                       ("HOSTFILE", t.hostfile), ("OWN_TASKS", "1" if t.own_tasks else "0"), ("HOST", t.host),
                       ("SLOTS", t.slots), ("END_REMOTE", t.end_remote.strip() or ":")):
        text = text.replace(f"@{key}@", value)
    return text.strip()


def script(spec: JobSpec, cfg: Any, nagaya: str, state: Path, terms: Terms, directives: list[str],
           okdeps: tuple[str, ...] = ()) -> str:
    """The job's bash script. `directives`: the scheduler's option lines (first, where qsub reads them);
    `okdeps`: jobs this one runs after only if they COMPLETED, checked by the wrapper."""
    t = terms
    ngpus = count_gpus(spec.gpus) if spec.gpus else 0
    lines = ["#!/bin/bash", *directives,
             f"# nagaya: {spec.image} pinned to {spec.digest}",
             f"grace={int(cfg.sched.kill_grace)}; limit={spec.time_limit}; ngpus={ngpus}",
             f"lockdir={shlex.quote(cfg.sched.gpu_lock_dir)}; devdir={shlex.quote(cfg.gpu.dev_dir or '/dev')}",
             f"st={shlex.quote(str(state))}; nagaya={shlex.quote(nagaya)}; okdeps={shlex.quote(' '.join(okdeps))}",
             t.setup.strip(), *([t.remote.strip()] if spec.nodes > 1 else []), _fill(END, t), t.traps.strip(),
             _fill(DEPS, t), GPU_TAKE.strip(), _fill(START, t)]
    gpu = ' --gpus "$gpus"' if ngpus else ""
    # The app in a process group of its own where the scheduler signals groups (setsid); --pdeathsig: should
    # the wrapper die first, the app goes with it.
    head = t.quiet + ("exec setsid " if t.group else "exec ") + "setpriv --pdeathsig KILL -- " + \
        shlex.join([nagaya, "run"]) + gpu
    if spec.compose:        # the stack's supervisor here; it reaches the job's other hosts itself
        lines.append(f"( {t.quiet}exec setpriv --pdeathsig KILL -- "
                     f"{shlex.join([nagaya, 'compose', 'up', '-f', spec.compose])} ) </dev/null &")
        lines.append("pids+=($!)")
    elif spec.script:
        first = spec.script.splitlines()[0] if spec.script.startswith("#!") else "#!/bin/sh"
        interp = shlex.split(first[2:]) or ["/bin/sh"]
        # The script runs once in the container on the first host, read from a here-document: no shared
        # copy needed.
        lines.append(f"( {head} {shlex.join([spec.ref, *interp, '/dev/stdin', *spec.command])} ) "
                     "<<'NAGAYA_SCRIPT_EOF' &")
        lines += [spec.script.rstrip("\n"), "NAGAYA_SCRIPT_EOF", "pids+=($!)"]
    else:
        first = (' --env "NAGAYA_NODE_RANK=0" --env "NAGAYA_JOB_HOSTS=$all"' if spec.nodes > 1 else "")
        if spec.nodes > 1:
            lines += [_fill(HOSTS, t), 'all=$(IFS=,; echo "${hosts[*]}")']
        lines.append(f"( {head}{first} {shlex.join([spec.ref, *spec.command])} ) </dev/null &")
        lines.append("pids+=($!)")
        if spec.nodes > 1:
            # The same command once on each other host of the job, as a task of the job (the scheduler's
            # launcher); the rank in NAGAYA_NODE_RANK, the host list in NAGAYA_JOB_HOSTS.
            # NAGAYA_BATCH_JOB and the rank name the task's container record (`nagaya job exec --node`).
            run = 'env "NAGAYA_BATCH_JOB=$NAGAYA_BATCH_JOB" "NAGAYA_NODE_RANK=$r" ' + shlex.join([nagaya, "run"]) + \
                ' --env "NAGAYA_NODE_RANK=$r" --env "NAGAYA_JOB_HOSTS=$all" ' + shlex.join([spec.ref, *spec.command])
            lines += ['for r in $(seq 1 $((${#hosts[@]} - 1))); do h=${hosts[$r]}',
                      f"  ( remote \"$h\" {run} ) </dev/null &",
                      "  pids+=($!)", "done"]
    lines.append(_fill(WAIT, t))
    return "\n".join(lines) + "\n"


# -- the Python side -----------------------------------------------------------------------------------------------


class BatchBackend:
    """The parts of a wrapper-driven backend that do not depend on the scheduler."""

    name = ""
    bin_setting = ""            # the [sched] key holding the scheduler's binaries' directory
    what = ""                   # "a Grid Engine submit host"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.me = pwd.getpwuid(os.getuid()).pw_name
        self.state = Path(cfg.sched_state_dir) / self.name
        self.submitted: tuple[list[str], str] | None = None     # the last qsub's options and wrapper

    def _bin(self, name: str) -> str:
        path = os.path.join(getattr(self.cfg.sched, self.bin_setting), name)
        if not os.path.isabs(path) or not os.access(path, os.X_OK):
            raise UsageError(f"{path} not found: is this {self.what}? (set [sched] {self.bin_setting})")
        return path

    def _env(self) -> dict[str, str] | None:
        return None

    def _run(self, name: str, *args: str, input: str | None = None,
             cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self._bin(name), *args], capture_output=True, text=True, input=input, timeout=60,
                              cwd=cwd, env=self._env())

    def _state_dir(self) -> Path:
        with contextlib.suppress(OSError):      # the common case, without importing the local backend
            st = os.stat(self.state, follow_symlinks=False)
            if st.st_uid == os.getuid() and not st.st_mode & 0o077 and os.path.isdir(self.state):
                return self.state
        from nagaya.sched.local import ensure_state_dir

        ensure_state_dir(self.state.parent)
        self.state.mkdir(mode=0o700, exist_ok=True)
        return self.state

    def _record(self, job_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state / f"{job_id}.job").read_text()))
        except (OSError, ValueError):
            return {}

    def _save_record(self, job_id: str, spec: JobSpec, name: str) -> None:
        rec = {"id": job_id, "name": name, "digest": spec.digest, "image": spec.ref,
               "command": spec.command or [spec.script_name], "time_limit": spec.time_limit, "cwd": spec.cwd,
               "array": spec.array, "after": spec.after, "nodes": spec.nodes, "submit_time": iso(time.time())}
        tmp = self.state / f".{job_id}.job.tmp"
        tmp.write_text(json.dumps(rec) + "\n")
        tmp.replace(self.state / f"{job_id}.job")

    def _end(self, key: str) -> tuple[str, dict[str, str], bool]:
        """The wrapper's record: (CANCELLED | TIMEOUT | "", its exit/host/slots/end/why lines, whether the job
        has ended)."""
        try:
            lines = (self.state / f"{key}.end").read_text().splitlines()
        except OSError:
            return "", {}, False
        words = lines[0].split() if lines else []
        ending = words[0] if words and words[0] in ("CANCELLED", "TIMEOUT") else ""
        keys = ("exit ", "host ", "slots ", "end ", "why ")
        facts = dict(x.split(" ", 1) for x in lines if x.startswith(keys))
        return ending, facts, "exit" in facts or lines[:1] == ["CANCELLED pending"]

    def _log_done(self, info: JobInfo) -> bool:
        return info.state not in ACTIVE

    def _ranked_hosts(self, job_id: str) -> list[str]:
        """A multi-host job's hosts in rank order, as its wrapper wrote them ([] for a one-host job)."""
        try:
            return (self.state / f"{job_id}.hosts").read_text().split()
        except OSError:
            return []

    def status(self, job_id: str) -> JobInfo:
        raise NotImplementedError

    def usage(self, job_id: str) -> list[dict[str, Any]]:
        """No samples: the scheduler's accounting keeps only totals; not charted yet."""
        self.status(job_id)                     # NotFound for another user's job, as everywhere
        return []

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]:
        info = self.status(job_id)
        rec = self._record(job_id)
        if rec.get("array") and "." not in job_id:      # every task's log in turn (each to its end with -f)
            for t in task_ids(str(rec["array"])):
                yield from self.logs(f"{job_id}.{t}", follow)
            return
        path = Path(info.log) if info.log else None
        pos = 0
        while True:
            now = self.status(job_id) if follow else None
            if path is not None:
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    f.seek(pos)
                    while chunk := f.read(65536):
                        pos += len(chunk)
                        yield chunk
            if now is None or self._log_done(now):
                return
            time.sleep(0.3)

    # -- hold / release: a pending job kept from starting, on the scheduler's own terms ---------------------------
    def _held_control(self, job_id: str, tool: str, *args: str) -> None:
        raise NotImplementedError

    def hold(self, job_id: str) -> None:
        info = self.status(job_id)              # the owner check
        if info.state != "PENDING":
            raise Conflict(f"job {job_id} is {info.state}: only a pending job can be held")
        self._held_control(job_id, "qhold")

    def release(self, job_id: str) -> None:
        info = self.status(job_id)
        if info.state != "PENDING":
            raise Conflict(f"job {job_id} is {info.state}: only a held (pending) job can be released")
        self._held_control(job_id, "qrls")
