"""`nagaya submit`, `jobs`, `logs`, `cancel` and `job show|suspend|resume`: batch jobs on a scheduler."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

import typer
from rich.table import Table

from nagaya import audit, config
from nagaya.cli.common import console, fail, print_json
from nagaya.errors import NagayaError, UsageError

app = typer.Typer(help="Inspect and control one batch job.", no_args_is_help=True)

BACKEND_OPT = typer.Option(None, "--backend", help="local | slurm (default: [sched] backend in the config)")
SUBMIT_CTX = {"allow_interspersed_args": False, "ignore_unknown_options": True}


def _sched(backend: str | None):
    from nagaya.sched import get_scheduler

    cfg = config.load()
    return cfg, get_scheduler(cfg, backend)


def _script(args: list[str]) -> tuple[Path, str] | None:
    """The script form: the first argument is a file on this machine that carries #NAGAYA/#SBATCH lines."""
    if not args:
        return None
    p = Path(args[0])
    try:
        if not p.is_file() or p.stat().st_size > 1 << 20:
            return None
        text = p.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    head = [x.strip() for x in text.splitlines()[:200]]
    return (p, text) if any(x.startswith(("#NAGAYA", "#SBATCH")) for x in head) else None


def _compose_check(path: Path, nodes: int) -> str:
    """`submit --compose`: refuse a bad file or an impossible placement now, not once the job starts."""
    from nagaya.compose.placement import place
    from nagaya.compose.spec import load

    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    place(load(path), [f"node{i}" for i in range(1, nodes + 1)])
    return str(path)


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
           backend: str = BACKEND_OPT,
           json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Submit a batch job that runs CMD in IMAGE (or a script with `#NAGAYA --image REF` lines)."""
    from nagaya.sched import JobSpec, parse_script, parse_time, pin_image

    try:
        args = list(args or [])
        script = _script(args)
        directives: dict[str, str] = {}
        sbatch: dict[str, str] = {}
        if script:
            directives, sbatch = parse_script(script[1], str(script[0]))
        image = image or directives.get("image")
        if compose is not None:
            image, args = _compose_check(compose, nodes or 1), []
            ntasks = ntasks or nodes        # one task per node: the replicas' steps overlap it
        if not image:
            raise UsageError("no image: give --image REF (or a `#NAGAYA --image REF` line in the script)")
        if not script and not args and compose is None:
            raise UsageError("nothing to run: nagaya submit --image REF -- CMD [ARGS]...  or  nagaya submit SCRIPT")
        cfg = config.load()
        from nagaya.sched import get_scheduler

        sched = get_scheduler(cfg, backend or directives.get("backend"))
        ref, digest = pin_image(cfg, image) if compose is None else (str(compose.resolve()), "")

        def pick(cli: object, key: str, default: str) -> str:
            return str(cli) if cli is not None else sbatch.get(key, default)

        def num(cli: int | None, key: str) -> int:
            v = pick(cli, key, "1")
            try:
                return max(1, int(v.split("-")[0]))
            except ValueError:
                raise UsageError(f"invalid {key} {v!r}") from None

        me = pwd.getpwuid(os.getuid()).pw_name
        spec = JobSpec(image=image, ref=ref, digest=digest, command=args if not script else [],
                       script=script[1] if script else "", script_name=script[0].name if script else "",
                       nodes=num(nodes, "nodes"), ntasks=num(ntasks, "ntasks"), cpus=num(cpus, "cpus"),
                       mem=pick(mem, "mem", ""), gpus=pick(gpus, "gpus", ""),
                       time_limit=parse_time(pick(time_limit, "time", "")),
                       partition=pick(partition, "partition", cfg.sched.partition),
                       name=pick(name, "name", script[0].name if script else Path(args[0] if args else image).name),
                       cwd=os.getcwd(), env=dict(os.environ), user=me,
                       compose=str(compose.resolve()) if compose is not None else "")
        if script:
            spec.command = args[1:]         # the script's own arguments
        job_id = sched.submit(spec)
        ev = audit.AuditEvent(action="submit", user=me, uid=os.getuid(), image=image, digest=digest,
                              command=spec.command if not script else [str(script[0]), *args[1:]],
                              cwd=spec.cwd, details={"job": job_id, "backend": sched.name,
                                                     "nodes": spec.nodes, "ntasks": spec.ntasks,
                                                     "cpus": spec.cpus, "mem": spec.mem, "gpus": spec.gpus,
                                                     "time_limit": spec.time_limit})
        audit.record(ev, cfg)
        from nagaya.client.site_audit import forward

        forward(ev)
    except NagayaError as e:
        fail(e)
    if json_out:
        print_json({"id": job_id, "backend": sched.name, "image": ref, "digest": digest})
    else:
        print(f"Submitted batch job {job_id}")


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


app.command("cancel")(cancel)
