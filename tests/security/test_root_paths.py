# ruff: noqa: F811  (fixtures imported from tests/security/adversary.py are arguments here)
"""The service account attacks root: every name root touches in the state dir (which the service account
owns) is planted first — symlinks, hard links, FIFOs, swapped directories, forged pid records. Each attack
must change nothing of root's, and maintenance and `site up/down` must still do their work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.users import User
from tests.integration.site.conftest import NAGAYA, Site, daemons, run_root, site_up
from tests.security.adversary import (  # noqa: F401  (fixtures)
    fingerprint,
    no_kernel_link_protection,
    root_file,
    service,
    sh,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def root_tmp() -> Iterator[Path]:
    """Root's files to aim at, in a directory the service account can reach (for links) but not write."""
    d = Path(tempfile.mkdtemp(prefix="nagaya-sec-root-"))
    d.chmod(0o755)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def maintain(site: Site, *args: str) -> subprocess.CompletedProcess:
    return run_root([NAGAYA, "admin", "maintain", "--state-dir", str(site.state_dir), "--json", "--no-gc",
                     "--no-cache-gc", *args], timeout=300)


def test_maintain_lock_planted_as_symlink_or_hard_link(site: Site, service: User, root_tmp: Path) -> None:
    victim = root_file(root_tmp, "shadow-like")
    before = fingerprint(victim)
    lock = site.state_dir / "maintain.lock"
    for plant in (f"ln -sf {victim} {lock}", f"rm -f {lock}; ln {victim} {lock}"):
        r = sh(service, plant)
        assert r.returncode == 0, r.stderr
        r = maintain(site)
        # refused in one line, and root's file is neither chowned nor written
        assert r.returncode != 0 and "maintain.lock" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
        assert fingerprint(victim) == before
    # the service account's own lock again: maintenance runs
    assert sh(service, f"rm -f {lock}").returncode == 0
    r = maintain(site)
    assert r.returncode == 0, r.stderr
    st = lock.lstat()
    assert (st.st_uid, st.st_nlink) == (service.uid, 1)


def test_maintain_lock_as_fifo_does_not_hang(site: Site, service: User) -> None:
    lock = site.state_dir / "maintain.lock"
    assert sh(service, f"rm -f {lock}; mkfifo {lock}").returncode == 0
    try:
        r = maintain(site)                      # O_NONBLOCK + type check: an error at once, not a hang
        assert r.returncode != 0 and "not a regular file" in r.stderr, r
    finally:
        sh(service, f"rm -f {lock}")


def test_job_log_pruning_never_follows_a_swapped_directory(site: Site, service: User, root_tmp: Path) -> None:
    # root's old files, which pruning would delete if it followed the service account's link
    target = root_tmp / "var-log"
    target.mkdir()
    (target / "alice").mkdir()
    old = [root_file(target, "slurm-1.out"), root_file(target / "alice", "slurm-2.out")]
    month_ago = time.time() - 90 * 86400
    for f in old:
        os.utime(f, (month_ago, month_ago))
    logs = site.state_dir / "job-logs"
    r = sh(service, f"rm -rf {logs}; ln -s {target} {logs}")
    assert r.returncode == 0, r.stderr
    try:
        r = maintain(site)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["job_logs"]["removed"] == []
        assert all(f.exists() for f in old)
        # a user directory swapped for a link inside a real job-logs directory: not entered either
        sh(service, f"rm -f {logs}; mkdir -p {logs}; ln -s {target} {logs}/alice")
        r = maintain(site)
        assert r.returncode == 0 and json.loads(r.stdout)["job_logs"]["removed"] == [], r.stderr
        assert all(f.exists() for f in old)
    finally:
        sh(service, f"rm -rf {logs}")


def test_spool_offsets_planted_as_link(site: Site, service: User, root_tmp: Path) -> None:
    """Root reads the spool's offsets file before dropping privileges: a link there is not read or written."""
    secret = root_file(root_tmp, "offsets-target", '{"x": 1}\n')
    before = fingerprint(secret)
    spool = Path(tempfile.mkdtemp(prefix="nagaya-sec-spool-"))
    spool.chmod(0o1777)
    try:
        offsets = site.state_dir / "audit-spool.json"
        assert sh(service, f"ln -sf {secret} {offsets}").returncode == 0
        r = run_root([NAGAYA, "admin", "maintain", "--state-dir", str(site.state_dir), "--json", "--no-gc",
                      "--no-cache-gc"], env={**os.environ, "NAGAYA_AUDIT_SITE_DIR": str(spool)}, timeout=300)
        assert r.returncode == 0, r.stderr
        assert fingerprint(secret) == before
        assert not offsets.is_symlink() and offsets.stat().st_uid == service.uid   # replaced by the service
    finally:
        subprocess.run(["rm", "-rf", str(spool)], check=False)


@pytest.fixture
def own_site(base_dir: Path) -> Iterator[Site]:
    """A site of this test's own: these attacks need `site up/down` runs of their own."""
    d = base_dir / f"sec-site-{os.getpid()}-{time.monotonic_ns()}"
    s = site_up(d)
    yield s
    run_root([NAGAYA, "site", "down", "--state-dir", str(d)])
    for line in daemons(d):
        os.kill(int(line.split()[0]), signal.SIGKILL)


def test_site_files_planted_as_links(own_site: Site, service: User, root_tmp: Path) -> None:
    """`site down/up` (root) write site.json, server.json, registry.yml and the daemons' logs: links planted
    under those names (and the old fixed temp name) are replaced or refused, never written through."""
    victims = {n: root_file(root_tmp, n) for n in ("a", "b", "c", "d", "e")}
    before = {n: fingerprint(p) for n, p in victims.items()}
    sd = own_site.state_dir
    plants = {"site.json.tmp": "a", "server.json.tmp": "b", ".site.json.tmp": "c", "registry.yml": "d"}
    for name, v in plants.items():
        assert sh(service, f"rm -f {sd / name}; ln -s {victims[v]} {sd / name}").returncode == 0
    r = run_root([NAGAYA, "site", "down", "--state-dir", str(sd)])
    assert r.returncode == 0, r.stderr
    assert not daemons(sd)
    assert sh(service, f"ln -sf {victims['e']} {sd / 'site.json'}").returncode == 0
    r = run_root([NAGAYA, "site", "up", "--state-dir", str(sd), "--json"])
    # site.json is a link: read as missing-or-refused, then replaced by a fresh one; the site starts
    assert r.returncode == 0, r.stderr
    assert {n: fingerprint(p) for n, p in victims.items()} == before
    for name in ("site.json", "server.json", "registry.yml"):
        st = (sd / name).lstat()
        assert not (sd / name).is_symlink() and st.st_uid == service.uid, name


def test_site_down_signals_only_its_own_daemons(own_site: Site, service: User) -> None:
    """site.json names the pids root signals; the service account writes it. A root process whose command
    line carries the marker root looks for must survive `site down`."""
    sd = own_site.state_dir
    bait = subprocess.Popen(["bash", "-c", f'exec -a "decoy {sd / "registry.yml"}" sleep 300'],
                            start_new_session=True)
    try:
        time.sleep(0.2)
        data = json.loads((sd / "site.json").read_text())
        data["pids"]["registry"] = bait.pid
        forged = json.dumps(data)
        r = sh(service, f"cat > {sd}/.x && mv {sd}/.x {sd}/site.json", input=forged)
        assert r.returncode == 0, r.stderr
        r = run_root([NAGAYA, "site", "down", "--state-dir", str(sd)])
        assert r.returncode == 0, r.stderr
        assert bait.poll() is None, "root killed a process named in a file the service account wrote"
    finally:
        bait.kill()
        bait.wait()


def test_state_dir_owned_by_another_user_is_refused(base_dir: Path, root_tmp: Path) -> None:
    """root never adopts a state dir that someone else made first (it would chown it and write into it)."""
    nobody = User("nobody", 65534, 65534, Path("/nonexistent"))
    d = base_dir / f"squatted-{os.getpid()}"
    d.mkdir()
    os.chown(d, nobody.uid, nobody.gid)
    r = run_root([NAGAYA, "site", "up", "--state-dir", str(d)])
    assert r.returncode != 0 and "belongs to nobody" in r.stderr, r
    assert d.stat().st_uid == nobody.uid and list(d.iterdir()) == []
