"""`nagaya reproduce` of a Slurm job (private Slurm 22.05 cluster, unprivileged sched test user): a new job with
the same command and resources, on the digest of the first one although its tag has since moved.
Run under the scheduler suites' lock (flock /tmp/nagaya-sched.lock): the test users are theirs too."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import digest_of, ensure_users, import_images, submit, wait_state

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster().start()
    yield c
    c.stop()


def test_reproduce_a_slurm_job_after_its_tag_moved(cluster: SlurmCluster, rootfs: Path, app_layout: Path) -> None:
    u, _ = ensure_users(("nagaya-s1", 500000), ("nagaya-s2", 700000))
    u = User(u.name, u.uid, u.gid, u.home, {**cluster.env, "NAGAYA_SCHED_BACKEND": "slurm"})
    import_images(u, rootfs, app_layout)
    work = Path(tempfile.mkdtemp(prefix="slurm-rp-", dir=u.home))
    u.chown_tree(work)
    try:
        first = digest_of(u, "bb")
        job = submit(u, "--image", "bb", "--cpus", "2", "--time", "5", "--", "sh", "-c",
                     "echo $NAGAYA_IMAGE_DIGEST", cwd=work)
        info = wait_state(u, job, timeout=60)
        assert info["state"] == "COMPLETED" and info["digest"] == first, info
        # the tag moves on: `bb` now names another image
        assert u.nagaya("image", "import", str(app_layout), "--name", "bb").returncode == 0
        assert digest_of(u, "bb") != first

        r = u.nagaya("reproduce", job, "--dry-run", "--json", cwd=work)
        assert r.returncode == 0, r.stderr
        plan = json.loads(r.stdout)
        assert plan["backend"] == "slurm" and plan["digest"] == first and plan["ref"] == f"bb@{first}"
        assert plan["image_source"] == "cache" and plan["command"] == ["sh", "-c", "echo $NAGAYA_IMAGE_DIGEST"]
        assert plan["resources"]["cpus"] == 2 and plan["resources"]["time_limit"] == 300

        r = u.nagaya("reproduce", job, "--json", cwd=work)
        assert r.returncode == 0, r.stderr
        again = json.loads(r.stdout)["id"]
        info = wait_state(u, again, timeout=60)
        assert info["state"] == "COMPLETED" and info["digest"] == first and info["time_limit"] == 300, info
        assert info["cpus"] == 2
        assert u.nagaya("logs", again).stdout.strip() == first
    finally:
        import_images(u, rootfs, app_layout)          # `bb` back as the other suites expect it
        shutil.rmtree(work, ignore_errors=True)
