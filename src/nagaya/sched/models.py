"""The typed objects the scheduler parts share: a job's request (JobSpec) and what is known of it (JobInfo)."""

from __future__ import annotations

import shlex
import time
from typing import Any

from nagaya.errors import UsageError
from nagaya.record import Factory, Record

# Slurm's state names; the local backend uses the same ones so scripts need not care which backend ran.
STATES = ("PENDING", "RUNNING", "SUSPENDED", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
ACTIVE = ("PENDING", "RUNNING", "SUSPENDED")


class JobSpec(Record):
    image: str                          # as the user wrote it
    ref: str                            # what runs: NAME@DIGEST
    digest: str
    command: list[str] = Factory(list)  # command form
    script: str = ""                    # script form: the whole script (its #SBATCH lines included)
    script_name: str = ""
    nodes: int = 1
    ntasks: int = 1
    cpus: int = 1                       # per task
    mem: str = ""
    gpus: str = ""
    time_limit: int = 0                 # seconds; 0 = none
    partition: str = ""
    name: str = ""
    cwd: str = ""
    env: dict[str, str] = Factory(dict)
    user: str = ""
    compose: str = ""                   # `submit --compose`: the job runs `nagaya compose up -f` this file
    array: str = ""                     # `submit --array 1-100%10`: task ids 1..100, at most 10 at once
    after: str = ""                     # `submit --after JOB[:ok|:any],...`: start after those jobs end
    build: str = ""                     # a build job (build/remote.py): it runs `nagaya build --recipe` this file


class JobInfo(Record):
    id: str
    user: str
    state: str
    name: str = ""
    image: str = ""
    digest: str = ""
    command: list[str] = Factory(list)
    nodes: str = ""
    exit_code: int | None = None
    submit_time: str = ""
    start_time: str = ""
    end_time: str = ""
    time_limit: int = 0
    cpus: int = 1
    reason: str = ""
    backend: str = ""
    log: str = ""

    def to_json(self) -> dict[str, Any]:
        return self.to_dict()


def iso(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else ""


def parse_time(text: str) -> int:
    """Slurm's --time forms: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN, D-H:MIN:SEC; 0/"" = no limit."""
    t = text.strip()
    if t in ("", "0", "UNLIMITED", "INFINITE", "infinite", "unlimited"):
        return 0
    try:
        days = 0
        if "-" in t:
            d, t = t.split("-", 1)
            days = int(d)
            parts = [int(x) for x in t.split(":")]
            h, m, s = [*parts, 0, 0][:3]
        else:
            parts = [int(x) for x in t.split(":")]
            if len(parts) == 1:
                h, m, s = 0, parts[0], 0
            elif len(parts) == 2:
                h, m, s = 0, parts[0], parts[1]
            elif len(parts) == 3:
                h, m, s = parts
            else:
                raise ValueError
        if min(days, h, m, s) < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"invalid time limit {text!r} (MIN, MIN:SEC, H:MIN:SEC or D-H:MIN:SEC)") from None
    return ((days * 24 + h) * 60 + m) * 60 + s


def parse_after(after: str) -> list[tuple[str, str]]:
    """`submit --after JOB[:ok|:any][,JOB...]` as (id, ok|any); ok is the default, as Slurm's afterok.
    JOB may be an array task, ID.TASK."""
    import re

    out = []
    for item in filter(None, (x.strip() for x in after.split(","))):
        jid, _, kind = item.partition(":")
        if not re.fullmatch(r"\d+(\.\d+)?", jid) or kind not in ("", "ok", "any"):
            raise UsageError(f"invalid --after {item!r} (JOB, JOB:ok or JOB:any)")
        out.append((jid, kind or "ok"))
    return out


def format_time(seconds: int) -> str:
    """The Slurm form of a limit (H:MM:SS); Slurm rounds sub-minute limits up to a minute itself."""
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


# #SBATCH options the local backend honours (the slurm backend hands the lines to sbatch unchanged).
_SBATCH = {"-N": "nodes", "--nodes": "nodes", "-n": "ntasks", "--ntasks": "ntasks", "-c": "cpus",
           "--cpus-per-task": "cpus", "--mem": "mem", "-G": "gpus", "--gpus": "gpus", "-t": "time",
           "--time": "time", "-p": "partition", "--partition": "partition", "-J": "name", "--job-name": "name"}


def _options(words: list[str], table: dict[str, str], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        key, eq, value = w.partition("=")
        if key in table:
            if not eq:
                if i + 1 >= len(words):
                    raise UsageError(f"{where}: {key} needs a value")
                i += 1
                value = words[i]
            out[table[key]] = value
        elif len(w) > 2 and w[0] == "-" and w[1] != "-" and w[:2] in table:   # -c2, -t5
            out[table[w[:2]]] = w[2:]
        i += 1
    return out


def parse_script(text: str, where: str = "script") -> tuple[dict[str, str], dict[str, str]]:
    """Read the directive block at the top of a batch script, as sbatch does (up to the first command).

    Returns (#NAGAYA options, the #SBATCH options the local backend understands)."""
    nagaya: dict[str, str] = {}
    sbatch: dict[str, str] = {}
    for n, line in enumerate(text.splitlines()):
        s = line.strip()
        if n == 0 and s.startswith("#!"):
            continue
        if not s or (s.startswith("#") and not s.startswith(("#NAGAYA", "#SBATCH"))):
            continue
        if not s.startswith("#"):
            break
        try:
            words = shlex.split(s[7:], comments=True)
        except ValueError as e:
            raise UsageError(f"{where}:{n + 1}: {e}") from None
        if s.startswith("#NAGAYA"):
            nagaya.update(_options(words, {"--image": "image", "-i": "image", "--backend": "backend"},
                                   f"{where}:{n + 1}"))
        else:
            sbatch.update(_options(words, _SBATCH, f"{where}:{n + 1}"))
    return nagaya, sbatch


class UsageSample(Record):
    """One reading of a job's resource use (`nagaya job usage`, the portal's charts)."""
    t: float = 0.0                      # seconds since the epoch
    cpu_seconds: float = 0.0            # CPU time used so far (user + system, every process of the job)
    cpu_cores: float = 0.0              # cores in use since the previous sample
    rss_bytes: int = 0                  # resident memory now
    processes: int = 0
    gpus: int = 0                       # GPUs held
    gpu_util: float = 0.0               # their mean utilisation, percent (nvidia-smi), where sampled
    gpu_mem_bytes: int = 0              # their memory in use, all of them together
    gpu_mem_total: int = 0
