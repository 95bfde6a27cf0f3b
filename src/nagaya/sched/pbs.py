"""The pbs backend: OpenPBS 23 through its CLI (qsub, qstat -f -F json with job history, qdel, qsig), called by
configured absolute paths ([sched] pbs_bin): Grid Engine's qsub/qstat/qdel have the same names.

Each job is a generated bash script whose wrapper runs `nagaya run NAME@DIGEST ...` inside the job's session,
so PBS's own signals reach the app as if no container were there:
* qdel: the mom sends TERM to every process of the job's session (the app among them, and nagaya run relays
  it too), then KILL after the queue's `kill_delay`; the wrapper only notes that the job was cancelled;
* qsig -s suspend|resume (an operator action in PBS): SIGSTOP/SIGCONT to the whole session;
* the time limit: the wrapper sends TERM at the limit and KILL [sched] kill_grace later; PBS's walltime
  (limit + grace + 5 s) is the backstop.
GPUs: PBS's `ngpus` counts them; which device a job gets is nagaya's per-device flock (sched/gpulock.py).
Arrays are `qsub -J` (ID.TASK here, ID[TASK] to PBS), dependencies `-W depend=afterok|afterany`.

Logs and a small record (digest, image, how the job ended) live in the submitter's state directory
(<state_dir>/pbs, mode 0700): PBS spools a job's output on the node until the job ends, and `logs -f` follows
it live, so the wrapper writes the log itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError
from nagaya.sched import batchwrap
from nagaya.sched.batchwrap import BatchBackend, array_state, job_name, job_order, task_range, tasks_reason
from nagaya.sched.batchwrap import count_gpus as _count
from nagaya.sched.models import ACTIVE, JobInfo, JobSpec, format_time, iso
from nagaya.sched.models import parse_after as _deps
from nagaya.sched.slurm import nagaya_exe
from nagaya.units import parse_size

_name, _order, _task_range = job_name, job_order, task_range

# PBS's job states: Queued, Held, Waiting, Transit, Running, Exiting, Begun (an array), Suspended (by the
# server), U (suspended on workstation activity), X (a finished subjob), Finished, Moved.
_STATE = {"Q": "PENDING", "H": "PENDING", "W": "PENDING", "T": "PENDING", "M": "PENDING",
          "R": "RUNNING", "E": "RUNNING", "B": "RUNNING", "S": "SUSPENDED", "U": "SUSPENDED"}
SUBSTATE_DELETED = 91           # qdel'd (before or while running); 92 finished, 93 failed
ARRAY = re.compile(r"(\d+)-(\d+)(?::(\d+))?(?:%(\d+))?")
KEY = re.compile(r"(\d+)(?:\[(\d*)\])?(?:\..*)?")
# A wrapper up to this size goes to qsub as an argument (Linux takes at most 128 KiB in one).
ARG_SCRIPT_MAX = 100_000

# A task on another host of a multi-host job (the wrapper's ranks, compose's replicas there) is started by
# `pbs_tmrsh HOST` (PBS's TM interface: a task of the job on that host's mom, in its accounting, KILLed by PBS
# at the job's end) under this relay. qdel's TERM (and any qsig signal; suspend/resume PBS passes on to every
# host itself) reaches only the first host's session, so an ending is passed on by a second task on that host
# (TASK_SIGNAL) that tells the relay, which gives its app the signal, then KILL after the grace. The handoff
# cannot be lost: the signaller writes its mark, then reads the relay's pid; the relay publishes its pid
# (written aside, renamed), then looks for a mark. Both live in the job's $TMPDIR on that host (private to the
# job, removed by PBS), named by job and key; never in a shared /tmp, where another user could plant them:
# a $TMPDIR that is missing, a link, not the user's own or writable by others is refused (PRIVATE_TMPDIR).
# Arguments: GRACE KEY LOG ARGV...
PRIVATE_TMPDIR = r"""
m=$(stat -c %A -- "${TMPDIR:-}" 2>/dev/null)
[ -n "${TMPDIR:-}" ] && [ ! -L "$TMPDIR" ] && [ -d "$TMPDIR" ] && [ -O "$TMPDIR" ] && [ "${m:5:1}${m:8:1}" = -- ] ||
  { echo "nagaya: the job's TMPDIR (${TMPDIR:-unset}) is not a private directory of this user" >&2; exit 1; }
""".strip()
TASK_RELAY = r"""
g=$1; exec >>"$3" 2>&1 </dev/null
@PRIVATE@
d=$TMPDIR/.nagaya-$PBS_JOBID-$2; shift 3; a=0; t=0; k=0
setpriv --pdeathsig KILL -- "$@" & a=$!
end() {
  [ $t = 1 ] && return; t=1; s=$(cat "$d.end" 2>/dev/null); s=${s:-TERM}
  kill -CONT $a 2>/dev/null; kill -"$s" $a 2>/dev/null; ( sleep "$g"; kill -KILL $a 2>/dev/null ) & k=$!
}
trap end TERM
echo $$ >"$d.pid.$$" && mv -f "$d.pid.$$" "$d.pid"
[ -e "$d.end" ] && end
while :; do
  wait $a; r=$?
  kill -0 $a 2>/dev/null && continue
  [ $r -gt 128 ] && { wait $a; x=$?; [ $x -ne 127 ] && r=$x; }
  break
done
rm -f "$d.pid"; [ $k -gt 0 ] && kill $k 2>/dev/null
exit $r
""".replace("@PRIVATE@", PRIVATE_TMPDIR)
# Arguments: KEY SIGNAL (the relay's, as `kill -SIGNAL` takes it).
TASK_SIGNAL = r"""
@PRIVATE@
d=$TMPDIR/.nagaya-$PBS_JOBID-$1
echo "$2" >"$d.end.$$" && mv -f "$d.end.$$" "$d.end"
p=$(cat "$d.pid" 2>/dev/null) && kill -TERM "$p" 2>/dev/null
exit 0
""".replace("@PRIVATE@", PRIVATE_TMPDIR)


def task_argv(tmrsh: str, host: str, key: str, grace: int, log: str, argv: list[str]) -> list[str]:
    """ARGV as a task of the job on HOST under the relay (its output appended to LOG)."""
    return [tmrsh, host, "/bin/bash", "-c", TASK_RELAY.strip(), "relay", str(grace), key, log, *argv]


def relayed(argv: list[Any]) -> tuple[str, str, str] | None:
    """(pbs_tmrsh, HOST, KEY) of a task_argv() command line; None for any other."""
    if len(argv) > 7 and argv[2:6] == ["/bin/bash", "-c", TASK_RELAY.strip(), "relay"]:
        return str(argv[0]), str(argv[1]), str(argv[7])
    return None


def signal_argv(tmrsh: str, host: str, key: str, sig: str = "TERM") -> list[str]:
    """The task that passes SIG on to the relay KEY on HOST."""
    return [tmrsh, host, "/bin/bash", "-c", TASK_SIGNAL.strip(), "signal", key, sig]


# PBS's terms for the shared wrapper (batchwrap.py): the app runs in the job's session, so PBS's qdel
# TERM/KILL and qsig suspend's STOP/CONT reach it directly; the wrapper writes the log itself (PBS would spool
# it on the node until the job ends), so `logs -f` follows it live. A multi-host job's other hosts run their
# task under TASK_RELAY through `pbs_tmrsh`; their clients here ignore TERM, so the wrapper waits on them
# (waiting on the tasks) while qdel's TERM and kill_delay run their course, and end() tells each relay.
TERMS = batchwrap.Terms(
    backend="pbs",
    setup=r"""
cd "${PBS_O_WORKDIR:-$HOME}" || exit 1
base=${PBS_JOBID%%[.[]*}; task=""
if [ -n "${PBS_ARRAY_INDEX:-}" ]; then task=.$PBS_ARRAY_INDEX; export NAGAYA_ARRAY_TASK_ID=$PBS_ARRAY_INDEX; fi
endf=$st/$base$task.end; gpuf=$st/$base$task.gpus; log=$st/$base$task.out
export NAGAYA_BATCH_JOB="pbs $base$task"       # names the container's record (job exec)
exec >>"$log" 2>&1
""",
    traps="", group=False, relay_cancel=False, host="$(hostname -s)", slots="${NCPUS:-1}",
    hostfile="$PBS_NODEFILE",
    # plain assignments, not $(cat <<...) (a fork) nor `read` of a here-document (a read per byte from its
    # pipe): nothing on every job's way to its app
    remote=r"""
relay=@RELAY@
signal=@SIGNAL@
remote() {      # rank $r on host $1, as a task of the job (PBS's TM interface) under the relay
  local h=$1; shift
  trap '' TERM
  exec "$tmrsh" "$h" /bin/bash -c "$relay" relay "$grace" "$r" "$log" "$@"
}
""".replace("@RELAY@", shlex.quote(TASK_RELAY.strip())).replace("@SIGNAL@", shlex.quote(TASK_SIGNAL.strip())),
    end_remote=r"""
for ((k = 1; k < ${#hosts[@]}; k++)); do      # PBS signals this host's session only: tell each rank's relay
  ( trap '' TERM; exec "$tmrsh" "${hosts[$k]}" /bin/bash -c "$signal" signal "$k" TERM ) </dev/null >/dev/null 2>&1 &
done
""")


def batch_script(spec: JobSpec, nagaya: str, cfg: Any, state: Path, okdeps: tuple[str, ...] = ()) -> str:
    """The job's script; `okdeps`: arrays this job runs after only if every task of theirs succeeded (PBS's
    afterok on an array is met whatever its tasks' exit codes, so the wrapper asks nagaya how it ended)."""
    # the user's #PBS directives: qsub reads them up to the first command, so they go first
    directives = [x.strip() for x in spec.script.splitlines() if x.strip().startswith("#PBS")]
    tmrsh = os.path.join(cfg.sched.pbs_bin, "pbs_tmrsh")
    terms = TERMS.with_setup(f"tmrsh={shlex.quote(tmrsh)}")
    return batchwrap.script(spec, cfg, nagaya, state, terms, directives, okdeps)


def _directive(script: str, opt: str) -> str | None:
    """The value the script's `#PBS` lines give this qsub option (the last one wins), or None."""
    return batchwrap.directive(script, "#PBS", opt)


def _pbs_time(text: Any) -> str:
    """qstat's "Tue Dec  1 00:56:22 2026" as nagaya's ISO form."""
    try:
        return iso(time.mktime(time.strptime(" ".join(str(text).split()), "%a %b %d %H:%M:%S %Y")))
    except ValueError:
        return ""


def _exit_code(raw: Any) -> int | None:
    """PBS's Exit_status: N for `exit N`, 256+S for a kill by signal S (the shell's 128+S here), <0 for PBS's
    own reasons (JOB_EXEC_*)."""
    if not isinstance(raw, int) or isinstance(raw, bool):
        return None
    return 128 + raw - 256 if raw > 256 else raw


def _hosts(exec_host: str) -> str:
    """exec_host `vm/0*2+vm2/0` as `vm,vm2`."""
    return ",".join(dict.fromkeys(h.split("/")[0] for h in exec_host.split("+") if h))


class PBSScheduler(BatchBackend):
    name = "pbs"
    bin_setting = "pbs_bin"
    what = "an OpenPBS submit host"

    # -- submit -----------------------------------------------------------------------------------------------
    def batch_script(self, spec: JobSpec) -> str:
        okdeps = tuple(j for j, k in _deps(spec.after) if k == "ok" and self._record(j).get("array"))
        return batch_script(spec, nagaya_exe(self.cfg), self.cfg, self.state, okdeps)

    def args(self, spec: JobSpec) -> list[str]:
        self._state_dir()
        # The wrapper writes the log itself (PBS would spool it on the node until the job ends).
        args = ["-V", "-S", "/bin/bash", "-j", "oe", "-o", "/dev/null"]
        if spec.array:
            m = ARRAY.fullmatch(spec.array.strip())
            if not m:
                raise UsageError(f"invalid --array {spec.array!r} on PBS (e.g. 1-100, 1-100:2 or 1-100%10; "
                                 "PBS arrays have at least two tasks)")
            first, last, _step = _task_range(spec.array)
            if first < 0 or last <= first:
                raise UsageError(f"invalid --array {spec.array!r}: PBS arrays have at least two tasks")
            args += ["-J", spec.array.strip()]          # arrays are rerunnable in PBS (qsub refuses -r n)
        else:
            args += ["-r", "n"]         # a job killed by a server restart is not run a second time
        if spec.nodes > 1:      # the other hosts' tasks write the job's log themselves: no pbs_demux, no sockets
            args += ["-W", "no_stdio_sockets=true"]
        deps = []
        for jid, kind in _deps(spec.after):
            if "." in jid:
                raise UsageError(f"--after {jid}: PBS jobs cannot wait for one array task (use the array, "
                                 f"{jid.partition('.')[0]})")
            info = self.status(jid)         # yours and known: another user's job is not a dependency
            if info.state in ACTIVE:
                deps.append((jid, kind))
            elif kind == "ok" and info.state != "COMPLETED":    # PBS would count a finished job as met
                raise Conflict(f"job {jid} already ended {info.state}: --after {jid}:ok can never be met")
        if deps:
            args += ["-W", "depend=" + ",".join(
                f"after{'any' if self._record(j).get('array') else k}:{self._pbs_id(j)}" for j, k in deps)]
        if _directive(spec.script, "-N") is None:   # a `#PBS -N` of the script wins over the default name
            args += ["-N", _name(spec.name or "nagaya")[:230]]
        per_node = -(-spec.ntasks // spec.nodes)
        chunk = f"{spec.nodes}:ncpus={per_node * spec.cpus}"
        if spec.ntasks > 1:
            chunk += f":mpiprocs={per_node}"
        if spec.mem:
            chunk += f":mem={-(-parse_size(spec.mem) // 1024)}kb"
        if spec.gpus and _count(spec.gpus):
            chunk += f":ngpus={_count(spec.gpus)}"
        if not (spec.script and "select=" in "".join(_directive_lines(spec.script))):
            args += ["-l", f"select={chunk}"]
            if spec.nodes > 1:
                args += ["-l", "place=scatter"]
        if spec.time_limit:     # the wrapper ends the app at the limit; walltime is the backstop
            args += ["-l", f"walltime={format_time(spec.time_limit + int(self.cfg.sched.kill_grace) + 5)}"]
        if spec.partition:
            args += ["-q", spec.partition]
        return args

    def submit(self, spec: JobSpec) -> str:
        args = self.args(spec)
        script = self.batch_script(spec)
        if spec.script or len(script.encode()) > ARG_SCRIPT_MAX:
            # The script form: qsub reads the user's #PBS directives from it. PBS runs it under the user's
            # login shell (the profile read first) and from a script file it stages: ~50 ms more to start.
            r = self._run("qsub", *args, input=script, cwd=spec.cwd or None)
        else:
            # The wrapper as the job's executable, `bash -c WRAPPER`, as a plain `qsub -- CMD` starts: no
            # login shell (the job keeps the submitter's environment, -V, as sbatch's jobs do).
            r = self._run("qsub", *args, "--", "/bin/bash", "-c", script, "nagaya-job", cwd=spec.cwd or None)
        self.submitted = (args, script)         # what went to qsub (sched/submitplan.py checks its plan by it)
        if r.returncode != 0:
            raise NagayaError(f"qsub: {r.stderr.strip() or r.stdout.strip()}")
        m = KEY.fullmatch(r.stdout.strip().splitlines()[-1])
        if not m:
            raise NagayaError(f"qsub: unexpected answer {r.stdout.strip()!r}")
        job_id = m.group(1)
        self._save_record(job_id, spec, _directive(spec.script, "-N") or _name(spec.name or "nagaya")[:230])
        return job_id

    # -- queries ------------------------------------------------------------------------------------------------
    def _pbs_id(self, job_id: str) -> str:
        """nagaya's ID / ID.TASK as PBS names them: ID, ID[] for a whole array, ID[TASK]."""
        base, _, task = job_id.partition(".")
        if task:
            return f"{base}[{task}]"
        return f"{base}[]" if self._record(base).get("array") else base

    def _qstat(self, *ids: str, history: bool = True) -> dict[str, dict[str, Any]]:
        """qstat's JSON of these jobs (all when none), subjobs included; jobs it does not know, or another user's
        that it will not show, are simply absent."""
        r = self._run("qstat", "-f", "-F", "json", "-t", *(["-x"] if history else []), *ids)
        try:
            data = json.loads(r.stdout)
        except ValueError:
            data = None
        jobs = dict(data.get("Jobs") or {}) if isinstance(data, dict) else {}
        # An unknown or foreign job is simply absent; any other failure (no server, no pbs.conf) is an error.
        if r.returncode != 0 and not jobs and not any(x in r.stderr for x in ("Unknown Job", "Unauthorized",
                                                                              "has finished")):
            why = "; ".join(x.removeprefix("qstat: ") for x in r.stderr.strip().splitlines()) or r.returncode
            raise NagayaError(f"qstat: {why}")
        return jobs

    def _info(self, key: str, j: dict[str, Any]) -> JobInfo:
        m = KEY.fullmatch(key)
        base, task = (m.group(1), m.group(2) or "") if m else (key, "")
        jid = f"{base}.{task}" if task else base
        user = str(j.get("Job_Owner", "")).split("@")[0]
        rec = self._record(base) if user == self.me else {}
        letter = str(j.get("job_state", ""))
        res = j.get("Resource_List") or {}
        common = {"id": jid, "user": user, "name": str(j.get("Job_Name", "")), "image": str(rec.get("image", "")),
                  "digest": str(rec.get("digest", "")), "command": list(rec.get("command", [])),
                  "nodes": _hosts(str(j.get("exec_host", ""))), "submit_time": _pbs_time(j.get("ctime")),
                  "time_limit": int(rec.get("time_limit", 0)), "cpus": int(res.get("ncpus") or 1),
                  "backend": self.name, "log": str(self.state / f"{jid}.out") if rec else ""}
        if letter in _STATE:
            state = _STATE[letter]
            reason = ""
            if state == "PENDING":
                reason = "held" if letter == "H" and set(str(j.get("Hold_Types", ""))) & set("uos") - {"s"} \
                    else f"waiting for {rec['after']}" if rec.get("after") and letter == "H" else \
                    str(j.get("comment", ""))
            return JobInfo(**common, state=state, reason=reason,
                           start_time=_pbs_time(j.get("stime")) if state != "PENDING" else "")
        ending, facts, _ended = self._end(jid)
        raw = j.get("Exit_status")
        code = int(facts["exit"]) if facts.get("exit", "").lstrip("-").isdigit() else _exit_code(raw)
        substate = j.get("substate")
        reason = ""
        if ending:
            state = ending
            if facts.get("why") == "dependency":
                reason, code = "dependency not satisfied", None
        elif substate == SUBSTATE_DELETED:
            state = "CANCELLED"
        elif raw is None:               # it never ran: PBS deletes a job whose afterok can no longer be met
            state = "CANCELLED"
            reason = "dependency not satisfied" if rec.get("after") or j.get("depend") else ""
        elif isinstance(raw, int) and raw < 0:
            comment = str(j.get("comment", ""))
            state = "TIMEOUT" if "walltime" in comment.lower() or raw == -29 else "FAILED"
            reason, code = comment, None
        else:
            state = "COMPLETED" if code == 0 else "FAILED"
        return JobInfo(**common, state=state, exit_code=code, reason=reason,
                       start_time=_pbs_time(j.get("stime")),
                       end_time=_pbs_time(j.get("obittime") or j.get("mtime")))

    def _find(self, job_id: str) -> tuple[str, dict[str, Any]] | None:
        """The job's qstat record under its PBS key, if the caller may see it."""
        base, _, task = job_id.partition(".")
        wanted = [self._pbs_id(job_id)]
        if not task and wanted[0] == base:
            wanted.append(f"{base}[]")          # an array submitted outside nagaya (no record here)
        for pid in wanted:
            want = (base, "" if pid.endswith("[]") else task if "[" in pid else None)
            for key, j in self._qstat(pid).items():
                m = KEY.fullmatch(key)
                if m and (m.group(1), m.group(2)) == want:
                    if str(j.get("Job_Owner", "")).split("@")[0] != self.me and os.geteuid() != 0:
                        return None
                    return key, j
        return None

    def status(self, job_id: str) -> JobInfo:
        base, _, task = job_id.partition(".")
        if not base.isdigit() or (task and not task.isdigit()):
            raise UsageError(f"invalid job id {job_id!r} (ID, or ID.TASK for an array task)")
        found = self._find(job_id)
        if found is None:
            # Another user's job is reported exactly like a missing one: its existence is not ours to know.
            raise NotFound(f"job {job_id} not found")
        key, j = found
        if "[]" in key:
            return self._array(base, j)
        return self._info(key, j)

    def _array(self, base: str, parent: dict[str, Any]) -> JobInfo:
        """An array job as a whole: one state from its tasks' (listed in `reason`), logs from all of them."""
        tasks = [self._info(k, j) for k, j in self._qstat(f"{base}[]").items() if "[]" not in k]
        states: dict[str, int] = {}
        for t in tasks:
            states[t.state] = states.get(t.state, 0) + 1
        state = array_state(states, _STATE.get(str(parent.get("job_state")), "PENDING"))
        codes = [t.exit_code for t in tasks if t.exit_code is not None]
        info = self._info(f"{base}[]", parent)
        first = _task_range(str(parent.get("array_indices_submitted", "1")))[0]
        info.id, info.state = base, state
        info.exit_code = max(codes) if codes and state not in ACTIVE else None
        info.reason = tasks_reason(states)
        info.log = str(self.state / f"{base}.{first}.out") if info.image else ""
        info.nodes = ",".join(dict.fromkeys(h for t in tasks for h in t.nodes.split(",") if h))
        return info

    def list(self, all_users: bool = False) -> list[JobInfo]:
        if all_users:
            from nagaya.sched.local import is_admin

            if not is_admin(self.cfg):
                raise PermissionDenied("only administrators may list all users' jobs")
        jobs = self._qstat(history=False)
        out = [self._info(k, j) for k, j in jobs.items() if "[]" not in k
               and (all_users or str(j.get("Job_Owner", "")).split("@")[0] == self.me)]
        return sorted(out, key=_order)

    # -- control ------------------------------------------------------------------------------------------------
    def _control(self, job_id: str, tool: str, *args: str) -> None:
        info = self.status(job_id)              # the owner check
        if info.state not in ACTIVE:
            raise Conflict(f"job {job_id} has already finished ({info.state})")
        r = self._run(tool, *args, self._pbs_id(job_id))
        if r.returncode != 0:
            msg = r.stderr.strip() or r.stdout.strip()
            if "Unauthorized" in msg:
                raise PermissionDenied(f"{tool}: {msg} (suspending jobs is an operator action in PBS)")
            raise NagayaError(f"{tool}: {msg}")

    def cancel(self, job_id: str) -> None:
        self._control(job_id, "qdel")

    def suspend(self, job_id: str) -> None:
        self._control(job_id, "qsig", "-s", "suspend")

    def resume(self, job_id: str) -> None:
        self._control(job_id, "qsig", "-s", "resume")

    # -- interactive work (sched/interactive.py) ------------------------------------------------------------
    def hosts(self, job_id: str) -> list[str]:
        """A running job's hosts, the mother superior first (exec_host)."""
        ranked = self._ranked_hosts(job_id)
        if ranked:
            return ranked
        found = self._find(job_id)
        return _hosts(str(found[1].get("exec_host", ""))).split(",") if found and found[1].get("exec_host") else []

    def full_id(self, job_id: str) -> str:
        """PBS's own full id (`12.vm`, `12[3].vm`), as pbs_attach takes it."""
        found = self._find(job_id)
        if found is None:
            raise NotFound(f"job {job_id} not found")
        return found[0]

    def alloc_argv(self, spec: JobSpec, inner: list[str]) -> list[str]:
        """`nagaya run --alloc`: an interactive job of PBS's own, `qsub -I` (on this terminal)."""
        chunk = f"1:ncpus={spec.cpus}" + (f":mem={-(-parse_size(spec.mem) // 1024)}kb" if spec.mem else "")
        argv = [self._bin("qsub"), "-I", "-V", "-N", "interactive", "-l", f"select={chunk}"]
        if spec.time_limit:
            argv += ["-l", f"walltime={format_time(spec.time_limit)}"]
        if spec.partition:
            argv += ["-q", spec.partition]
        return [*argv, "--", *inner]

    def alloc_env(self) -> dict[str, str]:
        return dict(os.environ)

    def _held_control(self, job_id: str, tool: str, *args: str) -> None:
        self._control(job_id, tool, *args)      # a user hold (Hold_Types u)


def _directive_lines(script: str) -> list[str]:
    return [x for x in script.splitlines() if x.strip().startswith("#PBS")]
