"""One pull per job: `nagaya submit --nodes 3` of a registry image under image.pull = lazy, on a Slurm cluster
whose nodes live in network namespaces of their own (tests/helpers/slurm.py). The nodes share the user's
cache on the (here: common) file system, so each block of the image's squashfs leaves the registry once for
the whole job: the registry's access log shows every range request once."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.slurm import SUBNET, SlurmCluster
from tests.integration.sched_helpers import wait_state
from tests.integration.site.conftest import Site, SiteUser, ensure_user
from tests.integration.test_lazy_pull import Relay, archive, artifact_squashfs  # noqa: F401 - fixture
from tests.integration.test_registry_client import ACCESS, ok, pushed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "ip", "nsenter"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster(netns=True).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def owner(site: Site) -> SiteUser:
    u = ensure_user("nyl-job", f"pw-nylj-{uuid.uuid4().hex[:8]}")
    u.login(site.server)
    return u


def test_three_node_job_fetches_each_block_once(site: Site, cluster: SlurmCluster, owner: SiteUser,
                                                archive: Path) -> None:  # noqa: F811
    repo = f"{owner.name}/lazyslurm-{uuid.uuid4().hex[:6]}"
    digest = pushed(owner, archive, f"{site.registry}/{repo}:1")
    sq, size = artifact_squashfs(site, owner, repo, digest)
    relay = Relay(site.registry, host=f"{SUBNET}.1")    # the registry as the nodes see it, on the host bridge
    host = f"{SUBNET}.1:{relay.port}"
    auth = json.loads(owner.auth_file.read_text())
    auth["auths"][host] = auth["auths"][site.registry]
    st = owner.auth_file.stat()
    owner.auth_file.write_text(json.dumps(auth))

    os.chown(owner.auth_file, st.st_uid, st.st_gid)
    conf = owner.auth_file.parent / "nagaya.toml"          # this test's own user: a plain-HTTP registry address
    conf.write_text(f'[image]\ninsecure_registries = ["{host}"]\n')
    os.chown(conf, st.st_uid, st.st_gid)
    log = site.state_dir / "logs" / "registry.log"
    off = log.stat().st_size
    env = {**cluster.env, "NAGAYA_SCHED_BACKEND": "slurm", "NAGAYA_IMAGE_PULL": "lazy",
           "XDG_CACHE_HOME": str(owner.u.mkdir(owner.u.home / f"cache-{uuid.uuid4().hex[:8]}"))}
    owner.u.extra_env.update(env)
    try:
        r = ok(owner.nagaya("submit", "--json", "--nodes", "3", "--ntasks", "3", "--image", f"{host}/{repo}:1", "--",
                            "/bin/busybox", "sh", "-c", "md5sum /big; hostname", env=env))
        job = str(json.loads(r.stdout)["id"])
        s = wait_state(owner.u, job, timeout=240)
        logs = owner.nagaya("logs", job, env=env).stdout
        assert s.get("state") == "COMPLETED", (s, logs)
    finally:
        relay.stop()
    sums = {line.split()[0] for line in logs.splitlines() if line.endswith("/big")}
    hosts = {line.strip() for line in logs.splitlines() if line.strip() in cluster.nodes}
    assert len(sums) == 1 and hosts == set(cluster.nodes), logs
    time.sleep(0.5)
    with open(log, "rb") as f:
        f.seek(off)
        hits = [(m.group(1), m.group(2), int(m.group(3))) for m in ACCESS.finditer(f.read().decode(errors="replace"))
                if m.group(2).startswith(f"/v2/{repo}/blobs/{sq}")]
    assert hits and all(code == 206 for _m, _p, code in hits), hits
    assert len(hits) == -(-size // (1 << 20)), (len(hits), size)        # every block once for the whole job
