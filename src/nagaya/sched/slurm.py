"""The slurm backend: a real cluster through its CLI (sbatch --parsable, scontrol, squeue --json, scancel).

Each job is a generated batch script whose steps run `nagaya run NAME@DIGEST ...` via srun, so Slurm's
signals, suspend and limits reach the container like any other step. The pinned digest and the image
travel in the job's comment, so `nagaya job show` finds them on any login node. Every read goes through
the job's UserId: nagaya shows, cancels and prints the logs of the caller's own jobs only.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nagaya.errors import Conflict, NagayaError, NotFound, PermissionDenied, UsageError
from nagaya.sched.models import ACTIVE, JobInfo, JobSpec, UsageSample, format_time, iso, parse_after

_STATE = {"COMPLETING": "RUNNING", "CONFIGURING": "RUNNING", "REQUEUED": "PENDING", "RESIZING": "RUNNING",
          "STAGE_OUT": "RUNNING", "SIGNALING": "RUNNING", "PREEMPTED": "CANCELLED", "DEADLINE": "TIMEOUT"}


def _state(s: str) -> str:
    s = s.split()[0] if s else "PENDING"
    return s if s in ("PENDING", "RUNNING", "SUSPENDED", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") \
        else _STATE.get(s, "FAILED")


def parse_scontrol(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints KEY=VALUE pairs split by spaces; values may hold spaces too."""
    out: dict[str, str] = {}
    key = ""
    for word in line.strip().split(" "):
        k, eq, v = word.partition("=")
        if eq and k and (k[0].isupper() or k[0] == "_") and " " not in k:
            key = k
            out[key] = v
        elif key:
            out[key] += " " + word
    return out


def _exit_code(text: str) -> int | None:
    try:
        code, sig = (int(x) for x in text.split(":"))
    except ValueError:
        return None
    return 128 + sig if sig else code


def _wait_status(raw: object) -> int | None:
    """Slurm's JSON gives the job's raw wait status: 768 is `exit 3`, a low byte the signal."""
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        return None
    return 128 + (raw & 0x7F) if raw & 0x7F else (raw >> 8) & 0xFF


def _ts(text: str) -> str:
    return "" if text in ("", "None", "Unknown", "N/A") else text


def nagaya_exe(cfg: Any) -> str:
    """The nagaya the job's steps run: [sched] nagaya, else the one on PATH."""
    return str(cfg.sched.nagaya or shutil.which("nagaya") or "nagaya")


def comment(spec: JobSpec) -> str:
    """The job's comment: how `nagaya job show` finds the pinned digest and the image on any login node."""
    return f"nagaya {spec.digest} {spec.ref}"


def batch_script(spec: JobSpec, nagaya: str, prologue: tuple[str, ...] = ()) -> str:
    """The job's batch script: its steps run `nagaya run NAME@DIGEST ...` through srun. Shared by sbatch
    (the CLI) and slurmrestd (the portal, whose `prologue` lines run first, before any step starts)."""
    run = [nagaya, "run"]
    if spec.gpus:
        run += ["--gpus", "all"]            # Slurm sets CUDA_VISIBLE_DEVICES/cgroups to the allocated GPUs
    lines = ["#!/bin/sh"]
    if spec.script:                         # the user's directives first: sbatch reads them; options win
        lines += [x for x in spec.script.splitlines() if x.strip().startswith("#SBATCH")]
    lines += [f"# nagaya: {spec.image} pinned to {spec.digest}", "set -e", *prologue]
    if spec.array:
        lines.append('export NAGAYA_ARRAY_TASK_ID="$SLURM_ARRAY_TASK_ID"')
    if spec.compose:                        # the stack's supervisor runs on the batch host; it sruns the replicas
        lines.append("exec " + shlex.join([nagaya, "compose", "up", "-f", spec.compose]))
    elif spec.build:                        # a build runs buildah rootless on the batch host, as the user
        lines.append("exec " + shlex.join([nagaya, "build", "--recipe", spec.build]))
    elif spec.script:
        first = spec.script.splitlines()[0] if spec.script.startswith("#!") else "#!/bin/sh"
        interp = shlex.split(first[2:]) or ["/bin/sh"]
        # The script runs once in the container on the batch host, read from a here-document so
        # no copy of it needs a shared file system.
        lines.append(shlex.join([*run, spec.ref, *interp, "/dev/stdin", *spec.command])
                     + " <<'NAGAYA_SCRIPT_EOF'")
        lines += [spec.script.rstrip("\n"), "NAGAYA_SCRIPT_EOF"]
    else:
        lines.append("exec srun " + shlex.join([*run, spec.ref, *spec.command]))
    return "\n".join(lines) + "\n"


def job_info(j: dict[str, Any]) -> JobInfo:
    """A job as Slurm's JSON (squeue --json, slurmrestd v0.0.38) describes it."""
    words = str(j.get("comment") or "").split()
    digest, image = (words[1], words[2]) if len(words) >= 3 and words[0] == "nagaya" else ("", "")
    state = _state(str(j.get("job_state", "")))
    limit = j.get("time_limit")
    jid = str(j.get("job_id"))
    if isinstance(j.get("array_task_id"), int):     # an array task: ID.TASK, as nagaya names them
        jid = f"{j.get('array_job_id')}.{j['array_task_id']}"
    elif j.get("array_task_string"):                # the array's tasks not started yet
        jid = f"{j.get('array_job_id')}.{j['array_task_string']}"
    return JobInfo(id=jid, user=str(j.get("user_name", "")), state=state,
                   name=str(j.get("name", "")), image=image, digest=digest,
                   command=[str(j["command"])] if j.get("command") else [], nodes=str(j.get("nodes", "")),
                   exit_code=None if state in ACTIVE else _wait_status(j.get("exit_code")),
                   submit_time=iso(j.get("submit_time")), start_time=iso(j.get("start_time")),
                   end_time=iso(j.get("end_time")) if state not in ACTIVE else "",
                   time_limit=limit * 60 if isinstance(limit, int) and 0 < limit < 2**31 else 0,
                   cpus=int(j.get("cpus") or 1), reason="" if j.get("state_reason") in (None, "None")
                   else str(j["state_reason"]), backend="slurm", log=str(j.get("standard_output") or ""))


def _order(info: JobInfo) -> tuple[int, int]:
    """Jobs by id, array tasks (ID.T, or ID.T-U%N for the pending rest) by task."""
    base, _, task = info.id.partition(".")
    m = re.match(r"\d*", task)
    return int(base), int(m.group() or 0) if m else 0


class SlurmScheduler:
    name = "slurm"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.me = pwd.getpwuid(os.getuid()).pw_name

    def _bin(self, name: str) -> str:
        d = self.cfg.sched.slurm_bin_dir
        path = os.path.join(d, name) if d else shutil.which(name)
        if not path or not os.path.exists(path):
            raise UsageError(f"{name} not found: is this a Slurm login node? (or set [sched] slurm_bin_dir)")
        return path

    def _run(self, name: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self._bin(name), *args], capture_output=True, text=True, input=input, timeout=60)

    # -- submit -----------------------------------------------------------------------------------------------
    def batch_script(self, spec: JobSpec) -> str:
        return batch_script(spec, nagaya_exe(self.cfg))

    def submit(self, spec: JobSpec) -> str:
        args = ["--parsable", f"--comment={comment(spec)}", f"--chdir={spec.cwd}"]
        if spec.name:
            args.append(f"--job-name={spec.name}")
        if not spec.script or spec.nodes != 1:
            args.append(f"--nodes={spec.nodes}")
        if not spec.script or spec.ntasks != 1:
            args.append(f"--ntasks={spec.ntasks}")
        if not spec.script or spec.cpus != 1:
            args.append(f"--cpus-per-task={spec.cpus}")
        for opt, val in (("--mem", spec.mem), ("--gpus", spec.gpus), ("--partition", spec.partition)):
            if val:
                args.append(f"{opt}={val}")
        if spec.time_limit:
            args.append(f"--time={format_time(spec.time_limit)}")
        if spec.array:
            if not re.fullmatch(r"\d+(-\d+(:\d+)?)?(%\d+)?", spec.array.strip()):
                raise UsageError(f"invalid --array {spec.array!r} (e.g. 1-100, 1-100:2 or 1-100%10)")
            args.append(f"--array={spec.array.strip()}")
        deps = parse_after(spec.after)
        for jid, _kind in deps:
            self.status(jid)                # yours and known: another user's job is not a dependency
        if deps:
            args.append("--dependency=" + ",".join(f"after{k}:{j.replace('.', '_')}" for j, k in deps))
        r = self._run("sbatch", *args, input=self.batch_script(spec))
        if r.returncode != 0:
            raise NagayaError(f"sbatch: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout.strip().split(";")[0]

    # -- queries ------------------------------------------------------------------------------------------------
    def _lines(self, job_id: str) -> list[dict[str, str]]:
        """scontrol's records of the job: one, or one per task (and the pending rest) of an array."""
        r = self._run("scontrol", "show", "job", "-o", job_id)
        return [parse_scontrol(x) for x in r.stdout.splitlines() if x.strip()] if r.returncode == 0 else []

    def _raw(self, job_id: str) -> dict[str, str]:
        if not re.fullmatch(r"\d+(_\d+)?", job_id):
            raise UsageError(f"invalid job id {job_id!r} (ID, or ID.TASK for an array task)")
        lines = self._lines(job_id)
        d = lines[0] if lines else self._accounting(job_id)    # slurmctld forgets finished jobs after MinJobAge
        # Another user's job is reported exactly like a missing one: its existence is not ours to know.
        if d.get("UserId", "").split("(")[0] != self.me and os.geteuid() != 0:
            raise self._not_found(job_id)
        return d

    def _not_found(self, job_id: str) -> NotFound:
        """The one answer for a missing job and for another user's, word for word."""
        try:
            self._bin("sacct")
        except UsageError:
            return NotFound(f"job {job_id} not found")
        return NotFound(f"job {job_id} not found (Slurm keeps finished jobs for MinJobAge only, and "
                        "sacct has no record of it)")

    # sacct's fields under the names `scontrol show job` uses, so _info reads both alike.
    _SACCT = (("JobId", "JobID"), ("UserId", "User"), ("JobState", "State"), ("ExitCode", "ExitCode"),
              ("NodeList", "NodeList"), ("SubmitTime", "Submit"), ("StartTime", "Start"), ("EndTime", "End"),
              ("TimeLimit", "Timelimit"), ("JobName", "JobName"), ("Comment", "Comment"), ("NumCPUs", "NCPUS"),
              ("WorkDir", "WorkDir"))

    def _accounting(self, job_id: str) -> dict[str, str]:
        """A job slurmctld no longer holds, from the accounting database (sacct), where the site has one.
        The job comment (nagaya's digest) is there when the site sets AccountingStoreFlags=job_comment."""
        try:
            r = self._run("sacct", "-X", "-P", "-n", "-j", job_id,
                          "--format=" + ",".join(f for _, f in self._SACCT))
        except UsageError:                  # no sacct on this host
            raise self._not_found(job_id) from None
        rows = [x.split("|") for x in r.stdout.splitlines() if x.split("|")[0] == job_id] if r.returncode == 0 else []
        if not rows or len(rows[0]) < len(self._SACCT):
            raise self._not_found(job_id)
        # Comment is the only free-text field; fields after it are fixed-form, so rejoin any '|' inside it.
        row = rows[0]
        extra = len(row) - len(self._SACCT)
        c = [k for k, _ in self._SACCT].index("Comment")
        row = [*row[:c], "|".join(row[c:c + extra + 1]), *row[c + extra + 1:]]
        d = {k: v for (k, _), v in zip(self._SACCT, row, strict=True)}
        # nagaya's jobs write slurm-ID.out in their directory (sbatch's default; 22.05's sacct lacks StdOut).
        d["StdOut"] = os.path.join(d["WorkDir"], f"slurm-{job_id}.out") if d.get("WorkDir") else ""
        return d

    def _info(self, d: dict[str, str]) -> JobInfo:
        comment = d.get("Comment", "").split()
        digest, image = (comment[1], comment[2]) if len(comment) >= 3 and comment[0] == "nagaya" else ("", "")
        limit = d.get("TimeLimit", "")
        secs = 0
        if limit and limit not in ("UNLIMITED", "Partition_Limit"):
            from nagaya.sched.models import parse_time

            secs = parse_time(limit)
        state = _state(d.get("JobState", ""))
        task = d.get("ArrayTaskId", "")
        jid = f"{d['ArrayJobId']}.{task}" if task and d.get("ArrayJobId") else d.get("JobId", "")
        log = d.get("StdOut", "")
        if task.isdigit():
            log = log.replace("%A", d["ArrayJobId"]).replace("%a", task)
        return JobInfo(id=jid, user=d.get("UserId", "").split("(")[0], state=state,
                       name=d.get("JobName", ""), image=image, digest=digest, command=[d.get("Command", "")],
                       nodes="" if d.get("NodeList") in (None, "(null)") else d["NodeList"],
                       exit_code=None if state in ACTIVE else _exit_code(d.get("ExitCode", "")),
                       submit_time=_ts(d.get("SubmitTime", "")),
                       start_time=_ts(d.get("StartTime", "")) if state != "PENDING" else "",
                       end_time=_ts(d.get("EndTime", "")) if state not in ACTIVE else "",
                       time_limit=secs, cpus=int(d.get("NumCPUs", "1").split("-")[0] or 1),
                       reason=d.get("Reason", "") if d.get("Reason") != "None" else "", backend="slurm",
                       log=log)

    def status(self, job_id: str) -> JobInfo:
        base, _, task = job_id.partition(".")
        if not task and base.isdigit():
            lines = self._lines(base)
            if lines and lines[0].get("ArrayJobId") == base and lines[0].get("ArrayTaskId"):
                self._raw(base)                 # the owner check
                return self._array(base, [self._info(d) for d in lines])
        info = self._info(self._raw(f"{base}_{task}" if task else base))
        info.id = job_id
        return info

    def _array(self, base: str, tasks: list[JobInfo]) -> JobInfo:
        """An array job as a whole: one state from its tasks' (listed in `reason`)."""
        states: dict[str, int] = {}
        for t in tasks:
            states[t.state] = states.get(t.state, 0) + 1
        order = ("RUNNING", "SUSPENDED", "PENDING", "CANCELLED", "TIMEOUT", "FAILED", "COMPLETED")
        state = next(x for x in order if x in states)
        codes = [t.exit_code for t in tasks if t.exit_code is not None]
        first = tasks[0]
        return JobInfo(id=base, user=first.user, state=state, name=first.name, image=first.image,
                       digest=first.digest, command=first.command, submit_time=first.submit_time,
                       time_limit=first.time_limit, exit_code=max(codes) if codes and state not in ACTIVE else None,
                       reason="tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())), backend="slurm",
                       log="\n".join(t.log for t in sorted(tasks, key=_order) if t.id.partition(".")[2].isdigit()))

    def list(self, all_users: bool = False) -> list[JobInfo]:
        if all_users:
            from nagaya.sched.local import is_admin

            if not is_admin(self.cfg):
                raise PermissionDenied("only administrators may list all users' jobs")
        r = self._run("squeue", "--json")
        if r.returncode != 0:
            raise NagayaError(f"squeue: {r.stderr.strip()}")
        jobs = json.loads(r.stdout).get("jobs", [])
        out = [job_info(j) for j in jobs if all_users or j.get("user_name") == self.me]
        return sorted(out, key=_order)

    # -- control ------------------------------------------------------------------------------------------------
    def _control(self, job_id: str, *argv: str) -> None:
        info = self.status(job_id)              # the owner check
        if info.state not in ACTIVE:
            raise Conflict(f"job {job_id} has already finished ({info.state})")
        tool, *rest = argv
        r = self._run(tool, *rest, job_id.replace(".", "_"))
        if r.returncode != 0:
            msg = r.stderr.strip() or r.stdout.strip()
            if "Access/permission denied" in msg or "Operation not permitted" in msg:
                raise PermissionDenied(f"{tool}: {msg} (suspending jobs is an operator action in Slurm)")
            raise NagayaError(f"{tool}: {msg}")

    def cancel(self, job_id: str) -> None:
        self._control(job_id, "scancel")

    def suspend(self, job_id: str) -> None:
        self._control(job_id, "scontrol", "suspend")

    def resume(self, job_id: str) -> None:
        self._control(job_id, "scontrol", "resume")

    def hold(self, job_id: str) -> None:
        if self.status(job_id).state != "PENDING":
            raise Conflict(f"job {job_id} is not pending: only a pending job can be held")
        self._control(job_id, "scontrol", "uhold")      # a user hold (JobHeldUser): the owner may release it

    def release(self, job_id: str) -> None:
        if self.status(job_id).state != "PENDING":
            raise Conflict(f"job {job_id} is not pending: only a held job can be released")
        self._control(job_id, "scontrol", "release")

    def usage(self, job_id: str) -> list[dict[str, Any]]:
        """One sample from Slurm's accounting: `sstat` for a running job (its steps so far), else `sacct`'s
        totals; CPU time from TRESUsageInTot, memory as the largest step's peak (TRESUsageInMax). [] where
        the site gathers no step accounting (JobAcctGatherType=none) or has no sacct. Each look at a running
        job is kept in the user's own file (sched/usage.py keep): the history, oldest first, is the answer."""
        from nagaya.sched.usage import keep, read

        info = self.status(job_id)              # NotFound for another user's job
        kept = self.cfg.sched_state_dir / "usage" / f"slurm-{info.id}.usage"
        if info.state not in ACTIVE and (history := read(kept)):
            return history                      # ended: what was seen while it ran
        fmt = "--format=JobID,TRESUsageInTot,TRESUsageInMax"
        try:
            if info.state in ACTIVE:
                r = self._run("sstat", "-n", "-P", "-a", "-j", info.id, fmt)
            else:
                r = self._run("sacct", "-n", "-P", "-j", info.id, fmt)
        except (UsageError, OSError, subprocess.TimeoutExpired):
            return []
        if r.returncode != 0:
            return []
        cpu, rss, seen = 0.0, 0, False
        for line in r.stdout.splitlines():
            parts = line.split("|")
            if len(parts) < 3 or "." not in parts[0]:       # steps only: the job's own line repeats them
                continue
            tot, peak = tres(parts[1]), tres(parts[2])
            if "cpu" in tot or "mem" in peak:
                seen = True
                cpu += tot.get("cpu", 0)
                rss = max(rss, int(peak.get("mem", 0)))
        if not seen:
            return []
        return keep(kept, UsageSample(t=time.time(), cpu_seconds=round(cpu, 2), rss_bytes=rss))

    def logs(self, job_id: str, follow: bool = False) -> Iterator[bytes]:
        info = self.status(job_id)
        if info.reason.startswith("tasks: ") and "." not in job_id:    # an array: each task's log in turn
            for t in sorted(self._lines(job_id), key=lambda d: int(d.get("ArrayTaskId", "0").split("-")[0] or 0)):
                if t.get("ArrayTaskId", "").isdigit():
                    yield from self.logs(f"{job_id}.{t['ArrayTaskId']}", follow)
            return
        path = Path(info.log.replace("%j", info.id)) if info.log else None
        pos = 0
        while True:
            state = self.status(job_id).state if follow else ""
            if path is not None:
                try:
                    with open(path, "rb") as f:
                        f.seek(pos)
                        while chunk := f.read(65536):
                            pos += len(chunk)
                            yield chunk
                except FileNotFoundError:
                    pass
            if not follow or state not in ACTIVE:
                return
            time.sleep(0.3)


_MEM_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def tres(text: str) -> dict[str, float]:
    """A TRES usage string (`cpu=00:01:05,mem=1.50M,energy=0`): cpu in seconds, mem in bytes."""
    out: dict[str, float] = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        try:
            if k == "cpu":
                days, _, hms = v.rpartition("-")
                secs = 0.0
                for x in hms.split(":"):
                    secs = secs * 60 + float(x)
                out["cpu"] = int(days or 0) * 86400 + secs
            elif k == "mem":
                num = v.rstrip("KMGTP")
                out["mem"] = float(num) * _MEM_UNITS[v[len(num):]]
        except (ValueError, KeyError):
            continue
    return out
