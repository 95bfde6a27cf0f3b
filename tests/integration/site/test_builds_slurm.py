"""A build from the API on Slurm: a site from `nagaya site up` with SLURM_CONF in its environment (the test
cluster's slurm.conf is not in the default place; the root dispatcher passes exactly that on), the users'
backend `slurm` in their own config. Alice's uploaded context becomes a Slurm batch job of hers (sbatch as
Alice, through the dispatcher), built by rootless buildah as her uid on a slurmd, pushed to her project; Bob
sees none of it. The local backend's version of this, with the rest of the builds' doors, is test_builds.py."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.integration.site.conftest import Site, SiteUser
from tests.integration.site.test_apps_slurm import slurm_site, use_slurm
from tests.integration.site.test_builds import _user, api, context_files, log_of, wait_build

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(site_system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "buildah"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    # Nodes on this host's network: the build pushes to the site's registry on 127.0.0.1.
    c = SlurmCluster(nodes=2).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def world(cluster: SlurmCluster) -> Iterator[dict[str, Any]]:
    with slurm_site(cluster) as (site, _):
        people = {"alice": _user("nybs-alice", 1_930_000), "bob": _user("nybs-bob", 1_940_000)}
        for u in people.values():
            u.login(site.server)
            use_slurm(u)
        yield {"site": site, "people": people}


def test_a_build_from_the_api_is_a_slurm_job_of_the_user(cluster: SlurmCluster, world: dict[str, Any]) -> None:
    site: Site = world["site"]
    alice: SiteUser = world["people"]["alice"]
    bob: SiteUser = world["people"]["bob"]
    tag = f"{site.registry}/{alice.name}/hello:1"
    r = api(site, alice, "POST", "/api/builds", files=context_files(),
            data={"tag": tag, "build_args": "GREETING=slurm"})
    assert r.status_code == 201, r.text
    b = r.json()
    # Slurm's job, submitted as Alice: Slurm itself says whose it is.
    show = subprocess.run(["scontrol", "show", "job", b["job"]], capture_output=True, text=True,
                          env={**os.environ, **cluster.env})
    uid = pwd.getpwnam(alice.name).pw_uid
    assert show.returncode == 0 and re.search(rf"UserId={alice.name}\({uid}\)", show.stdout), show.stdout + show.stderr
    assert api(site, bob, "GET", f"/api/builds/{b['id']}").status_code == 404
    done = wait_build(site, alice, b["id"])
    log = log_of(site, alice, b["id"])
    assert done["state"] == "COMPLETED", log[-3000:]
    assert f"as {alice.name} (uid {uid})" in log and "STEP" in log, log[-3000:]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", done["digest"])
    tags = api(site, alice, "GET", f"/api/repositories/{alice.name}/hello/tags")
    assert tags.status_code == 200 and done["digest"] in tags.text
    for method, path in (("GET", f"/api/builds/{b['id']}/log"), ("DELETE", f"/api/builds/{b['id']}")):
        assert api(site, bob, method, path).status_code == 404, (method, path)
