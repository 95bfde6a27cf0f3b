"""GPU use over time (sched/usage.py): the job's own GPUs' utilisation and memory from nvidia-smi's CSV, matched
by the driver's minor numbers; a failing or hanging tool is left alone; Slurm's looks kept as a history; the
job page's GPU charts. No GPU is on this machine: a fake nvidia-smi (a script printing known rows, as the real
one prints them for `--query-gpu ... --format=csv,noheader,nounits`) and a fake /proc/driver/nvidia stand in."""

from __future__ import annotations

import time
from pathlib import Path

from nagaya.sched.models import UsageSample
from nagaya.sched.usage import SMI_BACKOFF, GpuReader, Sampler, find_smi, keep, read
from nagaya.server.portal.usage_charts import job_charts

# Three GPUs; nvidia-smi's index order differs from the minor numbers (the driver's /dev/nvidiaN): index 0 is
# minor 2, index 2 is minor 0. Memory in MiB, as nvidia-smi counts.
ROWS = ["0, 00000000:3B:00.0, 91, 30000, 81920", "1, 00000000:5E:00.0, 40, 1024, 81920",
        "2, 00000000:AF:00.0, [N/A], 512, 81920"]
MINORS = {"0000:3b:00.0": 2, "0000:5e:00.0": 1, "0000:af:00.0": 0}


def fake_smi(d: Path, rows: list[str], extra: str = "") -> str:
    d.mkdir(parents=True, exist_ok=True)
    smi = d / "nvidia-smi"
    body = "\n".join(rows)
    smi.write_text(f"#!/bin/sh\n{extra}\n"
                   '[ "$1" = "--query-gpu=index,pci.bus_id,utilization.gpu,memory.used,memory.total" ] || exit 6\n'
                   '[ "$2" = "--format=csv,noheader,nounits" ] || exit 6\n'
                   f"cat <<'EOF'\n{body}\nEOF\n")
    smi.chmod(0o755)
    return str(smi)


def fake_proc(root: Path) -> str:
    for bus, minor in MINORS.items():
        d = root / "proc/driver/nvidia/gpus" / bus
        d.mkdir(parents=True)
        (d / "information").write_text(f"Model: \t\t NVIDIA H100\nIRQ:   \t\t 42\nDevice Minor: \t {minor}\n")
    return str(root)


def test_the_jobs_own_gpus_by_minor_number(tmp_path: Path) -> None:
    smi = fake_smi(tmp_path / "bin", ROWS)
    root = fake_proc(tmp_path / "root")
    # /dev/nvidia2 is nvidia-smi's index 0 (91 %, 30000 MiB); /dev/nvidia1 is index 1 (40 %)
    assert GpuReader([2], smi, root).read(0.0) == (91.0, 30000 << 20, 81920 << 20)
    assert GpuReader([1, 2], smi, root).read(0.0) == (65.5, 31024 << 20, 2 * (81920 << 20))
    # /dev/nvidia0: its utilisation is "[N/A]" (unknown, not 0), its memory is known
    assert GpuReader([0], smi, root).read(0.0) == (0.0, 512 << 20, 81920 << 20)
    # without the driver's /proc files, nvidia-smi's index stands for the minor number
    assert GpuReader([0], smi, str(tmp_path / "none")).read(0.0) == (91.0, 30000 << 20, 81920 << 20)
    # a device the job does not hold is never reported
    assert GpuReader([7], smi, root).read(0.0) is None


def test_a_failing_or_hanging_tool_is_left_alone(tmp_path: Path) -> None:
    broken = GpuReader([0], fake_smi(tmp_path / "a", ROWS, extra="echo 'NVIDIA-SMI has failed' >&2; exit 9"))
    assert broken.read(0.0) is None
    assert broken.retry_at == SMI_BACKOFF                 # not asked again for a minute
    hangs = GpuReader([0], fake_smi(tmp_path / "b", ROWS, extra="exec sleep 30"))
    t0 = time.monotonic()
    assert hangs.read(0.0) is None
    assert time.monotonic() - t0 < 10                     # SMI_TIMEOUT, not the tool's 30 s
    assert GpuReader([0], None).read(0.0) is None         # no nvidia-smi on this node


def test_find_smi_looks_where_gpu_discovery_looks(tmp_path: Path) -> None:
    smi = fake_smi(tmp_path / "drv", ROWS)

    from types import SimpleNamespace

    assert find_smi(SimpleNamespace(path="/nonexistent", bin_dirs=[str(tmp_path / "drv")])) == smi
    assert find_smi(SimpleNamespace(path="/nonexistent", bin_dirs=[])) is None


def test_the_sampler_adds_gpu_figures(tmp_path: Path) -> None:
    import os

    path = tmp_path / "3.usage"
    s = Sampler(os.getpid(), path, gpus=1, interval=0.1, gpu=GpuReader([1], fake_smi(tmp_path / "bin", ROWS),
                                                                         fake_proc(tmp_path / "root")))
    got = s.tick(0.0)
    assert got is not None and (got.gpu_util, got.gpu_mem_bytes, got.gpus) == (40.0, 1024 << 20, 1)
    back = read(path)
    assert back[-1]["gpu_util"] == 40.0 and back[-1]["gpu_mem_total"] == 81920 << 20


def test_slurm_looks_become_a_history(tmp_path: Path) -> None:
    path = tmp_path / "usage" / "slurm-5.usage"
    h = keep(path, UsageSample(t=100.0, cpu_seconds=10.0, rss_bytes=1 << 20))
    assert len(h) == 1
    assert len(keep(path, UsageSample(t=100.5, cpu_seconds=10.2, rss_bytes=1 << 20))) == 1   # too soon: not kept
    h = keep(path, UsageSample(t=110.0, cpu_seconds=30.0, rss_bytes=2 << 20))
    assert [x["t"] for x in h] == [100.0, 110.0] and h[-1]["cpu_cores"] == 2.0
    assert read(path) == h
    assert path.parent.stat().st_mode & 0o077 == 0


def test_the_job_page_charts_gpu_use() -> None:
    samples = [{"t": 0.0, "cpu_cores": 1.0, "rss_bytes": 1 << 30, "gpu_util": 10.0, "gpu_mem_bytes": 1 << 30,
                "gpu_mem_total": 80 << 30},
               {"t": 3.0, "cpu_cores": 1.0, "rss_bytes": 1 << 30, "gpu_util": 95.0, "gpu_mem_bytes": 40 << 30,
                "gpu_mem_total": 80 << 30}]
    charts = {c["label"]: c for c in job_charts(samples)}
    assert charts["GPU utilisation (%)"]["max"] == "100%" and charts["GPU utilisation (%)"]["peak"] == "95%"
    assert charts["GPU memory (in use)"]["max"] == "80.0 GiB"
    # no GPU figures: no GPU charts
    assert len(job_charts([{k: v for k, v in x.items() if not k.startswith("gpu")} for x in samples])) == 2
