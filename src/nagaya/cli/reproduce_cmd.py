"""`nagaya reproduce`: the door to nagaya.reproduce (parse, call, print)."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

import typer

from nagaya import config
from nagaya import reproduce as repro
from nagaya.cli.common import print_json


def reproduce(job: str = typer.Argument(None, help="the job id (as `nagaya submit` printed it)"),
              run: str = typer.Option(None, "--run", help="a `nagaya run` record id (or a prefix) instead of a job"),
              backend: str = typer.Option(None, "--backend", help="only jobs of this backend "
                                                                  "(local | slurm | gridengine | pbs)"),
              here: bool = typer.Option(False, "--here", help="run in the current directory, not the original"),
              list_: bool = typer.Option(False, "--list", help="list the runs and jobs on record, newest last"),
              dry_run: bool = typer.Option(False, "--dry-run", help="say what would run and where the image "
                                                                     "would come from; change nothing"),
              json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Run a past job (JOB) or run (--run ID) again on exactly the same image digest.

    A job is submitted anew with the same command or script, resources and directory.

    A run runs in the foreground with the same command, directory inside, binds and modes.

    The image comes from the cache, the registry (by digest, even if its tag moved) or the site's archive."""
    cfg = config.load()
    if list_:
        _list(repro.history(cfg), json_out)
        return
    r = repro.prepare(cfg, job, run, backend, here, dry_run)
    if dry_run:
        _show(r.plan, json_out)
        return
    if run:
        repro.record(cfg, r.record, r.plan, r.plan["digest"], r.plan["cwd"])
        if json_out:
            print_json(r.plan)
            sys.stdout.flush()
        os.chdir(r.plan["cwd"])
        from nagaya.cli.run_cmd import main as run_main

        raise typer.Exit(run_main("run", r.argv))
    new_id = repro.submit_again(cfg, r)
    if json_out:
        print_json(r.plan)
    else:
        print(f"Submitted batch job {new_id} (job {job} again, on {r.plan['digest'][:19]} "
              f"from the {r.plan['image_source']})")


def _show(plan: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(plan)
        return
    what = shlex.join(plan["run"]) if "run" in plan else \
        f"submit to {plan['backend']}: {shlex.join(plan['command']) or plan['script']} ({plan['resources']})"
    print(f"would run {plan['ref']}\n  image from: {plan['image_source']}\n  in: {plan['cwd']}\n  {what}")


def _list(rows: list[dict[str, Any]], json_out: bool) -> None:
    if json_out:
        print_json([{"kind": "job" if r["action"] == "submit" else "run",
                     "id": str((r.get("details") or {}).get("job")) if r["action"] == "submit" else r.get("id"),
                     "backend": (r.get("details") or {}).get("backend"), "time": r.get("time"),
                     "image": r.get("image"), "digest": r.get("digest"), "command": r.get("command")}
                    for r in rows])
        return
    for r in rows:
        kind = f"job {r['details'].get('job')} ({r['details'].get('backend')})" if r["action"] == "submit" \
            else f"run {r.get('id') or '-'}"
        print(f"{str(r.get('time', ''))[:19]}  {kind:<22} {r.get('image')}  {shlex.join(r.get('command') or [])}")
