"""The gridengine backend: Son of Grid Engine 8.1.9 (Debian 12) through its CLI (qsub -terse, qstat -xml,
qacct, qdel, qmod), called by configured absolute paths: PBS's qsub has the same name.

Each job is a generated bash script, submitted with `-notify`, whose wrapper runs `nagaya run NAME@DIGEST ...`
in a process group of its own, so Grid Engine's signals reach the app as if no container were there:
* qdel: GE sends SIGUSR2 ('notify' seconds before its SIGKILL); the wrapper turns it into TERM for the app
  and KILLs it after [sched] kill_grace, or GE's own KILL ends everything first;
* qmod -sj: GE sends SIGUSR1, then SIGSTOP to the wrapper; the wrapper stops the app at the USR1 and
  continues it on the SIGCONT of qmod -usj;
* the time limit: the wrapper sends TERM at the limit; h_rt (limit + grace + 5 s) is the backstop.
GE delivers the USR1/USR2 warnings to every process of the job (its additional group id), so the app starts
with them ignored (their default action would end it); `setpriv --pdeathsig KILL` ties it to the wrapper.

GPUs: GE's consumable counts them but does not say which; the wrapper takes a flock on one root-made file
per device (`[sched] gpu_lock_dir`, made by `nagaya job prepare-node`), all under a lock of the directory, so
two jobs never share a GPU and a dead job frees its GPUs with its file descriptors.

Logs and a small record (digest, image, how the job ended) live in the submitter's own state directory
(<state_dir>/gridengine, mode 0700): qacct keeps neither the working directory nor free text.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError
from nagaya.sched import batchwrap
from nagaya.sched.batchwrap import BatchBackend, array_state, job_name, job_order, task_range, tasks_reason
from nagaya.sched.batchwrap import count_gpus as _count
from nagaya.sched.gpulock import prepare_node as prepare_node
from nagaya.sched.models import ACTIVE, JobInfo, JobSpec, iso
from nagaya.sched.models import parse_after as _deps
from nagaya.sched.slurm import nagaya_exe

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_name, _order, _task_range = job_name, job_order, task_range


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not m:
        raise UsageError(f"invalid memory size {text!r} (e.g. 500M, 8G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _state(code: str) -> str:
    """qstat's state letters: qw/hqw pending, r/t/Rr running, s/S/T suspended, d(r) being deleted."""
    if any(c in code for c in "sST"):
        return "SUSPENDED"
    if "r" in code or "t" in code or "d" in code:
        return "RUNNING"
    return "PENDING"


def _qacct_time(text: str) -> str:
    try:
        return iso(time.mktime(time.strptime(text.strip(), "%a %b %d %H:%M:%S %Y")))
    except ValueError:
        return ""


PREFIX = "#NAGAYA_GE"         # qsub -C: the directive prefix of nagaya's batch scripts

# Grid Engine's terms for the shared wrapper (batchwrap.py): the app runs in its own process group with GE's
# -notify warnings (USR1 before suspend, USR2 before kill) ignored; the wrapper relays them as if there were
# no container (STOP now, TERM then KILL); --pdeathsig ties the app to the wrapper, which GE's SIGKILL ends.
# A multi-host job's other hosts run their task through `qrsh -inherit` (the PE's control_slaves).
TERMS = batchwrap.Terms(
    backend="gridengine",
    setup=r"""
task=""; if [ "${SGE_TASK_ID:-undefined}" != undefined ]; then
  task=.$SGE_TASK_ID; export NAGAYA_ARRAY_TASK_ID=$SGE_TASK_ID
fi
endf=$st/$JOB_ID$task.end; gpuf=$st/$JOB_ID$task.gpus; log=$st/$JOB_ID$task.out
export NAGAYA_BATCH_JOB="gridengine $JOB_ID$task"       # names the container's record (job exec)
""",
    traps=r"""
trap '[ "$app" -gt 0 ] && kill -STOP -- -"$app" 2>/dev/null' USR1
trap '[ "$app" -gt 0 ] && kill -CONT -- -"$app" 2>/dev/null' CONT
trap 'end CANCELLED' USR2
""",
    # The qrsh clients of other hosts' tasks are never stopped here (a stopped client loses its task); a TERM
    # to them reaches the task's relay (measured: every host's app ran its TERM handler).
    group=True, relay_cancel=True, quiet="trap '' USR1 USR2; ", host="$HOSTNAME", slots="${NSLOTS:-1}",
    hostfile="$PE_HOSTFILE",
    remote=r"""
remote() {      # a task on another host of the job, through qrsh -inherit (which joins its arguments with spaces
  # for a shell). There, as here, GE's -notify warnings reach every process of the job: a small relay turns
  # them into STOP / TERM-then-KILL for the task's app, which starts with them ignored.
  local h=$1 w; shift
  w=$(cat <<'NAGAYA_TASK_EOF'
g=$1; exec >>"$2" 2>&1; shift 2; a=0      # straight to the job's log: it outlives the qrsh client
trap '[ $a -gt 0 ] && kill -STOP -- -$a 2>/dev/null' USR1
trap '[ $a -gt 0 ] && kill -CONT -- -$a 2>/dev/null' CONT
end() { kill -CONT -- -$a; kill -TERM -- -$a; ( sleep $g; kill -KILL -- -$a ) & }
trap '[ $a -gt 0 ] && end 2>/dev/null' USR2 TERM HUP
( trap '' USR1 USR2; exec setsid setpriv --pdeathsig KILL -- "$@" ) & a=$!
r=0; while kill -0 $a 2>/dev/null; do wait $a; r=$?; done; exit $r
NAGAYA_TASK_EOF
)
  exec setsid "$qrsh" -inherit -nostdin "$h" "$(printf '%q ' bash -c "$w" task "$grace" "$log" "$@")"
}
""")


def batch_script(spec: JobSpec, nagaya: str, cfg: Any, state: Path) -> str:
    directives = []
    if spec.script:     # the user's #$ directives, under a prefix of their own: qsub reads every line of the
        # file, and the script's own copy (the here-document) must not count twice
        directives = [PREFIX + x.strip()[2:] for x in spec.script.splitlines() if x.strip().startswith("#$")]
    okdeps = tuple(j for j, kind in _deps(spec.after) if kind == "ok")     # -hold_jid waits for any end
    qrsh = os.path.join(cfg.sched.gridengine_bin, "qrsh")
    terms = TERMS.with_setup(f"qrsh={shlex.quote(qrsh)}")
    return batchwrap.script(spec, cfg, nagaya, state, terms, directives, okdeps)


ARRAY = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?(?:%(\d+))?")


def _in_range(task: str, tasks: str) -> bool:
    """Whether qstat's <tasks> (`3`, `4-100:1` for the pending rest, or `3,4` under a -tc limit) covers the task."""
    t = int(task)
    for part in filter(None, tasks.split(",")):
        first, last, step = _task_range(part)
        if first <= t <= last and (t - first) % step == 0:
            return True
    return False


def _directive(script: str, opt: str) -> str | None:
    return batchwrap.directive(script, "#$", opt)


class GridEngineScheduler(BatchBackend):
    name = "gridengine"
    bin_setting = "gridengine_bin"
    what = "a Grid Engine submit host"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "SGE_ROOT": self.cfg.sched.sge_root, "SGE_CELL": self.cfg.sched.sge_cell}

    # -- submit -----------------------------------------------------------------------------------------------
    def batch_script(self, spec: JobSpec) -> str:
        return batch_script(spec, nagaya_exe(self.cfg), self.cfg, self.state)

    def args(self, spec: JobSpec) -> list[str]:
        s = self.cfg.sched
        state = self._state_dir()
        args = ["-terse", "-C", PREFIX, "-notify", "-V", "-S", "/bin/bash", "-wd", spec.cwd, "-j", "y",
                "-o", f"{state}/$JOB_ID.$TASK_ID.out" if spec.array else f"{state}/$JOB_ID.out"]
        if spec.array:
            m = ARRAY.fullmatch(spec.array.strip())
            if not m:
                raise UsageError(f"invalid --array {spec.array!r} (e.g. 1-100, 1-100:2 or 1-100%10)")
            first, last, step = _task_range(spec.array)
            if first < 1 or last < first:
                raise UsageError(f"invalid --array {spec.array!r}: task ids start at 1")
            args += ["-t", f"{first}-{last}:{step}"] + (["-tc", m.group(4)] if m.group(4) else [])
        deps = _deps(spec.after)
        for jid, _kind in deps:
            self.status(jid)                # yours and known: another user's job is not a dependency
        if deps:
            args += ["-hold_jid", ",".join(dict.fromkeys(j.partition(".")[0] for j, _ in deps))]
        if _directive(spec.script, "-N") is None:  # a `#$ -N` of the script wins over the default name
            args += ["-N", _name(spec.name or "nagaya")]
        # Always in a parallel environment (control_slaves TRUE), one slot at least: `qrsh -inherit` then reaches
        # the job's hosts, for a multi-host job's other tasks and for `nagaya job exec`.
        if spec.nodes > 1:      # one slot per host in turn ($round_robin): the job's hosts are $PE_HOSTFILE's
            slots = max(spec.ntasks, spec.nodes) * spec.cpus
            args += ["-pe", s.gridengine_pe_hosts, str(slots)]
        else:
            slots = spec.ntasks * spec.cpus
            args += ["-pe", s.gridengine_pe, str(slots)]
        if spec.mem:
            per_slot = -(-_bytes(spec.mem) // max(1, slots // spec.nodes))   # GE: per slot; --mem: per node
            args += ["-l", f"{s.gridengine_mem}={per_slot // 1024}K"]
        if spec.gpus and _count(spec.gpus):
            args += ["-l", f"{s.gridengine_gpu}={_count(spec.gpus)}"]
        if spec.time_limit:     # the wrapper ends the app at the limit; h_rt is the backstop
            args += ["-l", f"h_rt={spec.time_limit + int(s.kill_grace) + 5}"]
        if spec.partition:
            args += ["-q", spec.partition]
        return args

    def submit(self, spec: JobSpec) -> str:
        args, script = self.args(spec), self.batch_script(spec)
        r = self._run("qsub", *args, input=script)
        self.submitted = (args, script)         # what went to qsub (sched/submitplan.py checks its plan by it)
        if r.returncode != 0:
            raise NagayaError(f"qsub: {r.stderr.strip() or r.stdout.strip()}")
        job_id = r.stdout.strip().splitlines()[-1].split(".")[0]      # after any warnings
        self._save_record(job_id, spec, _directive(spec.script, "-N") or _name(spec.name or "nagaya"))
        return job_id

    # -- queries ------------------------------------------------------------------------------------------------
    def _qstat(self, all_users: bool) -> list[dict[str, str]]:
        r = self._run("qstat", "-xml", "-u", "*" if all_users else self.me)
        if r.returncode != 0:
            raise NagayaError(f"qstat: {r.stderr.strip() or r.stdout.strip()}")
        out = []
        for j in ET.fromstring(r.stdout).iter("job_list"):
            out.append({c.tag: (c.text or "") for c in j})
        return out

    def _info(self, j: dict[str, str]) -> JobInfo:
        jid = j.get("JB_job_number", "")
        rec = self._record(jid) if j.get("JB_owner") == self.me else {}
        task = j.get("tasks", "") if rec.get("array") else ""
        key = f"{jid}.{task}" if task else jid
        state = _state(j.get("state", ""))
        queue = j.get("queue_name", "")
        start = j.get("JAT_start_time", "")
        return JobInfo(id=key, user=j.get("JB_owner", ""), state=state, name=j.get("JB_name", ""),
                       image=str(rec.get("image", "")), digest=str(rec.get("digest", "")),
                       command=list(rec.get("command", [])), nodes=queue.split("@", 1)[-1] if queue else "",
                       submit_time=j.get("JB_submission_time", "")[:19] or str(rec.get("submit_time", "")),
                       start_time=start[:19] if state != "PENDING" else "",
                       time_limit=int(rec.get("time_limit", 0)), cpus=int(j.get("slots") or 1),
                       reason=("error" if "E" in j.get("state", "") else "") or
                       ("held" if "h" in j.get("state", "") and state == "PENDING" else "") or
                       ("waiting for " + rec["after"] if state == "PENDING" and rec.get("after") else ""),
                       backend=self.name, log=str(self.state / f"{key}.out") if rec else "")

    def _accounting(self, job_id: str) -> dict[str, dict[str, str]]:
        """qacct's records of the job by task id ("" for a plain job); an id's newest record wins."""
        r = self._run("qacct", "-j", job_id)
        out: dict[str, dict[str, str]] = {}
        if r.returncode != 0 or not r.stdout.strip():
            return out
        d: dict[str, str] = {}
        for line in [*r.stdout.splitlines(), "====="]:      # records are separated by =====
            if line.startswith("====="):
                if d.get("jobnumber") == job_id:
                    out[d.get("taskid", "undefined").replace("undefined", "")] = d
                d = {}
                continue
            k, _, v = line.partition(" ")
            if k:
                d[k] = v.strip()
        return out

    def _finished(self, key: str, rec: dict[str, Any], a: dict[str, str]) -> JobInfo:
        """A job (or array task) that has left qstat: qacct's record, else the wrapper's own."""
        ending, facts, ended = self._end(key)
        common = {"id": key, "image": str(rec.get("image", "")), "digest": str(rec.get("digest", "")),
                  "command": list(rec.get("command", [])), "time_limit": int(rec.get("time_limit", 0)),
                  "backend": self.name, "log": str(self.state / f"{key}.out") if rec else ""}
        if not a:
            # Out of qstat, not yet in the accounting file (written every flush_time), or deleted pending.
            code = int(facts["exit"]) if facts.get("exit", "").isdigit() else None
            state = (ending or ("COMPLETED" if code == 0 else "FAILED")) if ended else "RUNNING"
            return JobInfo(**common, user=self.me, state=state, exit_code=code, name=str(rec.get("name", "")),
                           submit_time=str(rec.get("submit_time", "")),
                           nodes=facts.get("host", ""), end_time=iso(float(facts.get("end") or 0)),
                           cpus=int(facts["slots"]) if facts.get("slots", "").isdigit() else 1,
                           reason=("dependency not satisfied" if ending == "CANCELLED" and
                                   facts.get("why") == "dependency" else "") if ended else "finishing")
        failed = a.get("failed", "0").split()[0]
        try:
            code: int | None = int(a.get("exit_status", "").split()[0])
        except (ValueError, IndexError):
            code = None
        if ending:
            state = ending
        elif failed != "0":
            text = a.get("failed", "")
            state = "TIMEOUT" if "h_rt" in text or "limit" in text else \
                "CANCELLED" if "after job" in text and code == 137 else "FAILED"
        else:
            state = "COMPLETED" if code == 0 else "FAILED"
        return JobInfo(**common, user=a.get("owner", ""), state=state, name=a.get("jobname", ""),
                       nodes=a.get("hostname", ""), exit_code=code, submit_time=_qacct_time(a.get("qsub_time", "")),
                       start_time=_qacct_time(a.get("start_time", "")), end_time=_qacct_time(a.get("end_time", "")),
                       cpus=int(a.get("slots") or 1),
                       reason="dependency not satisfied" if facts.get("why") == "dependency" else
                       "" if failed == "0" else a.get("failed", ""))

    def status(self, job_id: str) -> JobInfo:
        base, _, task = job_id.partition(".")
        if not base.isdigit() or (task and not task.isdigit()):
            raise UsageError(f"invalid job id {job_id!r} (ID, or ID.TASK for an array task)")
        rec = self._record(base)
        if rec.get("array") and not task:
            return self._array(base, rec)
        for j in self._qstat(all_users=os.geteuid() == 0):
            if j.get("JB_job_number") == base and (not task or _in_range(task, j.get("tasks", ""))):
                if j.get("JB_owner") != self.me and os.geteuid() != 0:
                    break
                info = self._info(j)
                info.id = job_id
                info.log = str(self.state / f"{job_id}.out") if rec else ""
                return info
        acct = self._accounting(base)
        a = acct.get(task, {})
        if (a and a.get("owner") != self.me and os.geteuid() != 0) or (not a and not rec):
            # Another user's job is reported exactly like a missing one: its existence is not ours to know.
            raise NotFound(f"job {job_id} not found")
        return self._finished(job_id, rec, a)

    def _array(self, base: str, rec: dict[str, Any]) -> JobInfo:
        """An array job as a whole: one state from its tasks' (listed in `reason`), logs from all of them."""
        first, last, step = _task_range(str(rec["array"]))
        active = {t: j for j in self._qstat(all_users=False) if j.get("JB_job_number") == base
                  for t in range(first, last + 1, step) if _in_range(str(t), j.get("tasks", ""))}
        acct = self._accounting(base)
        states: dict[str, int] = {}
        codes = []
        for t in range(first, last + 1, step):
            if t in active:
                st = _state(active[t].get("state", ""))
            else:
                info = self._finished(f"{base}.{t}", rec, acct.get(str(t), {}))
                st = info.state
                if info.exit_code is not None:
                    codes.append(info.exit_code)
            states[st] = states.get(st, 0) + 1
        state = array_state(states)
        return JobInfo(id=base, user=self.me, state=state, name=str(rec.get("name", "")),
                       image=str(rec.get("image", "")), digest=str(rec.get("digest", "")),
                       command=list(rec.get("command", [])), time_limit=int(rec.get("time_limit", 0)),
                       exit_code=max(codes) if codes and state not in ACTIVE else None, backend=self.name,
                       reason=tasks_reason(states), log=str(self.state / f"{base}.{first}.out"))

    def list(self, all_users: bool = False) -> list[JobInfo]:
        if all_users:
            from nagaya.sched.local import is_admin

            if not is_admin(self.cfg):
                raise PermissionDenied("only administrators may list all users' jobs")
        jobs = [self._info(j) for j in self._qstat(all_users)]
        return sorted(jobs, key=_order)

    # -- control ------------------------------------------------------------------------------------------------
    def _control(self, job_id: str, tool: str, *args: str) -> JobInfo:
        info = self.status(job_id)              # the owner check
        if info.state not in ACTIVE or info.reason == "finishing":
            raise Conflict(f"job {job_id} has already finished ({info.state})")
        r = self._run(tool, *args, job_id)
        if r.returncode != 0:
            raise NagayaError(f"{tool}: {r.stderr.strip() or r.stdout.strip()}")
        return info

    def cancel(self, job_id: str) -> None:
        info = self.status(job_id)
        rec = self._record(job_id.partition(".")[0])
        pending = [job_id] if info.state == "PENDING" and info.user == self.me else []
        if rec.get("array") and "." not in job_id:
            first, last, step = _task_range(str(rec["array"]))
            pending = [f"{job_id}.{t}" for t in range(first, last + 1, step)
                       if self._pending_task(job_id, str(t))]
        for key in pending:                     # never started: no wrapper to record it
            with contextlib.suppress(OSError):
                (self.state / f"{key}.end").write_text("CANCELLED pending\n")
        self._control(job_id, "qdel")      # GE takes ID.TASK for one array task

    def _pending_task(self, base: str, task: str) -> bool:
        if (self.state / f"{base}.{task}.end").exists():
            return False
        return any(j.get("JB_job_number") == base and _in_range(task, j.get("tasks", ""))
                   and _state(j.get("state", "")) == "PENDING" for j in self._qstat(all_users=False))

    def suspend(self, job_id: str) -> None:
        if int(self._record(job_id.partition(".")[0]).get("nodes", 1)) > 1:
            # Measured: after qmod -sj (SIGSTOP 'notify' seconds after the warning) the qrsh -inherit tasks on
            # the other hosts are lost at qmod -usj; refused rather than half done.
            raise Conflict(f"job {job_id} runs on several hosts: Grid Engine cannot suspend and resume its "
                           "qrsh -inherit tasks (cancel it, or submit with --nodes 1 to suspend)")
        self._control(job_id, "qmod", "-sj")

    def resume(self, job_id: str) -> None:
        self._control(job_id, "qmod", "-usj")

    # -- interactive work (sched/interactive.py) ------------------------------------------------------------
    def hosts(self, job_id: str) -> list[str]:
        """A running job's (or array task's) hosts, the master first, from `qstat -j ID -xml`."""
        ranked = self._ranked_hosts(job_id)
        if ranked:
            return ranked
        base, _, task = job_id.partition(".")
        r = self._run("qstat", "-j", base, "-xml")
        out: list[str] = []
        with contextlib.suppress(ET.ParseError):
            for t in ET.fromstring(r.stdout).iter("ulong_sublist"):
                number = t.findtext("JAT_task_number")
                if number is None or (task and number != task):
                    continue
                for h in t.iter("JG_qhostname"):
                    if h.text and h.text not in out:
                        out.append(h.text)
                if out:
                    break
        return out

    def alloc_argv(self, spec: JobSpec, inner: list[str]) -> list[str]:
        """`nagaya run --alloc`: an interactive job of Grid Engine's own, `qrsh -pty` (on this terminal)."""
        s = self.cfg.sched
        # -now no: wait in the queue for the slots, as srun does (with -now yes a busy queue is a failure)
        argv = [self._bin("qrsh"), "-now", "no", "-pty", "yes", "-V", "-N", "interactive", "-wd", spec.cwd]
        if spec.cpus > 1:
            argv += ["-pe", s.gridengine_pe, str(spec.cpus)]
        if spec.mem:
            argv += ["-l", f"{s.gridengine_mem}={-(-_bytes(spec.mem) // spec.cpus) // 1024}K"]
        if spec.time_limit:
            argv += ["-l", f"h_rt={spec.time_limit}"]
        if spec.partition:
            argv += ["-q", spec.partition]
        return [*argv, " ".join(shlex.quote(a) for a in inner)]     # qrsh joins its arguments for a shell

    def alloc_env(self) -> dict[str, str]:
        return self._env()

    def _held_control(self, job_id: str, tool: str, *args: str) -> None:
        r = self._run(tool, *args, job_id)      # a user hold; GE takes ID.TASK for one array task
        if r.returncode != 0:
            raise NagayaError(f"{tool}: {r.stderr.strip() or r.stdout.strip()}")

    def _log_done(self, info: JobInfo) -> bool:
        return info.state not in ACTIVE and info.reason != "finishing"
