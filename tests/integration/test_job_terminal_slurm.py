"""The portal's terminal into a running job on Slurm, the dispatcher's side (server/job_terminal.py) on a real
Slurm 22.05 with separate node network namespaces: the user's `job shell` runs on a host-side pty as the user,
becomes an overlapping `srun --pty` step of the job on the job's node (never ssh), and its shell sees the
job's own processes; typing `exit` ends it and leaves no step. The browser's half (the websocket, another
user's job) is tests/e2e/test_job_terminal.py; the attacks on the socket are tests/security/test_job_terminal.py."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nagaya.server.job_terminal import Terminals, frame
from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, import_images, submit, wait_for, wait_state
from tests.security.test_job_terminal import connect_as

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "srun"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster(nodes=2, netns=True).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def people(cluster: SlurmCluster, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User, Path]]:
    alice, svc = ensure_users(("nagaya-jt1", 5200000), ("nagaya-jtsvc", 5300000))
    alice.extra_env.update(cluster.env, NAGAYA_SCHED_BACKEND="slurm")
    import_images(alice, rootfs, app_layout)
    # The terminal runs with a clean environment: Alice's own config says her jobs are Slurm's.
    conf = alice.home / ".config" / "nagaya"
    alice.run(["mkdir", "-p", str(conf)], check=True)
    alice.run(["sh", "-c", f"printf '[sched]\\nbackend = \"slurm\"\\n' > {conf}/nagaya.toml"], check=True)
    d = Path(tempfile.mkdtemp(prefix="slurm-term-", dir=alice.home))
    os.chown(d, alice.uid, alice.gid)
    yield alice, svc, d
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(conf, ignore_errors=True)


def test_a_slurm_jobs_terminal_is_a_step_on_its_node(cluster: SlurmCluster, people: tuple[User, User, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    alice, svc, d = people
    job = submit(alice, "--image", "bb", "--time", "5", "--", "sh", "-c", "echo ready; exec sleep 4321", cwd=d)
    info = wait_state(alice, job, ("RUNNING",), timeout=90)
    wait_for(lambda: "ready" in alice.nagaya("logs", job).stdout, 60, "the job's app to start")
    node = info["nodes"]

    def steps() -> set[str]:
        return set(subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i"], capture_output=True, text=True,
                                  env={**os.environ, **cluster.env}).stdout.split())
    before = steps()                                                      # the batch step and the app's step
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])      # the dispatcher's own setting
    top = Path(tempfile.mkdtemp(prefix="ngt-", dir="/tmp"))
    top.chmod(0o750)
    os.chown(top, 0, svc.gid)
    (top / "spool").mkdir(mode=0o750)
    os.chown(top / "spool", 0, svc.gid)
    fd = os.open(top / "spool", os.O_RDONLY | os.O_DIRECTORY)
    try:
        t = Terminals(fd, top / "spool", svc.uid, svc.gid)
        got = t.start(pwd.getpwnam(alice.name), {"job_id": job, "rows": 30, "cols": 150})
        path, secret = t.path / got["result"]["socket"], got["result"]["secret"]
        typed = frame(b"d", b"echo at=$(hostname) me=$(id -u); ps -o pid,args; exit\r")
        out = connect_as(svc, path, secret.encode() + b"\n" + typed, wait=90).decode(errors="replace")
    finally:
        os.close(fd)
        shutil.rmtree(top, ignore_errors=True)
    assert f"at={node}" in out and f"me={alice.uid}" in out, out          # on the job's node, as Alice
    procs = [x.split(None, 1) for x in out.splitlines() if x.strip()[:1].isdigit()]
    assert any("sleep 4321" in x[-1] for x in procs) and len(procs) < 12, out   # the job's pid namespace
    # The terminal was a step of the job, and it is over: the job's own steps are left.
    wait_for(lambda: steps() == before, 30, f"the terminal's step to end ({steps()} vs {before})")
    assert wait_state(alice, job, ("RUNNING",), timeout=5)
    assert alice.nagaya("cancel", job).returncode == 0
    wait_state(alice, job, timeout=60)
    assert json.loads(alice.nagaya("job", "show", job, "--json").stdout)["state"] == "CANCELLED"
