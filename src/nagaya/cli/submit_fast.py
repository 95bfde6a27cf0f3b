"""The lean `nagaya submit`: parses the command line without Typer or Rich (their import costs more than
sbatch itself) and calls the same sched.submit.submit_job as the Typer command. Anything it does not
understand — --help, an unknown option, a bad number — goes to the Typer command instead, so usage
errors and help look the same either way; tests/unit/test_submit_fast.py keeps the two option tables equal."""

from __future__ import annotations

import sys

# option → (SubmitRequest field, kind); kind: str | int | flag
OPTIONS: dict[str, tuple[str, str]] = {
    "--image": ("image", "str"), "-i": ("image", "str"),
    "--nodes": ("nodes", "int"), "-N": ("nodes", "int"),
    "--ntasks": ("ntasks", "int"), "-n": ("ntasks", "int"),
    "--cpus": ("cpus", "int"), "-c": ("cpus", "int"),
    "--mem": ("mem", "str"),
    "--gpus": ("gpus", "str"), "-G": ("gpus", "str"),
    "--time": ("time_limit", "str"), "-t": ("time_limit", "str"),
    "--partition": ("partition", "str"), "-p": ("partition", "str"),
    "--name": ("name", "str"), "-J": ("name", "str"),
    "--compose": ("compose", "str"),
    "--backend": ("backend", "str"),
    "--array": ("array", "str"),
    "--after": ("after", "str"),
    "--json": ("json", "flag"),
}


def parse(argv: list[str]) -> dict[str, object] | None:
    """The options as SubmitRequest fields (plus "json"), or None when Typer should handle this line."""
    out: dict[str, object] = {"args": []}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out["args"] = argv[i + 1:]
            return out
        if not a.startswith("-") or a == "-":
            out["args"] = argv[i:]          # the first argument ends the options, as in the Typer command
            return out
        key, eq, value = a.partition("=") if a.startswith("--") else (a[:2], "", a[2:])
        if key not in OPTIONS:
            return None
        field, kind = OPTIONS[key]
        if kind == "flag":
            if eq or value:
                return None
            out[field] = True
        else:
            if not eq and not value:
                if i + 1 >= len(argv):
                    return None
                i += 1
                value = argv[i]
            if kind == "int":
                if not value.isdigit() or int(value) < 1:
                    return None
                out[field] = int(value)
            else:
                out[field] = value
        i += 1
    return out


def main(argv: list[str]) -> int | None:
    """Exit code, or None to fall back to the Typer command."""
    import os

    # The compiled starter asks for a submit plan (its own was missing or stale); the job never sees the ask.
    want_plan = os.environ.pop("NAGAYA_STARTER_PLAN", "") == "want"
    opts = parse(argv)
    if opts is None:
        return None
    from nagaya.errors import NagayaError
    from nagaya.sched.submit import SubmitRequest, submit_job

    json_out = bool(opts.pop("json", False))
    try:
        out = submit_job(SubmitRequest(**opts), want_plan=want_plan)
    except NagayaError as e:
        sys.stderr.write(f"nagaya: {e.message}\n")
        return e.exit_code
    if json_out:
        import json

        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(f"Submitted batch job {out['id']}\n")
    return 0
