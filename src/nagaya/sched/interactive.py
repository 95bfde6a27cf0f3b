"""Interactive work on a scheduler: `nagaya job exec|shell` into a running job's container, and
`nagaya run --alloc` (an allocation with the user's terminal attached).
Grid Engine and PBS: see _batch_exec (qrsh -inherit, pbs_attach) and their alloc_argv (qrsh -pty, qsub -I).

`job exec` first asks the scheduler for the job as the caller (another user's job is `not found`, as a
missing one is), then, on the job's node, enters the container its `nagaya run` recorded
(runtime/jobrecord.py, runtime/enter.py). On the local backend that node is this machine; on Slurm the
command runs there as an overlapping step of the job itself (`srun --overlap --jobid J -w NODE`), so the
step is in the job's allocation, cgroup and accounting, and nothing goes around the scheduler.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from nagaya.errors import Conflict, UsageError


class ExecRequest:
    def __init__(self, job: str, argv: list[str], node: str = "", task: str = "", interactive: bool = False,
                 tty: bool = False, backend: str | None = None) -> None:
        self.job, self.argv, self.node, self.task = job, argv, node, task
        self.interactive, self.tty, self.backend = interactive, tty, backend


def _running(info: Any, job: str) -> None:
    if info.state not in ("RUNNING", "SUSPENDED"):
        if info.state == "PENDING":
            raise Conflict(f"job {job} has not started yet (PENDING)")
        raise Conflict(f"job {job} has ended ({info.state}): there is no container to enter")


def exec_in_job(cfg: Any, req: ExecRequest) -> int:
    """Returns the command's exit code (or replaces this process with srun on Slurm)."""
    from nagaya.sched import get_scheduler

    if not req.argv:
        raise UsageError("nothing to run: nagaya job exec JOB -- CMD [ARGS]...")
    if req.task and not req.task.isdigit():
        raise UsageError(f"invalid --task {req.task!r} (a task number)")
    sched = get_scheduler(cfg, req.backend)
    if sched.name == "local":
        import socket

        info = sched.status(req.job)            # this user's own database: anyone else's job is not found
        if info.state not in ("RUNNING", "SUSPENDED", "PENDING"):
            # records left by a run that was killed outright: nothing to enter, ever
            from nagaya.runtime import jobrecord

            for name, _rec in jobrecord.find("local", str(sched.row_id(req.job)), jobrecord.node_name("local")):
                jobrecord.drop(_rec.get("_name", name))
        _running(info, req.job)
        if req.node and req.node not in (socket.gethostname(), os.uname().nodename, "localhost"):
            raise UsageError(f"--node {req.node}: local jobs run on this machine ({socket.gethostname()})")
        if req.task not in ("", "0"):
            raise UsageError("the local backend runs one task per job: --task must be 0")
        row_id = sched.row_id(req.job)          # type: ignore[attr-defined]
        return enter_here("local", str(row_id), req.job, "", req.argv, req.interactive)
    if sched.name == "slurm":
        _slurm_exec(cfg, sched, req)
        return 0                                # not reached: exec'd srun
    if sched.name in ("gridengine", "pbs"):
        _batch_exec(cfg, sched, req)
        return 0                                # not reached: exec'd qrsh / pbs_attach
    raise UsageError(f"nagaya job exec is not available on the {sched.name} backend")


def _batch_exec(cfg: Any, sched: Any, req: ExecRequest) -> None:
    """Grid Engine: the command runs as a task of the job on its host through `qrsh -inherit` (the job's
    parallel environment allows it: control_slaves), like Slurm's overlapping step. PBS: `pbs_attach` makes
    the command a task of the job on the job's own host; PBS has no way to start one from another host
    (pbs_tmrsh needs the job's cookie, which only the job holds), so elsewhere this says where to run it."""
    import shlex
    import socket

    from nagaya.sched.slurm import nagaya_exe

    info = sched.status(req.job)                # the owner check: another user's job is not found
    _running(info, req.job)
    hosts = sched.hosts(req.job)
    if req.node and req.node not in hosts:
        raise UsageError(f"--node {req.node}: job {req.job} runs on {', '.join(hosts)}")
    if req.task and not req.node and int(req.task) >= len(hosts):
        raise UsageError(f"--task {req.task}: job {req.job} has {len(hosts)} task(s), one per host")
    node = req.node or (hosts[int(req.task)] if req.task else hosts[0] if hosts else "")
    if not node:
        raise Conflict(f"job {req.job} has no host yet")
    inner = [nagaya_exe(cfg), "job", "exec", "--on-node", "--backend", sched.name]
    if req.task or len(hosts) > 1:
        inner += ["--task", req.task or str(hosts.index(node))]
    if req.interactive:
        inner.append("-i")
    inner += [req.job, "--", *req.argv]
    if sched.name == "gridengine":
        base, _, task = req.job.partition(".")
        env = {**os.environ, "SGE_ROOT": cfg.sched.sge_root, "SGE_CELL": cfg.sched.sge_cell, "JOB_ID": base}
        env["SGE_TASK_ID"] = task or "undefined"
        argv = [sched._bin("qrsh"), "-inherit"]
        if req.tty:
            argv += ["-pty", "yes"]
        elif not req.interactive:
            argv.append("-nostdin")
        # qrsh joins its arguments with spaces for the remote shell: each one quoted
        sys.stdout.flush()
        os.execve(argv[0], [*argv, node, " ".join(shlex.quote(a) for a in inner)], env)
    here = socket.gethostname().split(".")[0]
    if node.split(".")[0] != here:
        raise UsageError(f"job {req.job} runs on {node}: PBS runs a command inside a job only on the job's "
                         f"own host (pbs_attach), so run this there; this is {here}")
    sys.stdout.flush()
    # -s: a session of its own, which PBS tracks as the task (it signals the whole session at the end)
    os.execv(sched._bin("pbs_attach"), [sched._bin("pbs_attach"), "-j", sched.full_id(req.job), "-s", *inner])


def enter_here(backend: str, job_id: str, shown: str, task: str, argv: list[str], interactive: bool) -> int:
    """On the job's node: the container of `job_id` (task `task`, or the first found)."""
    from nagaya.runtime import enter, jobrecord

    recs = jobrecord.find(backend, job_id, jobrecord.node_name(backend), task or None)
    what = f"job {shown}"
    if not recs:
        raise Conflict(f"{what} has no running container on {jobrecord.node_name(backend)}"
                       + (f" for task {task}" if task else "") + " (not started yet, or ended)")
    name, rec = recs[0]
    try:
        return enter.run_in(rec, argv, what, stdin_null=not interactive,
                            term=os.environ.get("TERM", "") if sys.stdin.isatty() else "")
    except Conflict:
        jobrecord.drop(rec.get("_name", name))  # a record left by a killed run: gone, and say so
        raise


def _slurm_exec(cfg: Any, sched: Any, req: ExecRequest) -> None:
    from nagaya.sched.slurm import nagaya_exe

    base, _, task_of_array = req.job.partition(".")
    raw = sched._raw(f"{base}_{task_of_array}" if task_of_array else base)   # the owner check
    info = sched._info(raw)
    _running(info, req.job)
    job_id = raw.get("JobId", base)
    node = req.node
    nodes = _hostnames(sched, info.nodes)
    if node and node not in nodes:
        raise UsageError(f"--node {node}: job {req.job} runs on {', '.join(nodes)}")
    if not node:
        node = _node_of_task(sched, job_id, req.task, nodes) if req.task else (nodes[0] if nodes else "")
    if not node:
        raise Conflict(f"job {req.job} has no node yet")
    inner = [nagaya_exe(cfg), "job", "exec", "--on-node", "--backend", "slurm"]   # options before JOB
    if req.task:
        inner += ["--task", req.task]
    if req.interactive:
        inner.append("-i")
    inner.append(job_id)
    argv = [sched._bin("srun"), "--overlap", f"--jobid={job_id}", f"--nodelist={node}", "--nodes=1",
            "--ntasks=1", "--quiet"]
    gres = _step_gres(raw, len(nodes))
    if gres:
        # the step's cgroup must allow the job's GPUs too (ConstrainDevices): the same GRES, shared
        argv.append(f"--gres={gres}")
    if req.tty:
        argv.append("--pty")
    elif not req.interactive:
        argv.append("--input=none")
    os.execv(argv[0], [*argv, *inner, "--", *req.argv])


def _step_gres(raw: dict[str, str], nnodes: int) -> str:
    """The job's GPUs per node as a step's --gres (gpu:N), from scontrol's TresPerNode, or TresPerJob on
    one node (Slurm 22.05 writes both as gres:gpu:N, later ones as gres/gpu:N)."""
    tres = raw.get("TresPerNode", "") or (raw.get("TresPerJob", "") if nnodes == 1 else "")
    for item in tres.split(","):
        item = item.replace("gres/", "gres:")
        if item.startswith("gres:gpu"):
            return item.removeprefix("gres:")
    return ""


def _hostnames(sched: Any, nodelist: str) -> list[str]:
    if not nodelist:
        return []
    r = sched._run("scontrol", "show", "hostnames", nodelist)
    return r.stdout.split() if r.returncode == 0 else [nodelist]


def _node_of_task(sched: Any, job_id: str, task: str, nodes: list[str]) -> str:
    """The node holding a task's container: each node is asked (a step of the job) for its records."""
    from nagaya.sched.slurm import nagaya_exe

    r = sched._run("srun", "--overlap", f"--jobid={job_id}", f"--nodes={len(nodes)}",
                   "--ntasks-per-node=1", f"--ntasks={len(nodes)}", "--quiet", "--input=none",
                   nagaya_exe(sched.cfg), "job", "exec", "--on-node", "--find", "--backend", "slurm",
                   "--task", task, job_id, "--", "true")
    found = [x for x in r.stdout.split() if x in nodes]
    if not found:
        raise Conflict(f"job {job_id} has no running container for task {task}")
    return found[0]


def find_on_node(backend: str, job_id: str, task: str) -> int:
    """`--find`: print this node's name if it holds the task's container."""
    from nagaya.runtime import jobrecord

    if jobrecord.find(backend, job_id, jobrecord.node_name(backend), task or None):
        print(jobrecord.node_name(backend))
    return 0


# -- allocations -----------------------------------------------------------------------------------------

def allocate(cfg: Any, ns: Any, shell: bool = False) -> int:
    """`nagaya run --alloc`: the image pinned to its digest (and checked by the site's policy) now, the
    allocation audited, then the container runs in the scheduler's allocation on this terminal."""
    import pwd

    from nagaya import audit
    from nagaya.image.resolve import pin as pin_image
    from nagaya.sched import get_scheduler
    from nagaya.sched.models import JobSpec, parse_time

    sched = get_scheduler(cfg, ns.scheduler or None)
    if sched.name not in ("local", "slurm", "gridengine", "pbs"):
        raise UsageError(f"--alloc is not available on the {sched.name} backend")
    if ns.gpus and sched.name in ("gridengine", "pbs"):
        raise UsageError(f"--alloc --gpus is not available on {sched.name} yet (submit a batch job with --gpus: "
                         "its wrapper takes the node's GPU locks)")
    gpus = ns.gpus
    if gpus and not gpus.isdigit():
        raise UsageError(f"--alloc --gpus {gpus}: give a count (the scheduler picks the devices)")
    try:
        cpus = int(ns.cpus or 1)
    except ValueError:
        raise UsageError(f"invalid --cpus {ns.cpus!r}") from None
    if cpus < 1:
        raise UsageError(f"invalid --cpus {ns.cpus!r}")
    limit = parse_time(ns.time or "")
    ref, digest = pin_image(cfg, ns.image)
    if cfg.image.policy:
        from nagaya.trust.gate import admit

        admit(cfg, ref, digest)
    me = pwd.getpwuid(os.getuid()).pw_name
    command = list(ns.command)
    run = ["shell" if shell else "run", *ns.passthrough]
    spec = JobSpec(image=ns.image, ref=ref, digest=digest, command=command, cpus=cpus, mem=ns.mem, gpus=gpus,
                   time_limit=limit, partition=ns.partition or cfg.sched.partition,
                   name="interactive", cwd=os.getcwd(), env=dict(os.environ), user=me)
    audit.record(audit.AuditEvent(action="alloc", user=me, uid=os.getuid(), image=ns.image, digest=digest,
                                  command=command, cwd=spec.cwd,
                                  details={"backend": sched.name, "cpus": cpus, "mem": ns.mem, "gpus": gpus,
                                           "time_limit": limit, "partition": spec.partition}), cfg)
    if sched.name == "slurm":
        from nagaya.sched.models import format_time
        from nagaya.sched.slurm import comment, nagaya_exe

        argv = [sched._bin("srun"), "--pty", "--quiet", "--job-name=interactive", f"--comment={comment(spec)}",
                "--nodes=1", "--ntasks=1", f"--cpus-per-task={cpus}"]
        for opt, val in (("--mem", ns.mem), ("--gpus", gpus), ("--partition", spec.partition)):
            if val:
                argv.append(f"{opt}={val}")
        if limit:
            argv.append(f"--time={format_time(limit)}")
        inner = [nagaya_exe(cfg), *run, *(["--gpus", "all"] if gpus else []), ref, *command]
        sys.stdout.flush()
        os.execv(argv[0], [*argv, *inner])
    if sched.name in ("gridengine", "pbs"):
        from nagaya.sched.slurm import nagaya_exe

        argv = sched.alloc_argv(spec, [nagaya_exe(cfg), *run, ref, *command])
        sys.stdout.flush()
        os.execve(argv[0], argv, sched.alloc_env())
    from nagaya.sched.local import run_interactive

    if gpus:
        run += ["--gpus", ",".join(str(i) for i in range(int(gpus)))]
    return run_interactive(cfg, spec, run)
