"""Scheduler parsing: Slurm time limits, batch-script directives, scontrol output."""

from __future__ import annotations

import pytest

from nagaya.errors import UsageError
from nagaya.sched.models import format_time, parse_script, parse_time
from nagaya.sched.slurm import _exit_code, _state, parse_scontrol


@pytest.mark.parametrize(("text", "secs"), [("5", 300), ("0:05", 5), ("1:02:03", 3723), ("2-1", 176400),
                                            ("1-0:01", 86460), ("1-0:0:7", 86407), ("", 0), ("UNLIMITED", 0)])
def test_parse_time(text: str, secs: int) -> None:
    assert parse_time(text) == secs


@pytest.mark.parametrize("text", ["x", "1:2:3:4", "-5", "a-1"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_time(text)


def test_format_time() -> None:
    assert format_time(3723) == "1:02:03" and format_time(5) == "0:00:05"


def test_parse_script_reads_the_directive_block_only() -> None:
    nagaya, sbatch = parse_script("#!/bin/bash\n# comment\n#NAGAYA --image reg.example:5000/p/app:1\n"
                                  "#SBATCH -N 2 --time=0:30\n#SBATCH -c4 --job-name 'my job'\n\n"
                                  "echo hi\n#SBATCH --mem=1G\n")
    assert nagaya == {"image": "reg.example:5000/p/app:1"}
    assert sbatch == {"nodes": "2", "time": "0:30", "cpus": "4", "name": "my job"}


def test_scontrol_and_states() -> None:
    d = parse_scontrol("JobId=7 JobName=a b UserId=alice(1001) JobState=CANCELLED Reason=None ExitCode=0:15 "
                       "Comment=nagaya sha256:ab bb@sha256:ab NodeList=n[1-2]")
    assert d["JobName"] == "a b" and d["UserId"] == "alice(1001)" and d["Comment"] == "nagaya sha256:ab bb@sha256:ab"
    assert d["NodeList"] == "n[1-2]" and _exit_code(d["ExitCode"]) == 143 and _exit_code("3:0") == 3
    assert _state("COMPLETING") == "RUNNING" and _state("NODE_FAIL") == "FAILED" and _state("TIMEOUT") == "TIMEOUT"
