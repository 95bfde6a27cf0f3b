"""The wrapper's end() and wait loop (sched/batchwrap.py), run by bash on their own: the job's status is the
first task's even when another ended first, and an ending that arrives while the loop waits (a trap) neither
loses nor changes the task it waits on."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nagaya.sched import batchwrap, pbs

TASK = "trap 'sleep {sleep}; echo {name} cleaned up >> {out}; exit {code}' TERM; while :; do sleep 0.05; done"


def _wrapper(tmp_path: Path, tasks: list[tuple[str, float, int]], signal_after: float) -> tuple[str, str]:
    """A wrapper whose tasks (name, clean-up seconds, exit code) get TERM through end TIMEOUT `signal_after`
    seconds in; returns its .end file and what the tasks' TERM handlers wrote."""
    out, endf = tmp_path / "out", tmp_path / "job.end"
    lines = [f"grace=5; endf={endf}", batchwrap._fill(batchwrap.END, pbs.TERMS)]
    for name, sleep, code in tasks:
        lines += [f"bash -c {TASK.format(sleep=sleep, name=name, out=out, code=code)!r} &", "pids+=($!)"]
    lines += [f"( sleep {signal_after}; kill -ALRM $$ ) &", "trap 'end TIMEOUT' ALRM"]
    lines.append(batchwrap._fill(batchwrap.WAIT, pbs.TERMS))
    subprocess.run(["bash", "-c", "\n".join(lines)], timeout=30, check=False)
    return endf.read_text(), out.read_text() if out.exists() else ""


def test_an_ending_while_waiting_keeps_waiting_on_the_first_task(tmp_path: Path) -> None:
    # the first task cleans up for a second; the second ends at once on TERM: the job waits for the first
    end, out = _wrapper(tmp_path, [("first", 1, 7), ("second", 0, 0)], 0.5)
    assert end.splitlines()[:2] == ["TIMEOUT", "exit 7"], end
    assert sorted(out.splitlines()) == ["first cleaned up", "second cleaned up"], out


def test_a_task_that_ended_first_keeps_its_status(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    endf = tmp_path / "job.end"
    script = "\n".join([f"grace=5; endf={endf}", batchwrap._fill(batchwrap.END, pbs.TERMS),
                        "sleep 1 & pids+=($!)", "( exit 5 ) & pids+=($!)", f"sleep 0.2; : > {out}",
                        batchwrap._fill(batchwrap.WAIT, pbs.TERMS)])
    r = subprocess.run(["bash", "-c", script], timeout=30, check=False)
    assert r.returncode == 5 and endf.read_text().splitlines()[0] == "exit 5"
