"""`nagaya job show` and `logs` after slurmctld has forgotten a job: from Slurm's accounting (slurmdbd on a
private MariaDB), as real clusters keep it, still only for the job's owner."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import digest_of, ensure_users, import_images, show, submit, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "slurmdbd", "munged", "sbatch", "sacct", "mariadbd", "mariadb-install-db"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster(nodes=1, accounting=True, min_job_age=2).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def users(cluster: SlurmCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User, Path]]:
    a, b = ensure_users(("nagaya-s1", 500000), ("nagaya-s2", 700000))
    for u in (a, b):
        u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="slurm")
    import_images(a, rootfs, app_layout)
    d = Path(tempfile.mkdtemp(prefix="slurm-acct-", dir=a.home))
    os.chown(d, a.uid, a.gid)
    yield a, b, d
    shutil.rmtree(d, ignore_errors=True)


def test_a_forgotten_job_is_shown_from_accounting(users: tuple[User, User, Path], cluster: SlurmCluster) -> None:
    alice, bob, d = users
    job = submit(alice, "--image", "bb", "--name", "old", "--", "sh", "-c", "echo from the past; exit 3", cwd=d)
    env = {**os.environ, **cluster.env}
    # MinJobAge=2: slurmctld purges the record on its next sweep (about every 10 s here).
    wait_for(lambda: subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True).returncode != 0,
             90, "slurmctld to forget the job", every=0.5)
    info = show(alice, job)
    assert (info["state"], info["exit_code"], info["name"], info["nodes"]) == ("FAILED", 3, "old", "n1"), info
    assert info["digest"] == digest_of(alice, "bb") and info["image"].startswith("bb@"), info
    assert info["start_time"] and info["end_time"], info
    assert "from the past" in alice.nagaya("logs", job).stdout
    # sacct shows every user's jobs unless PrivateData=jobs; nagaya shows each user their own only.
    for args in (("job", "show", job), ("logs", job), ("cancel", job)):
        r = bob.nagaya(*args)
        assert r.returncode != 0 and "not found" in r.stderr, (args, r.stderr)
    r = alice.nagaya("job", "show", "999999")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "not found" in r.stderr
