"""GPU use over time on the local backend, as an unprivileged user: a job holding one GPU gets that GPU's
utilisation and memory in its usage samples, and only that GPU's. No GPU is on this machine: fake NVIDIA
devices (tests/helpers/fake_gpu.py: /dev/nvidiaN nodes, the node's GPU locks) and a fake nvidia-smi that
prints known `--query-gpu` rows per device (a different figure per GPU, so the right one is seen) stand in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.users import User
from tests.integration.sched_helpers import (
    ensure_users,
    import_images,
    job_processes,
    reset_user,
    stop_runner,
    submit,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.integration

ROOT = Path("/tmp/nagaya-usage-gpu")
# index, bus id, utilisation %, memory used MiB, memory total MiB: GPU 0 at 17 %, GPU 1 at 83 %
SMI = """#!/bin/sh
[ "$1" = "--query-gpu=index,pci.bus_id,utilization.gpu,memory.used,memory.total" ] || exit 6
echo "0, 00000000:3B:00.0, 17, 2048, 16384"
echo "1, 00000000:5E:00.0, 83, 12288, 16384"
"""
FIGURES = {"nvidia0": (17.0, 2048 << 20), "nvidia1": (83.0, 12288 << 20)}


@pytest.fixture(scope="module")
def alice(system: None, rootfs: Path, app_layout: Path) -> Iterator[User]:
    from tests.helpers.fake_gpu import fake_gpus, gpu_locks

    env = gpu_locks(fake_gpus(ROOT, 2), ROOT)
    smi_dir = ROOT / "smi"
    smi_dir.mkdir(mode=0o755)
    (smi_dir / "nvidia-smi").write_text(SMI)
    (smi_dir / "nvidia-smi").chmod(0o755)
    u, _ = ensure_users(("nagaya-ug1", 9200000), ("nagaya-ug2", 9300000))
    # the CSV tool first on the GPU search path (discovery passes over a script and binds the fake ELF one)
    u.extra_env.update(env, NAGAYA_GPU_PATH=f"{smi_dir}:/usr/local/bin:/usr/bin:/bin",
                       NAGAYA_SCHED_BACKEND="local", NAGAYA_SCHED_KILL_GRACE="2", NAGAYA_SCHED_IDLE_EXIT="20")
    reset_user(u)
    import_images(u, rootfs, app_layout)
    yield u
    r = u.nagaya("jobs", "--json")
    for j in json.loads(r.stdout or "[]"):
        if j["state"] in ("PENDING", "RUNNING", "SUSPENDED"):
            u.nagaya("cancel", j["id"])
    wait_for(lambda: not job_processes(u), 15, "jobs to end")
    stop_runner(u)


def test_a_gpu_jobs_samples_carry_its_own_gpus_use(alice: User) -> None:
    job = submit(alice, "--gpus", "1", "--image", "bb", "--", "sh", "-c",
                 "echo devices $(ls /dev | grep 'nvidia[0-9]'); sleep 60")
    wait_state(alice, job, ("RUNNING",), timeout=60)
    log = alice.home / ".local/share/nagaya/jobs/logs" / f"{job}.out"
    line = wait_for(lambda: next((x for x in alice.run(["cat", str(log)]).stdout.splitlines()
                                  if x.startswith("devices")), None), 60, "the job to name its GPU")
    held = line.split()[1:]
    assert len(held) == 1 and held[0] in FIGURES, line
    util, mem = FIGURES[held[0]]

    def sampled() -> list[dict] | None:
        r = alice.nagaya("job", "usage", job, "--json")
        assert r.returncode == 0, r.stderr
        s = [x for x in json.loads(r.stdout) if x.get("gpu_mem_total")]
        return s if len(s) >= 2 else None

    samples = wait_for(sampled, 60, "two samples with GPU figures", every=1.0)
    assert all(x["gpus"] == 1 and x["gpu_util"] == util and x["gpu_mem_bytes"] == mem and
               x["gpu_mem_total"] == 16384 << 20 for x in samples), samples
    table = alice.nagaya("job", "usage", job)                            # the table for people
    assert table.returncode == 0 and "GPU%" in table.stdout and f" {util:.0f} " in table.stdout, table.stdout
    assert alice.nagaya("cancel", job).returncode == 0
    wait_state(alice, job, timeout=60)
