"""The Typer application: every command group but the fast run path (see entry.py)."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from typer.core import TyperGroup

from nagaya import __version__
from nagaya.cli import (
    admin_cmds,
    auth_cmds,
    build_cmds,
    compose_cmds,
    image_cmds,
    project_cmds,
    registry_cmds,
    reproduce_cmd,
    scan_cmds,
    sched_cmds,
    site_cmds,
    token_cmds,
    trust_cmds,
)
from nagaya.cli.common import STATE
from nagaya.errors import NagayaError


class _OneErrorHandler(TyperGroup):
    """Every command's NagayaError ends here: one line on stderr and the error's exit code (--debug: the
    traceback). Commands raise; they don't catch to print."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NagayaError as e:
            if STATE["debug"]:
                raise
            sys.stderr.write(f"nagaya: {e.message}\n")       # one line, never wrapped
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    cls=_OneErrorHandler,
    name="nagaya",
    help="Build, share and run container images on shared servers and HPC clusters, without root.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
image_cmds.app.command("export")(build_cmds.export)
app.add_typer(image_cmds.app, name="image")
app.command("images")(image_cmds.images)
app.command("build")(build_cmds.build)
app.add_typer(site_cmds.app, name="site")
app.command("login")(auth_cmds.login)
app.command("logout")(auth_cmds.logout)
app.add_typer(project_cmds.app, name="project")
app.add_typer(project_cmds.repo_app, name="repo")
app.add_typer(token_cmds.app, name="token")
app.command("pull")(registry_cmds.pull)
app.command("push")(registry_cmds.push)
app.add_typer(registry_cmds.cache_app, name="cache")
app.add_typer(admin_cmds.app, name="admin")
app.command("submit", context_settings=sched_cmds.SUBMIT_CTX)(sched_cmds.submit)
app.command("jobs")(sched_cmds.jobs)
app.command("logs")(sched_cmds.logs)
app.command("cancel")(sched_cmds.cancel)
app.add_typer(sched_cmds.app, name="job")
app.add_typer(compose_cmds.app, name="compose")
app.command("reproduce")(reproduce_cmd.reproduce)
app.add_typer(trust_cmds.app, name="key")
app.command("sign")(trust_cmds.sign)
app.command("verify")(trust_cmds.verify)
image_cmds.app.command("scan")(scan_cmds.scan)
image_cmds.app.command("sbom")(scan_cmds.sbom)
admin_cmds.app.add_typer(scan_cmds.vulndb_app, name="vulndb")

_PASS = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors")) -> None:
    STATE["debug"] = debug


def _fast(cmd: str, ctx: typer.Context) -> None:
    from nagaya.cli.run_cmd import main as run_main

    raise typer.Exit(run_main(cmd, list(ctx.args)))


@app.command(context_settings=_PASS)
def run(ctx: typer.Context) -> None:
    """Run a command in a container image, as yourself (nagaya run --help)."""
    _fast("run", ctx)


@app.command(context_settings=_PASS)
def shell(ctx: typer.Context) -> None:
    """Start an interactive shell in a container image."""
    _fast("shell", ctx)


@app.command("exec", context_settings=_PASS)
def exec_(ctx: typer.Context) -> None:
    """Run a command in an image, ignoring its ENTRYPOINT."""
    _fast("exec", ctx)


@app.command()
def version() -> None:
    """Print nagaya's version."""
    print(__version__)


def main(args: list[str]) -> None:
    app(args=args, prog_name="nagaya")
