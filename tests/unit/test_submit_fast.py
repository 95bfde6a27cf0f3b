"""The lean `nagaya submit` parser must accept exactly what the Typer command accepts."""

from __future__ import annotations

import typer.main

from nagaya.cli import sched_cmds
from nagaya.cli.submit_fast import OPTIONS, parse


def test_option_table_matches_the_typer_command() -> None:
    cmd = typer.main.get_command_from_info(
        typer.models.CommandInfo(callback=sched_cmds.submit, context_settings=sched_cmds.SUBMIT_CTX),
        pretty_exceptions_short=True, rich_markup_mode=None)
    typer_opts: dict[str, str] = {}
    for p in cmd.params:
        for o in getattr(p, "opts", []):
            if o.startswith("-"):
                typer_opts[o] = p.name or ""
    rename = {"json_out": "json"}
    assert {k: rename.get(v, v) for k, v in typer_opts.items()} == {k: v[0] for k, v in OPTIONS.items()}


def test_parses_options_and_the_command() -> None:
    assert parse(["--image", "bb", "-N2", "--cpus=3", "--json", "--", "echo", "-n", "hi"]) == {
        "args": ["echo", "-n", "hi"], "image": "bb", "nodes": 2, "cpus": 3, "json": True}
    # the first argument ends the options, as in the Typer command (allow_interspersed_args=False)
    assert parse(["-i", "bb", "job.sh", "--nodes", "4"]) == {"args": ["job.sh", "--nodes", "4"], "image": "bb"}
    assert parse([]) == {"args": []}


def test_anything_unusual_goes_to_typer() -> None:
    for argv in (["--help"], ["-h"], ["--image"], ["--nodes", "0"], ["--nodes", "x"], ["--unknown", "1"],
                 ["--json=1"], ["-x"]):
        assert parse(argv) is None, argv
