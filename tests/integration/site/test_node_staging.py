"""A registry image in a multi-node Slurm job is staged once per node per digest, and the job's tasks on a
node share it: the site registry (`nagaya site up`), a private Slurm cluster (three slurmd), and a
node-local cache per user (`cache_dir = ".../${NODE}-${USER}"`), all driven as an unprivileged user."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.integration.sched_helpers import submit, wait_state
from tests.integration.site.conftest import Site, SiteUser, ensure_user, push

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(site_system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "sbatch"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def node_caches() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-node-caches-"))
    d.chmod(0o1777)                     # like /var/tmp: each user's cache is made there by that user
    yield d
    shutil.rmtree(d, ignore_errors=True)


def blob_gets(site: Site, repo: str, digest: str) -> int:
    """How many times the registry served this blob of this repository to nagaya clients (its access log, a
    line per request; other tests' repositories share the layer, and the server's own scan on push reads the
    layers too, as nagaya-server)."""
    log = (site.state_dir / "logs" / "registry.log").read_text(errors="replace")
    return len(re.findall(rf'"GET /v2/{re.escape(repo)}/blobs/{re.escape(digest)} HTTP[^"]*" \d+ \d+ "[^"]*" "nagaya"',
                          log))


def test_registry_image_is_staged_once_per_node(site: Site, cluster: SlurmCluster, image_archive: Path,
                                                node_caches: Path) -> None:
    who: SiteUser = ensure_user("nys-stage", f"pw-stage-{os.getpid()}")
    who.login(site.server)
    ref = f"{site.registry}/nys-stage/bb:1"
    r = push(who, image_archive, ref, who.creds(site.registry))
    assert r.returncode == 0, r.stderr
    conf = who.u.home / ".config" / "nagaya" / "nagaya.toml"
    conf.write_text(f'[image]\ncache_dir = "{node_caches}/${{NODE}}-${{USER}}"\n')
    os.chown(conf, who.u.uid, who.u.gid)
    work = Path(tempfile.mkdtemp(prefix="staging-", dir=who.u.home))
    os.chown(work, who.u.uid, who.u.gid)
    who.u.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="slurm")
    try:
        first = submit(who.u, "--nodes", "3", "--ntasks", "6", "--image", ref, "--",
                       "/bin/busybox", "sh", "-c", "echo task on $SLURMD_NODENAME", cwd=work)
        info = wait_state(who.u, first, timeout=120)
        out = (work / f"slurm-{first}.out").read_text()
        assert info["state"] == "COMPLETED", out
        nodes = re.findall(r"task on (n\d)", out)
        assert sorted(nodes) == ["n1", "n1", "n2", "n2", "n3", "n3"], out
        digest = info["digest"]
        # The submit host resolved the tag (its own cache); each node then staged the digest once.
        for node in ("n1", "n2", "n3"):
            cache = node_caches / f"{node}-nys-stage"
            assert (cache.stat().st_uid, cache.stat().st_mode & 0o777) == (who.u.uid, 0o700)
            assert [p.name for p in (cache / "images").glob("*.sqfs")] == [digest.split(":")[1] + ".sqfs"]
        manifest = json.loads(who.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                       f"--creds={':'.join(who.creds(site.registry))}", f"docker://{ref}"]).stdout)
        layer = manifest["layers"][0]["digest"]
        # once by the submit host, then once per node
        assert blob_gets(site, "nys-stage/bb", layer) == 4
        # A second job on the same nodes downloads nothing: it runs from each node's cache.
        second = submit(who.u, "--nodes", "3", "--ntasks", "6", "--image", ref, "--", "/bin/busybox", "true",
                        cwd=work)
        assert wait_state(who.u, second, timeout=120)["state"] == "COMPLETED"
        assert blob_gets(site, "nys-stage/bb", layer) == 4
    finally:
        shutil.rmtree(work, ignore_errors=True)
        conf.unlink(missing_ok=True)
