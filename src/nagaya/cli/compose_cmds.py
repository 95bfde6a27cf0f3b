"""`nagaya compose up|down|ps|logs`: a multi-service stack inside one allocation (see nagaya.compose)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from nagaya import config
from nagaya.cli.common import console, print_json
from nagaya.errors import Conflict, NagayaError, UsageError

app = typer.Typer(help="Run services together inside a job (a compose-spec subset).", no_args_is_help=True)

FILE_OPT = typer.Option(None, "--file", "-f", help="compose file (default: compose.yaml, compose.yml, "
                                                    "docker-compose.yml in the current directory)")
DEFAULTS = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")


def compose_file(f: Path | None) -> Path:
    if f is not None:
        if not f.is_file():
            raise UsageError(f"{f}: no such file")
        return f
    for name in DEFAULTS:
        if Path(name).is_file():
            return Path(name)
    raise UsageError(f"no compose file here ({', '.join(DEFAULTS)}); give one with -f")


def _state_dir(f: Path | None) -> Path:
    from nagaya.compose.stack import state_dir

    return state_dir(compose_file(f))


@app.command()
def up(file: Path = FILE_OPT,
       detach: bool = typer.Option(False, "--detach", "-d", help="return once every service is up"),
       backend: str = typer.Option(None, "--backend", help="local | slurm (default: slurm in a Slurm job)"),
       build: bool = typer.Option(False, "--build", help="build every service with `build:` first, even if its "
                                                         "image exists"),
       profile: list[str] = typer.Option(None, "--profile", help="enable services of this profile (repeatable; "
                                                                  "also COMPOSE_PROFILES)")) -> None:
    """Start every service (dependencies first) and supervise them; ^C or `compose down` stops them all."""
    from nagaya.compose.spec import load
    from nagaya.compose.stack import Stack, read_state, supervisor_alive

    path = compose_file(file)
    project = load(path, profiles=profile or [])
    d = _state_dir(file)
    if supervisor_alive(read_state(d)):
        raise Conflict(f"{path} is already up (nagaya compose down -f {path} first)")
    if detach:
        raise typer.Exit(_detach(path, d, backend, build, profile or []))
    stack = Stack(project, path, config.load(), backend or "")
    rc = stack.up(build=build)
    if stack.failed:
        sys.stderr.write(f"nagaya: {stack.failed[2]}\n")
    raise typer.Exit(rc)


def _detach(path: Path, d: Path, backend: str | None, build: bool = False, profiles: list[str] | None = None) -> int:
    """Run the supervisor in a session of its own (output in up.log) and wait until the stack is up or failed."""
    from nagaya.compose.stack import proc_start, read_state

    (d / "state.json").unlink(missing_ok=True)
    argv = [sys.argv[0], "compose", "up", "-f", str(path)] + (["--backend", backend] if backend else []) + \
        (["--build"] if build else []) + [a for p in profiles or [] for a in ("--profile", p)]
    with open(d / "up.log", "ab") as log:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    while True:
        st = read_state(d)
        if st and st.get("pid") == p.pid and st["status"] in ("running", "failed", "down"):
            if st["status"] == "failed":
                p.wait()
                raise NagayaError(st["failed"]["message"], p.returncode or 1)
            print(f"{st['project']}: {len(st['replicas'])} replica(s) up")
            return 0
        if p.poll() is not None or (st and st.get("pid") == p.pid and proc_start(p.pid) is None):
            tail = (d / "up.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise NagayaError(f"compose up ended before the stack was up: {tail[0]}", p.returncode or 1)
        time.sleep(0.1)


@app.command()
def down(file: Path = FILE_OPT) -> None:
    """Stop every service of the stack on every node (no process, no mount left)."""
    from nagaya.compose.stack import stop

    if not stop(_state_dir(file)):
        print("nothing is running")


@app.command()
def ps(file: Path = FILE_OPT, json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List the stack's replicas: node, state, health (starting/healthy/unhealthy), exit code, restarts, GPUs."""
    from nagaya.compose.stack import read_state, supervisor_alive

    st = read_state(_state_dir(file))
    if st is None:
        st = {"status": "down", "replicas": []}
    elif not supervisor_alive(st) and st["status"] in ("starting", "running", "stopping"):
        st["status"] = "down"           # the supervisor died without a word (SIGKILL): so did its children
        for r in st["replicas"]:
            r["state"] = "exited" if r["state"] in ("running", "restarting") else r["state"]
    if json_out:
        print_json(st)
        return
    t = Table(box=None, header_style="bold", title=f"{st.get('project', '')} ({st['status']})")
    for col in ("NAME", "SERVICE", "NODE", "STATE", "HEALTH", "EXIT", "RESTARTS", "PORTS", "GPUS"):
        t.add_column(col)
    for r in st["replicas"]:
        t.add_row(r["name"], r["service"], r["node"], r["state"], r["health"],
                  "" if r["exit_code"] is None else str(r["exit_code"]), str(r.get("restarts", 0)),
                  ",".join(map(str, r["ports"])), ",".join(map(str, r.get("gpus") or [])))
    console.print(t)


@app.command()
def logs(service: str = typer.Argument(None, help="only this service's replicas"), file: Path = FILE_OPT) -> None:
    """Print the replicas' output, each line prefixed with the replica's name."""
    from nagaya.compose.stack import read_state

    st = read_state(_state_dir(file))
    if st is None:
        raise UsageError("this stack has never run (nagaya compose up first)")
    reps = [r for r in st["replicas"] if service in (None, r["service"])]
    if service and not reps:
        raise UsageError(f"no service {service!r} in this stack")
    out = sys.stdout
    for r in reps:
        try:
            text = Path(r["log"]).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            out.write(f"{r['name']} | {line}\n")
    out.flush()


def submit_args(compose: Path) -> list[str]:
    """What a job runs for `nagaya submit --compose FILE`: the stack's supervisor, on the batch node."""
    return [os.path.abspath(sys.argv[0]), "compose", "up", "-f", str(compose.resolve())]
