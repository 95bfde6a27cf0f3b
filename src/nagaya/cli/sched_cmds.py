"""`nagaya submit`, `jobs`, `logs`, `cancel` and `job show|suspend|resume`: batch jobs on a scheduler."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from nagaya import config
from nagaya.cli.common import console, print_json
from nagaya.errors import NagayaError

app = typer.Typer(help="Inspect and control one batch job.", no_args_is_help=True)

BACKEND_OPT = typer.Option(None, "--backend",
                           help="local | slurm | gridengine | pbs (default: [sched] backend in the config)")
SUBMIT_CTX = {"allow_interspersed_args": False, "ignore_unknown_options": True}


def _sched(backend: str | None):
    from nagaya.sched import get_scheduler

    cfg = config.load()
    return cfg, get_scheduler(cfg, backend)


def submit(args: list[str] = typer.Argument(None, metavar="-- CMD [ARGS]... | SCRIPT",
                                             help="the command to run in the image, or a batch script"),
           image: str = typer.Option(None, "--image", "-i", help="image (pinned to its digest now)"),
           nodes: int = typer.Option(None, "--nodes", "-N", min=1),
           ntasks: int = typer.Option(None, "--ntasks", "-n", min=1),
           cpus: int = typer.Option(None, "--cpus", "-c", min=1, help="CPUs per task"),
           mem: str = typer.Option(None, "--mem", help="memory per node, e.g. 500M"),
           gpus: str = typer.Option(None, "--gpus", "-G"),
           time_limit: str = typer.Option(None, "--time", "-t", help="MIN, MIN:SEC, H:MIN:SEC or D-H:MIN:SEC"),
           partition: str = typer.Option(None, "--partition", "-p"),
           name: str = typer.Option(None, "--name", "-J"),
           compose: Path = typer.Option(None, "--compose", help="run this compose file's stack on the job's nodes"),
           array: str = typer.Option(None, "--array", help="task ids, e.g. 1-100%10 (NAGAYA_ARRAY_TASK_ID)"),
           after: str = typer.Option(None, "--after", help="JOB[:ok|:any],...: start once those jobs end"),
           backend: str = BACKEND_OPT,
           json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Submit a batch job that runs CMD in IMAGE (or a script with `#NAGAYA --image REF` lines)."""
    from nagaya.sched.submit import SubmitRequest, submit_job

    out = submit_job(SubmitRequest(args=list(args or []), image=image, nodes=nodes, ntasks=ntasks, cpus=cpus,
                                   mem=mem, gpus=gpus, time_limit=time_limit, partition=partition, name=name,
                                   compose=str(compose) if compose is not None else None, backend=backend,
                                   array=array, after=after))
    if json_out:
        print_json(out)
    else:
        print(f"Submitted batch job {out['id']}")


def jobs(all_users: bool = typer.Option(False, "--all", "-a", help="every user's jobs (administrators)"),
         backend: str = BACKEND_OPT,
         json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List your batch jobs."""
    _cfg, sched = _sched(backend)
    rows = sched.list(all_users)
    if json_out:
        print_json([j.to_json() for j in rows])
        return
    t = Table(box=None, header_style="bold")
    for col in ("JOBID", "USER", "NAME", "STATE", "IMAGE", "NODES", "EXIT", "SUBMITTED"):
        t.add_column(col)
    for j in rows:
        t.add_row(j.id, j.user, j.name, j.state, j.image, j.nodes, "" if j.exit_code is None else str(j.exit_code),
                  j.submit_time.replace("T", " "))
    console.print(t)


def logs(job: str = typer.Argument(..., help="job id"),
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends"),
         backend: str = BACKEND_OPT) -> None:
    """Print a job's output (stdout and stderr)."""
    try:
        _cfg, sched = _sched(backend)
        out = sys.stdout.buffer
        for chunk in sched.logs(job, follow):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def cancel(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT) -> None:
    """Cancel a job: the app gets TERM (time to clean up), then KILL after the grace period."""
    _cfg, sched = _sched(backend)
    sched.cancel(job)


@app.command()
def show(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT,
         json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show a job: state, node(s), image digest, exit code, times."""
    _cfg, sched = _sched(backend)
    info = sched.status(job)
    if json_out:
        print_json(info.to_json())
        return
    for k, v in info.to_json().items():
        if v not in ("", None, []):
            console.print(f"[bold]{k:>12}[/bold]  {' '.join(v) if isinstance(v, list) else v}", highlight=False)


@app.command()
def usage(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT,
          json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """A job's CPU (cores in use), memory and GPUs over time, as sampled while it ran."""
    from nagaya.units import format_size

    _cfg, sched = _sched(backend)
    samples = sched.usage(job)
    if json_out:
        print_json(samples)
        return
    if not samples:
        console.print(f"no usage samples for job {job} (the backend keeps none, or the job has not run yet)")
        return
    t = Table(box=None, header_style="bold")
    gpu_use = any(x.get("gpu_mem_total") for x in samples)          # the GPUs' own figures, where sampled
    for col in ("TIME", "CORES", "CPU-SECONDS", "MEMORY", "PROCESSES", "GPUS", *(("GPU%", "GPU-MEMORY") * gpu_use)):
        t.add_column(col)
    for x in samples:
        t.add_row(time.strftime("%H:%M:%S", time.localtime(x["t"])), f"{x['cpu_cores']:.2f}", f"{x['cpu_seconds']:.1f}",
                  format_size(x["rss_bytes"]), str(x["processes"]), str(x["gpus"]),
                  *((f"{x.get('gpu_util', 0):.0f}", format_size(x.get("gpu_mem_bytes", 0))) * gpu_use))
    console.print(t)


@app.command()
def suspend(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT) -> None:
    """Stop a running job's processes until `nagaya job resume`."""
    _cfg, sched = _sched(backend)
    sched.suspend(job)


@app.command()
def resume(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT) -> None:
    """Continue a suspended job."""
    _cfg, sched = _sched(backend)
    sched.resume(job)


@app.command()
def hold(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT) -> None:
    """Keep a pending job from starting until `nagaya job release` (a user hold, on the scheduler's terms)."""
    _cfg, sched = _sched(backend)
    sched.hold(job)


@app.command()
def release(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT) -> None:
    """Let a held job start again."""
    _cfg, sched = _sched(backend)
    sched.release(job)


EXEC_CTX = {"allow_interspersed_args": True}     # JOB -it --node N -- CMD: options on either side of JOB


@app.command("exec", context_settings=EXEC_CTX)
def exec_(job: str = typer.Argument(..., help="job id"),
          command: list[str] = typer.Argument(None, metavar="-- CMD [ARGS]...", help="what to run in the container"),
          node: str = typer.Option("", "--node", "-w", help="which of the job's nodes (default: the first)"),
          task: str = typer.Option("", "--task", help="which task's container (default: the first on the node)"),
          interactive: bool = typer.Option(False, "--interactive", "-i", help="keep stdin attached"),
          tty: bool = typer.Option(False, "--tty", "-t", help="a terminal (on Slurm: srun --pty)"),
          on_node: bool = typer.Option(False, "--on-node", hidden=True),
          find: bool = typer.Option(False, "--find", hidden=True),
          backend: str = BACKEND_OPT) -> None:
    """Run a command in the running container of one of your jobs (same image, mounts, environment, GPUs and
    namespaces as the job's app)."""
    argv = list(command or [])
    _enter(job, argv[1:] if argv[:1] == ["--"] else argv, node, task, interactive, tty, on_node, find, backend)


@app.command("shell")
def shell(job: str = typer.Argument(..., help="job id"),
          node: str = typer.Option("", "--node", "-w", help="which of the job's nodes (default: the first)"),
          task: str = typer.Option("", "--task", help="which task's container (default: the first on the node)"),
          backend: str = BACKEND_OPT) -> None:
    """An interactive shell in the running container of one of your jobs (`job exec JOB -it -- sh`)."""
    sh = "if command -v bash >/dev/null; then exec bash; else exec sh; fi"
    _enter(job, ["/bin/sh", "-c", sh], node, task, True, sys.stdin.isatty(), False, False, backend)


def _enter(job: str, argv: list[str], node: str, task: str, interactive: bool, tty: bool, on_node: bool,
           find: bool, backend: str | None) -> None:
    from nagaya.sched import interactive as ia

    if on_node:                     # on the job's node, inside a step of the job (Slurm)
        be = backend or "slurm"
        if not all(x.isdigit() for x in job.split(".", 1)):      # ID, or ID.TASK (Grid Engine/PBS arrays)
            raise NagayaError(f"invalid job id {job!r}")
        code = ia.find_on_node(be, job, task) if find else ia.enter_here(be, job, job, task, argv, interactive)
    else:
        code = ia.exec_in_job(config.load(), ia.ExecRequest(job, argv, node, task, interactive, tty, backend))
    raise typer.Exit(code)


@app.command("prepare-node")
def prepare_node() -> None:
    """As root on each Grid Engine or PBS execution host: the per-GPU lock files jobs take their GPUs by."""
    from nagaya.sched.gridengine import prepare_node as prepare

    found = prepare(config.load())
    print(f"GPU locks ready for {len(found)} device(s)")


app.command("cancel")(cancel)
