"""`nagaya job usage` on Slurm, as an unprivileged user: with step accounting gathered (jobacct_gather/linux),
a running job's sample (sstat) shows its CPU time and the memory it holds, each look is kept so the samples
become a curve; another user's job is not found."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, import_images, submit, wait_for, wait_state

pytestmark = pytest.mark.integration

ALLOC = 96 << 20


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "sstat"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    # The later line wins over the helper's jobacct_gather/none: steps are sampled every second.
    c = SlurmCluster(nodes=1, extra_conf="JobAcctGatherType=jobacct_gather/linux\n"
                                         "JobAcctGatherFrequency=task=1\n").start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def users(cluster: SlurmCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User, Path]]:
    a, b = ensure_users(("nagaya-us1", 9000000), ("nagaya-us2", 9100000))
    for u in (a, b):
        u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="slurm")
    import_images(a, rootfs, app_layout)
    d = Path(tempfile.mkdtemp(prefix="slurm-usage-", dir=a.home))
    os.chown(d, a.uid, a.gid)
    yield a, b, d
    shutil.rmtree(d, ignore_errors=True)


def test_sstat_sample_of_a_running_job(users: tuple[User, User, Path]) -> None:
    alice, bob, d = users
    job = submit(alice, "--image", "bb", "--time", "5", "--", "dd", "if=/dev/zero", "of=/dev/null", f"bs={ALLOC}",
                 "count=100000000", cwd=d)
    wait_state(alice, job, ("RUNNING",), timeout=60)

    def sample() -> dict | None:
        r = alice.nagaya("job", "usage", job, "--json")
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        return s[-1] if s and s[-1]["cpu_seconds"] > 0 and s[-1]["rss_bytes"] > ALLOC else None

    s = wait_for(sample, 90, "an sstat sample with CPU time and the allocation", every=2.0)
    assert s["t"] > 0

    # Each look is kept (in Alice's own state dir): the samples become a curve of rising CPU time.
    def curve() -> list[dict] | None:
        r = alice.nagaya("job", "usage", job, "--json")
        h = json.loads(r.stdout) if r.returncode == 0 else []
        return h if len(h) >= 3 and h[-1]["cpu_seconds"] > h[0]["cpu_seconds"] and h[-1]["cpu_cores"] > 0 else None

    history = wait_for(curve, 90, "three kept sstat samples with rising CPU time", every=2.0)
    assert [x["t"] for x in history] == sorted(x["t"] for x in history)
    kept = alice.home / ".local/share/nagaya/jobs/usage" / f"slurm-{job}.usage"
    assert kept.stat().st_uid == alice.uid and kept.stat().st_mode & 0o077 == 0
    r = bob.nagaya("job", "usage", job, "--json")
    assert r.returncode != 0 and "not found" in r.stderr
    assert alice.nagaya("cancel", job).returncode == 0
    wait_state(alice, job, timeout=60)
    after = json.loads(alice.nagaya("job", "usage", job, "--json").stdout)
    assert after[:len(history)] == history                 # ended: the curve seen while it ran
