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
import json
import os
import pwd
import re
import shlex
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError
from nagaya.sched.models import ACTIVE, JobInfo, JobSpec, iso
from nagaya.sched.models import parse_after as _deps
from nagaya.sched.slurm import nagaya_exe

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not m:
        raise UsageError(f"invalid memory size {text!r} (e.g. 500M, 8G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _count(text: str) -> int:
    """--gpus N (Slurm's TYPE:N form too)."""
    try:
        return max(0, int(text.rsplit(":", 1)[-1]))
    except ValueError:
        raise UsageError(f"invalid GPU count {text!r}") from None


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

WRAPPER = r"""
# The wrapper (nagaya's gridengine backend): the app runs in its own process group with GE's -notify
# warnings (USR1 before suspend, USR2 before kill) ignored; the wrapper relays them as if there were no
# container (STOP now, TERM then KILL); --pdeathsig ties the app to the wrapper, which GE's SIGKILL ends.
app=0; ending=""; timer=0; killer=0; fds=()
end() {
  [ -n "$ending" ] && return; ending=$1; echo "$1" > "$endf"
  [ "$app" -gt 0 ] || return
  kill -CONT -- -"$app" 2>/dev/null; kill -TERM -- -"$app" 2>/dev/null
  ( trap '' USR1 USR2; sleep "$grace"; kill -KILL -- -"$app" 2>/dev/null ) &
  killer=$!; disown "$killer"     # no "Terminated" note in the job's log when it is not needed
}
trap '[ "$app" -gt 0 ] && kill -STOP -- -"$app" 2>/dev/null' USR1
trap '[ "$app" -gt 0 ] && kill -CONT -- -"$app" 2>/dev/null' CONT
trap 'end CANCELLED' USR2
trap 'end TIMEOUT' ALRM
trap 'end CANCELLED' TERM
for dep in $okdeps; do      # --after JOB:ok: GE's -hold_jid waits for any end; this asks how it ended
  st=$("$nagaya" job show --backend gridengine --json "$dep" 2>/dev/null | sed -n 's/^ *"state": "\([A-Z]*\)".*/\1/p')
  if [ "$st" != COMPLETED ]; then
    echo "nagaya: job $dep ended ${st:-unknown}, so this one does not run (--after $dep:ok)" >&2
    printf 'CANCELLED\nwhy dependency\nexit 0\nhost %s\nend %s\n' "$HOSTNAME" "$(date +%s)" > "$endf"
    exit 0
  fi
done
if [ "$ngpus" -gt 0 ]; then
  # One flock per device, taken all at once under the directory's lock: never half an allocation held.
  exec {dl}<"$lockdir" ||
    { echo "nagaya: no GPU lock directory $lockdir (nagaya job prepare-node, as root)" >&2; exit 1; }
  for try in $(seq 1200); do
    flock "$dl"; got=()
    for dev in "$devdir"/nvidia[0-9]*; do
      [ "${#got[@]}" -ge "$ngpus" ] && break
      i=${dev##*/nvidia}; [ -e "$lockdir/nvidia$i.lock" ] || continue
      exec {fd}<"$lockdir/nvidia$i.lock"
      if flock -n "$fd"; then got+=("$i"); fds+=("$fd"); else exec {fd}<&-; fi
    done
    if [ "${#got[@]}" -ge "$ngpus" ]; then flock -u "$dl"; break; fi
    for fd in "${fds[@]}"; do exec {fd}<&-; done; fds=(); flock -u "$dl"
    [ -n "$ending" ] && exit 0
    sleep 0.5
  done
  exec {dl}<&-
  [ "${#got[@]}" -ge "$ngpus" ] || { echo "nagaya: $ngpus free GPU(s) not found in $devdir" >&2; exit 1; }
  gpus=$(IFS=,; echo "${got[*]}")
  export NAGAYA_JOB_GPUS=$gpus
  echo "$gpus" > "$gpuf"
fi
[ -n "$ending" ] && exit 0
[ "$limit" -gt 0 ] && { ( trap '' USR1 USR2; sleep "$limit"; kill -ALRM $$ ) & timer=$!; disown "$timer"; }
"""

WAIT = r"""
app=$!
if [ -n "$ending" ]; then      # cancelled while the GPUs were being taken
  e=$ending; ending=""; end "$e"
fi
rc=0
while kill -0 "$app" 2>/dev/null; do wait "$app"; rc=$?; done
[ "$timer" -gt 0 ] && kill "$timer" 2>/dev/null
[ "$killer" -gt 0 ] && kill "$killer" 2>/dev/null
printf 'exit %s\nhost %s\nslots %s\nend %s\n' "$rc" "$HOSTNAME" "${NSLOTS:-1}" "$(date +%s)" >>"$endf"
exit "$rc"
"""


def batch_script(spec: JobSpec, nagaya: str, cfg: Any, state: Path) -> str:
    run = [nagaya, "run"]
    lines = ["#!/bin/bash"]
    if spec.script:     # the user's #$ directives, under a prefix of their own: qsub reads every line of the
        # file, and the script's own copy (the here-document below) must not count twice
        lines += [PREFIX + x.strip()[2:] for x in spec.script.splitlines() if x.strip().startswith("#$")]
    lines += [f"# nagaya: {spec.image} pinned to {spec.digest}",
              f"grace={int(cfg.sched.kill_grace)}; limit={spec.time_limit}; "
              f"ngpus={_count(spec.gpus) if spec.gpus else 0}",
              f"lockdir={shlex.quote(cfg.sched.gpu_lock_dir)}; devdir={shlex.quote(cfg.gpu.dev_dir or '/dev')}",
              f"st={shlex.quote(str(state))}; nagaya={shlex.quote(nagaya)}; "
              f"okdeps={shlex.quote(' '.join(j for j, kind in _deps(spec.after) if kind == 'ok'))}",
              'task=""; if [ "${SGE_TASK_ID:-undefined}" != undefined ]; then',
              '  task=.$SGE_TASK_ID; export NAGAYA_ARRAY_TASK_ID=$SGE_TASK_ID',
              'fi',
              'endf=$st/$JOB_ID$task.end; gpuf=$st/$JOB_ID$task.gpus',
              WRAPPER.strip()]
    gpu = ["--gpus", '"$gpus"'] if spec.gpus else []
    # GE sends its warnings to every process of the job, whatever its process group: the app starts with
    # USR1/USR2 ignored (dispositions survive exec), so only the wrapper acts on them.
    head = "trap '' USR1 USR2; exec setsid setpriv --pdeathsig KILL -- " + shlex.join(run) + \
        (" " + " ".join(gpu) if gpu else "")
    if spec.script:
        first = spec.script.splitlines()[0] if spec.script.startswith("#!") else "#!/bin/sh"
        interp = shlex.split(first[2:]) or ["/bin/sh"]
        # The script runs once in the container, read from a here-document: no shared copy needed.
        lines.append(f"( {head} {shlex.join([spec.ref, *interp, '/dev/stdin', *spec.command])} ) "
                     "<<'NAGAYA_SCRIPT_EOF' &")
        lines += [spec.script.rstrip("\n"), "NAGAYA_SCRIPT_EOF"]
    else:
        lines.append(f"( {head} {shlex.join([spec.ref, *spec.command])} ) </dev/null &")
    lines.append(WAIT.strip())
    return "\n".join(lines) + "\n"


def _name(text: str) -> str:
    """GE job names: no '/', ':', '@', '\\', '*', '?' and not starting with a digit."""
    s = re.sub(r"[/:@\\*?\s]", "_", text) or "job"
    return s if not s[0].isdigit() else "j" + s


ARRAY = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?(?:%(\d+))?")


def _task_range(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", text.split("%")[0])
    if not m:
        return 1, 0, 1
    first = int(m.group(1))
    return first, int(m.group(2) or first), int(m.group(3) or 1)


def _in_range(task: str, tasks: str) -> bool:
    """Whether qstat's <tasks> (`3`, or `4-100:1` for the pending rest) covers the task."""
    if not tasks:
        return False
    first, last, step = _task_range(tasks)
    t = int(task)
    return first <= t <= last and (t - first) % step == 0


def _order(info: JobInfo) -> tuple[int, int]:
    """Jobs by id, array tasks (ID.T, or ID.T-U:S for the pending rest) by task."""
    base, _, task = info.id.partition(".")
    return int(base), int(re.match(r"\d*", task).group() or 0)  # type: ignore[union-attr]


def _directive(script: str, opt: str) -> str | None:
    """The value the script's `#$` lines give this qsub option (the last one wins, as in qsub), or None."""
    value = None
    for line in script.splitlines():
        if line.strip().startswith("#$"):
            with contextlib.suppress(ValueError):
                words = shlex.split(line.strip()[2:], comments=True)
                for i, w in enumerate(words):
                    if w == opt:
                        value = words[i + 1] if i + 1 < len(words) else ""
    return value


class GridEngineScheduler:
    name = "gridengine"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.me = pwd.getpwuid(os.getuid()).pw_name
        self.state = Path(cfg.sched_state_dir) / "gridengine"

    def _bin(self, name: str) -> str:
        path = os.path.join(self.cfg.sched.gridengine_bin, name)
        if not os.path.isabs(path) or not os.access(path, os.X_OK):
            raise UsageError(f"{path} not found: is this a Grid Engine submit host? (set [sched] gridengine_bin)")
        return path

    def _run(self, name: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SGE_ROOT": self.cfg.sched.sge_root, "SGE_CELL": self.cfg.sched.sge_cell}
        return subprocess.run([self._bin(name), *args], capture_output=True, text=True, input=input, timeout=60,
                              env=env)

    def _state_dir(self) -> Path:
        from nagaya.sched.local import ensure_state_dir

        ensure_state_dir(self.state.parent)
        self.state.mkdir(mode=0o700, exist_ok=True)
        return self.state

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
        if spec.nodes > 1:
            raise UsageError("--nodes > 1 is not supported on Grid Engine yet (use --ntasks/--cpus on one host)")
        slots = spec.ntasks * spec.cpus
        if slots > 1:
            args += ["-pe", s.gridengine_pe, str(slots)]
        if spec.mem:
            per_slot = -(-_bytes(spec.mem) // slots)     # GE counts h_vmem per slot; --mem is per node
            args += ["-l", f"{s.gridengine_mem}={per_slot // 1024}K"]
        if spec.gpus and _count(spec.gpus):
            args += ["-l", f"{s.gridengine_gpu}={_count(spec.gpus)}"]
        if spec.time_limit:     # the wrapper ends the app at the limit; h_rt is the backstop
            args += ["-l", f"h_rt={spec.time_limit + int(s.kill_grace) + 5}"]
        if spec.partition:
            args += ["-q", spec.partition]
        return args

    def submit(self, spec: JobSpec) -> str:
        r = self._run("qsub", *self.args(spec), input=self.batch_script(spec))
        if r.returncode != 0:
            raise NagayaError(f"qsub: {r.stderr.strip() or r.stdout.strip()}")
        job_id = r.stdout.strip().splitlines()[-1].split(".")[0]      # after any warnings
        name = _directive(spec.script, "-N") or _name(spec.name or "nagaya")
        rec = {"id": job_id, "name": name, "digest": spec.digest, "image": spec.ref,
               "command": spec.command or [spec.script_name], "time_limit": spec.time_limit, "cwd": spec.cwd,
               "array": spec.array, "after": spec.after, "submit_time": iso(time.time())}
        tmp = self.state / f".{job_id}.job.tmp"
        tmp.write_text(json.dumps(rec) + "\n")
        tmp.replace(self.state / f"{job_id}.job")
        return job_id

    # -- queries ------------------------------------------------------------------------------------------------
    def _record(self, job_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state / f"{job_id}.job").read_text()))
        except (OSError, ValueError):
            return {}

    def _end(self, job_id: str) -> tuple[str, dict[str, str], bool]:
        """The wrapper's record: (CANCELLED | TIMEOUT | "", its exit/host/end lines, whether the job has ended)."""
        try:
            lines = (self.state / f"{job_id}.end").read_text().splitlines()
        except OSError:
            return "", {}, False
        ending = lines[0].split()[0] if lines and lines[0].split()[0] in ("CANCELLED", "TIMEOUT") else ""
        facts = dict(x.split(" ", 1) for x in lines if x.startswith(("exit ", "host ", "slots ", "end ", "why ")))
        return ending, facts, "exit" in facts or lines[:1] == ["CANCELLED pending"]

    def _ending(self, job_id: str) -> str:
        return self._end(job_id)[0]

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
        order = ("RUNNING", "SUSPENDED", "PENDING", "CANCELLED", "TIMEOUT", "FAILED", "COMPLETED")
        state = next(x for x in order if x in states)
        if state == "SUSPENDED" and "PENDING" in states:
            state = "RUNNING"
        return JobInfo(id=base, user=self.me, state=state, name=str(rec.get("name", "")),
                       image=str(rec.get("image", "")), digest=str(rec.get("digest", "")),
                       command=list(rec.get("command", [])), time_limit=int(rec.get("time_limit", 0)),
                       exit_code=max(codes) if codes and state not in ACTIVE else None, backend=self.name,
                       reason="tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
                       log=str(self.state / f"{base}.{first}.out"))

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
        self._control(job_id, "qmod", "-sj")

    def resume(self, job_id: str) -> None:
        self._control(job_id, "qmod", "-usj")

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]:
        info = self.status(job_id)
        rec = self._record(job_id)
        if rec.get("array") and "." not in job_id:      # every task's log in turn (each to its end with -f)
            first, last, step = _task_range(str(rec["array"]))
            for t in range(first, last + 1, step):
                yield from self.logs(f"{job_id}.{t}", follow)
            return
        path = Path(info.log) if info.log else None
        pos = 0
        while True:
            state = self.status(job_id) if follow else None
            if path is not None:
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    f.seek(pos)
                    while chunk := f.read(65536):
                        pos += len(chunk)
                        yield chunk
            if state is None or (state.state not in ACTIVE and state.reason != "finishing"):
                return
            time.sleep(0.3)


def prepare_node(cfg: Any) -> list[int]:
    """As root, on each execution host (at boot, or as the queue's `prolog root@...`): the GPU lock directory
    and one lock file per /dev/nvidiaN, root-owned and read-only for users (flock needs no write access).
    Made through safefs: nothing on the way can be a link or a directory someone else made."""
    from nagaya import safefs

    if os.geteuid() != 0:
        raise PermissionDenied("nagaya job prepare-node must run as root")
    lock_dir = Path(cfg.sched.gpu_lock_dir)
    dev_dir = cfg.gpu.dev_dir or "/dev"
    try:
        present = sorted(int(m.group(1)) for n in os.listdir(dev_dir) if (m := re.fullmatch(r"nvidia(\d+)", n)))
    except OSError:
        present = []
    parent = safefs.open_dir(lock_dir.parent)
    try:
        fd = safefs.mkdir_at(parent, lock_dir.name, 0o755, 0, 0, owners=(0,))
    finally:
        os.close(parent)
    try:
        for i in present:
            f = safefs.create_at(fd, f"nvidia{i}.lock", 0o444, 0, 0)
            if f is not None:
                os.close(f)
            else:                           # an existing one must be root's own plain file
                f = os.open(f"nvidia{i}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                try:
                    safefs.check_file(f, f"nvidia{i}.lock", (0,))
                finally:
                    os.close(f)
    finally:
        os.close(fd)
    return present
