"""`nagaya submit`, `jobs`, `logs`, `cancel` and `job show|suspend|resume`: batch jobs on a scheduler."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from nagaya import config
from nagaya.cli.common import console, fail, print_json
from nagaya.errors import NagayaError

app = typer.Typer(help="Inspect and control one batch job.", no_args_is_help=True)

BACKEND_OPT = typer.Option(None, "--backend",
                           help="local | slurm | gridengine (default: [sched] backend in the config)")
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

    try:
        out = submit_job(SubmitRequest(args=list(args or []), image=image, nodes=nodes, ntasks=ntasks, cpus=cpus,
                                       mem=mem, gpus=gpus, time_limit=time_limit, partition=partition, name=name,
                                       compose=str(compose) if compose is not None else None, backend=backend,
                                       array=array, after=after))
    except NagayaError as e:
        fail(e)
    if json_out:
        print_json(out)
    else:
        print(f"Submitted batch job {out['id']}")


def jobs(all_users: bool = typer.Option(False, "--all", "-a", help="every user's jobs (administrators)"),
         backend: str = BACKEND_OPT,
         json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List your batch jobs."""
    try:
        _cfg, sched = _sched(backend)
        rows = sched.list(all_users)
    except NagayaError as e:
        fail(e)
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
    except NagayaError as e:
        fail(e)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def cancel(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT) -> None:
    """Cancel a job: the app gets TERM (time to clean up), then KILL after the grace period."""
    try:
        _cfg, sched = _sched(backend)
        sched.cancel(job)
    except NagayaError as e:
        fail(e)


@app.command()
def show(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT,
         json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Show a job: state, node(s), image digest, exit code, times."""
    try:
        _cfg, sched = _sched(backend)
        info = sched.status(job)
    except NagayaError as e:
        fail(e)
    if json_out:
        print_json(info.to_json())
        return
    for k, v in info.to_json().items():
        if v not in ("", None, []):
            console.print(f"[bold]{k:>12}[/bold]  {' '.join(v) if isinstance(v, list) else v}", highlight=False)


@app.command()
def suspend(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT) -> None:
    """Stop a running job's processes until `nagaya job resume`."""
    try:
        _cfg, sched = _sched(backend)
        sched.suspend(job)
    except NagayaError as e:
        fail(e)


@app.command()
def resume(job: str = typer.Argument(..., help="job id"), backend: str = BACKEND_OPT) -> None:
    """Continue a suspended job."""
    try:
        _cfg, sched = _sched(backend)
        sched.resume(job)
    except NagayaError as e:
        fail(e)


@app.command("prepare-node")
def prepare_node() -> None:
    """As root on each Grid Engine execution host: the per-GPU lock files jobs take their GPUs by."""
    from nagaya.sched.gridengine import prepare_node as prepare

    try:
        found = prepare(config.load())
    except NagayaError as e:
        fail(e)
    print(f"GPU locks ready for {len(found)} device(s)")


app.command("cancel")(cancel)
