"""The job's hosts as Grid Engine ($PE_HOSTFILE) and PBS ($PBS_NODEFILE) write them: the wrapper's rank order
(batchwrap) and compose's view of them (placement), read the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from nagaya.compose import placement
from nagaya.sched.batchwrap import hosts_of_file

PE_HOSTFILE = "nyge2 2 all.q@nyge2 UNDEFINED\nvm 1 all.q@vm UNDEFINED\nnyge1 1 all.q@nyge1 UNDEFINED\n"
PBS_NODEFILE = "n1.cluster\nn1.cluster\nn2.cluster\nn3.cluster\nn2.cluster\n"


def test_hosts_in_the_schedulers_order_once_each() -> None:
    assert hosts_of_file(PE_HOSTFILE) == ["nyge2", "vm", "nyge1"]
    assert hosts_of_file(PBS_NODEFILE) == ["n1.cluster", "n2.cluster", "n3.cluster"]
    assert hosts_of_file("\n\n") == []


@pytest.mark.parametrize(("backend", "var", "text", "nodes", "cpus"), [
    ("gridengine", "PE_HOSTFILE", PE_HOSTFILE, ["nyge2", "vm", "nyge1"], [2, 1, 1]),
    ("pbs", "PBS_NODEFILE", PBS_NODEFILE, ["n1.cluster", "n2.cluster", "n3.cluster"], [2, 2, 1]),
])
def test_compose_reads_the_jobs_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, var: str,
                                      text: str, nodes: list[str], cpus: list[int]) -> None:
    f = tmp_path / "hosts"
    f.write_text(text)
    monkeypatch.setenv(var, str(f))
    monkeypatch.setenv("NAGAYA_BATCH_JOB", f"{backend} 42")
    assert placement.batch_job() == backend
    assert placement.job_nodes(backend) == nodes
    info = placement.node_info(backend, nodes)
    assert [int(info[n].cpus) for n in nodes] == cpus and info[nodes[0]].manager
    assert not info[nodes[1]].manager


def test_no_hostfile_no_batch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAGAYA_BATCH_JOB", "gridengine 42")
    monkeypatch.delenv("PE_HOSTFILE", raising=False)
    assert placement.batch_job() == ""
    monkeypatch.setenv("NAGAYA_BATCH_JOB", "slurm 42")
    assert placement.batch_job() == ""


def test_a_host_named_on_loopback_is_given_its_outward_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "_resolve", lambda n: {"me": "127.0.1.1", "peer": "10.0.0.7"}[n])
    monkeypatch.setattr(placement, "_outward", lambda peers: "10.0.0.2" if peers == ["10.0.0.7"] else None)
    assert placement.node_addrs("gridengine", ["me", "peer"]) == {"me": "10.0.0.2", "peer": "10.0.0.7"}
    assert placement.node_addrs("pbs", ["me"]) == {"me": "127.0.1.1"}       # one host: loopback will do


def test_the_wrappers_job_names_the_containers_record(monkeypatch: pytest.MonkeyPatch) -> None:
    from nagaya.runtime import jobrecord

    for var in ("SLURM_JOB_ID", "NAGAYA_JOB_ID", "NAGAYA_NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NAGAYA_BATCH_JOB", "gridengine 12.3")
    monkeypatch.setenv("NAGAYA_NODE_RANK", "2")
    assert jobrecord.job_key() == ("gridengine", "12.3", "0.2")
    monkeypatch.setenv("NAGAYA_BATCH_JOB", "pbs 7")
    monkeypatch.setenv("NAGAYA_NODE_RANK", "../x")
    assert jobrecord.job_key() == ("pbs", "7", "0.0")
    for bad in ("pbs ../7", "slurm 7", "gridengine 7/8", "pbs"):      # never a name with a path in it
        monkeypatch.setenv("NAGAYA_BATCH_JOB", bad)
        assert jobrecord.job_key() is None, bad
