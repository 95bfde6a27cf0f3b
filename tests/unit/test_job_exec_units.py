"""The pieces of `job exec` and `run --alloc` that need no container: record names and keys, and the
options `run --alloc` keeps for the allocated run."""

from __future__ import annotations

import pytest

from nagaya.cli.run_cmd import parse_args
from nagaya.runtime import jobrecord


def test_alloc_options_are_not_passed_to_the_allocated_run() -> None:
    a = parse_args("run", ["--alloc", "--cpus", "4", "--mem=8G", "--time", "1:00:00", "--gpus", "2", "-e", "A=1",
                           "--writable-tmpfs", "--scheduler", "slurm", "img", "sh", "-c", "x"])
    assert (a.alloc, a.cpus, a.mem, a.time, a.gpus, a.scheduler) == (True, "4", "8G", "1:00:00", "2", "slurm")
    assert a.passthrough == ["-e", "A=1", "--writable-tmpfs"]
    assert a.image == "img" and a.command == ["sh", "-c", "x"]


@pytest.mark.parametrize("env,key", [
    ({"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3"}, ("slurm", "12", "0.3")),
    ({"SLURM_JOB_ID": "12"}, ("slurm", "12", "batch.0")),
    ({"NAGAYA_JOB_ID": "7"}, ("local", "7", "0.0")),
    ({"SLURM_JOB_ID": "x; rm", "NAGAYA_JOB_ID": "../7"}, None),
    ({"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "../../x"}, None),
    ({"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1/.."}, None),
    ({}, None),
])
def test_job_key(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], key: tuple[str, str, str] | None) -> None:
    for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "NAGAYA_JOB_ID", "SLURMD_NODENAME"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert jobrecord.job_key() == key


def test_slurm_records_are_named_after_slurms_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    assert jobrecord.record_name("slurm", "12", "0.1") == "slurm-12-0.1@n2.json"
    assert jobrecord.record_name("local", "3", "0.0").startswith("local-3-0.0@")
    assert not jobrecord.record_name("local", "3", "0.0").endswith("@n2.json")
