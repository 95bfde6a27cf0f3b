# ruff: noqa: F811  (fixtures imported from tests/security/adversary.py are arguments here)
"""One user attacks another through names derived from the victim's user name in shared places: a node-local
image cache (`/var/tmp/nagaya-${USER}`), the site's audit spool (`SITE_DIR/USER.jsonl`), a shared cache any
account can write, an overlay directory. Each attack must fail, and the victim's own work must still go on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import images
from tests.integration.site.conftest import NAGAYA, Site, SiteUser, run_root
from tests.security.adversary import actors, no_kernel_link_protection, sh  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shared_place() -> Iterator[Path]:
    """Like /var/tmp on a node: sticky, world-writable, root's."""
    d = Path(tempfile.mkdtemp(prefix="nagaya-sec-vartmp-"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def two_images(base_dir: Path) -> tuple[Path, Path]:
    """Two one-layer OCI archives: the victim's honest image and the attacker's trojan (which says so)."""
    out = []
    for name, text in (("honest", b"honest\n"), ("trojan", b"TROJAN\n")):
        layer = images.tar_bytes([images.entry("bin/", "dir"),
                                  images.entry("bin/busybox", "file", Path("/bin/busybox").read_bytes(), mode=0o755),
                                  images.entry("who.txt", "file", text)])
        layout = images.oci_layout(base_dir / f"sec-{name}-layout", [layer],
                                   {"Cmd": ["/bin/busybox", "cat", "/who.txt"]})
        arch = images.oci_archive(layout, base_dir / f"sec-{name}.tar")
        subprocess.run(["chmod", "-R", "a+rX", str(layout), str(arch)], check=True)
        out.append(arch)
    return out[0], out[1]


def node_cache_conf(u: SiteUser, place: Path) -> dict[str, str]:
    """The README's node-cache setting, through the environment (same as the config key)."""
    return {"NAGAYA_IMAGE_CACHE_DIR": f"{place}/nagaya-${{USER}}"}


def test_squatted_node_cache_is_refused_on_every_path(actors: dict[str, SiteUser], shared_place: Path,
                                                      two_images: tuple[Path, Path]) -> None:
    victim, attacker = actors["victim"], actors["attacker"]
    honest, trojan = two_images
    squat = shared_place / f"nagaya-{victim.name}"
    # The attacker makes the victim's cache directory first and puts a trojan under the victim's tag there.
    r = attacker.nagaya("image", "import", str(trojan), "--name", "tools:1", env={"NAGAYA_IMAGE_CACHE_DIR": str(squat)})
    assert r.returncode == 0, r.stderr
    sh(attacker.u, f"chmod 0755 {squat}")
    env = node_cache_conf(victim, shared_place)
    for args in (["run", "tools:1"], ["run", "tools:1", "/bin/busybox", "true"], ["images"],
                 ["image", "import", str(honest), "--name", "tools:1"], ["image", "inspect", "tools:1"]):
        r = victim.nagaya(*args, env=env)
        assert r.returncode != 0, (args, r.stdout)
        assert "TROJAN" not in r.stdout
        assert f"image cache {squat}" in r.stderr and "not a directory owned by you" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # Variants: the name as a link to the attacker's cache, and a world-writable directory of the attacker's.
    shutil.rmtree(squat)
    own = shared_place / f"own-{attacker.name}"
    r = attacker.nagaya("image", "import", str(trojan), "--name", "tools:1", env={"NAGAYA_IMAGE_CACHE_DIR": str(own)})
    assert r.returncode == 0, r.stderr
    sh(attacker.u, f"ln -s {own} {squat}")
    r = victim.nagaya("run", "tools:1", env=env)
    assert r.returncode != 0 and "TROJAN" not in r.stdout and "symbolic link" in r.stderr, r.stderr
    sh(attacker.u, f"rm {squat} && mkdir -m 0777 {squat}")
    r = victim.nagaya("image", "import", str(honest), "--name", "tools:1", env=env)
    assert r.returncode != 0 and "not a directory owned by you" in r.stderr, r.stderr
    # Once the squat is gone (an admin removes it), the victim's own cache works and is the victim's alone.
    shutil.rmtree(squat)
    r = victim.nagaya("image", "import", str(honest), "--name", "tools:1", env=env)
    assert r.returncode == 0, r.stderr
    r = victim.nagaya("run", "tools:1", env=env)
    assert r.returncode == 0 and r.stdout == "honest\n", r.stderr
    st = squat.lstat()
    assert (st.st_uid, st.st_mode & 0o777) == (victim.u.uid, 0o700)


def test_a_shared_cache_others_can_write_is_not_used(actors: dict[str, SiteUser], shared_place: Path,
                                                     two_images: tuple[Path, Path]) -> None:
    victim, attacker = actors["victim"], actors["attacker"]
    honest, trojan = two_images
    shared = shared_place / f"site-cache-{uuid.uuid4().hex[:6]}"
    r = run_root([NAGAYA, "image", "import", str(honest), "--name", "site/tools:1"],
                 env={**os.environ, "NAGAYA_IMAGE_CACHE_DIR": str(shared)})
    assert r.returncode == 0, r.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
    env = {"NAGAYA_IMAGE_SHARED_CACHE_DIRS": str(shared),
           "XDG_CACHE_HOME": str(victim.u.mkdir(victim.u.home / f"c-{uuid.uuid4().hex[:6]}"))}
    r = victim.nagaya("run", "site/tools:1", env=env)
    assert r.returncode == 0 and r.stdout == "honest\n", r.stderr
    # An admin's slip: the shared cache's refs become world-writable, and the attacker retags a trojan there.
    os.chmod(shared / "refs", 0o777)
    os.chmod(shared, 0o777)
    attacker.nagaya("image", "import", str(trojan), "--name", "site/tools:1",
                    env={"NAGAYA_IMAGE_CACHE_DIR": str(shared)})
    r = victim.nagaya("run", "site/tools:1", env=env)
    assert "TROJAN" not in r.stdout
    assert r.returncode != 0 and f"shared image cache {shared} skipped" in r.stderr, r.stderr


def test_overlay_dir_on_a_path_another_user_controls(actors: dict[str, SiteUser], shared_place: Path,
                                                     two_images: tuple[Path, Path]) -> None:
    victim, attacker = actors["victim"], actors["attacker"]
    env = {"XDG_CACHE_HOME": str(victim.u.mkdir(victim.u.home / f"c-{uuid.uuid4().hex[:6]}"))}
    r = victim.nagaya("image", "import", str(two_images[0]), "--name", "ov:1", env=env)
    assert r.returncode == 0, r.stderr
    # the attacker's directory, with a directory of the victim's inside it (which the attacker can swap)
    adir = shared_place / f"att-{uuid.uuid4().hex[:6]}"
    sh(attacker.u, f"mkdir -m 0777 {adir}")
    sh(victim.u, f"mkdir -m 0700 {adir}/ov")
    r = victim.nagaya("run", "--overlay", f"{adir}/ov", "ov:1", "/bin/busybox", "true", env=env)
    assert r.returncode != 0 and "not yours alone" in r.stderr, r.stderr
    mine = victim.u.mkdir(victim.u.home / f"ov-{uuid.uuid4().hex[:6]}")
    r = victim.nagaya("run", "--overlay", str(mine), "ov:1", "/bin/busybox", "sh", "-c", "echo kept > /k", env=env)
    assert r.returncode == 0, r.stderr


# ---- the audit spool ----------------------------------------------------------------------------------------

@pytest.fixture
def spool() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-sec-spool-"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def victim_records(spool: Path, victim: SiteUser) -> list[dict]:
    out = []
    for f in spool.iterdir():
        st = f.lstat()
        if f.is_file() and not f.is_symlink() and st.st_uid == victim.u.uid:
            out += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return out


def test_spool_names_taken_first_get_nothing_of_the_victims(site: Site, actors: dict[str, SiteUser], spool: Path,
                                                           two_images: tuple[Path, Path]) -> None:
    victim, attacker, admin = actors["victim"], actors["attacker"], actors["admin"]
    cache = {"XDG_CACHE_HOME": str(victim.u.mkdir(victim.u.home / f"c-{uuid.uuid4().hex[:6]}"))}
    env = {"NAGAYA_AUDIT_SITE_DIR": str(spool), **cache}
    r = victim.nagaya("image", "import", str(two_images[0]), "--name", "sp:1", env=cache)
    assert r.returncode == 0, r.stderr
    target = victim.u.home / f"notes-{uuid.uuid4().hex[:6]}.txt"      # a file the victim can write
    sh(victim.u, f"echo 'my notes' > {target}")
    # the attacker takes both of the victim's names: a file of the attacker's, and a link to the victim's file
    r = sh(attacker.u, f"touch {spool}/{victim.name}.jsonl && chmod 0666 {spool}/{victim.name}.jsonl && "
                       f"ln -s {target} {spool}/{victim.name}.1.jsonl")
    assert r.returncode == 0, r.stderr
    secret = f"--password=hunter{uuid.uuid4().hex[:6]}"
    r = victim.nagaya("run", "sp:1", "/bin/busybox", "echo", secret, env=env)
    assert r.returncode == 0, r.stderr
    assert secret not in (spool / f"{victim.name}.jsonl").read_text()
    assert target.read_text() == "my notes\n"
    recs = victim_records(spool, victim)
    assert [x["command"][-1] for x in recs if x["action"] == "run"] == [secret]
    # maintenance attributes it to the victim, and the attacker's file brings nothing of the victim's
    r = run_root([NAGAYA, "admin", "maintain", "--state-dir", str(site.state_dir), "--json", "--no-gc",
                  "--no-cache-gc"], env={**os.environ, **env}, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(admin.nagaya("admin", "audit", "--json", "--action", "cli.run", "--user", victim.name).stdout)
    assert any(secret in json.dumps(x) for x in rows), rows
    rows = json.loads(admin.nagaya("admin", "audit", "--json", "--action", "cli.run", "--user", attacker.name).stdout)
    assert not any(secret in json.dumps(x) for x in rows)


def test_a_fifo_in_the_spool_never_hangs_the_victims_run(actors: dict[str, SiteUser], spool: Path,
                                                        two_images: tuple[Path, Path]) -> None:
    victim, attacker = actors["victim"], actors["attacker"]
    cache = {"XDG_CACHE_HOME": str(victim.u.mkdir(victim.u.home / f"c-{uuid.uuid4().hex[:6]}"))}
    env = {"NAGAYA_AUDIT_SITE_DIR": str(spool), **cache}
    r = victim.nagaya("image", "import", str(two_images[0]), "--name", "ff:1", env=cache)
    assert r.returncode == 0, r.stderr
    fifo = spool / f"{victim.name}.jsonl"
    assert sh(attacker.u, f"mkfifo -m 0666 {fifo}").returncode == 0
    # with no reader (open would block), and with the attacker reading it (open would succeed: a write
    # would hand the record over)
    reader = None
    for with_reader in (False, True):
        if with_reader:
            reader = attacker.u.popen(["sh", "-c", f"cat {fifo} > /dev/null"])
            time.sleep(0.3)
        start = time.monotonic()
        r = victim.nagaya("run", "ff:1", "/bin/busybox", "echo", f"ok-{with_reader}", env=env, timeout=30)
        assert r.returncode == 0 and r.stdout == f"ok-{with_reader}\n", r.stderr
        assert time.monotonic() - start < 10
    assert reader is not None
    reader.kill()
    reader.wait()
    assert [x["command"][-1] for x in victim_records(spool, victim)] == ["ok-False", "ok-True"]


def test_a_squatted_staging_name_in_tmp_is_passed_over(actors: dict[str, SiteUser], two_images: tuple[Path, Path]
                                                       ) -> None:
    """Without the site's staging directory, runs stage in /tmp/.nagaya-UID: a link planted there (to the
    victim's home, which a tmpfs would then hide inside the container) is passed over for a fresh name."""
    victim, attacker = actors["victim"], actors["attacker"]
    cache = {"XDG_CACHE_HOME": str(victim.u.mkdir(victim.u.home / f"c-{uuid.uuid4().hex[:6]}"))}
    r = victim.nagaya("image", "import", str(two_images[0]), "--name", "st:1", env=cache)
    assert r.returncode == 0, r.stderr
    marker = victim.u.home / f"marker-{uuid.uuid4().hex[:6]}"
    sh(victim.u, f"echo mine > {marker}")
    name = Path(f"/tmp/.nagaya-{victim.u.uid}")
    subprocess.run(["rm", "-rf", str(name)], check=False)
    assert sh(attacker.u, f"ln -s {victim.u.home} {name}").returncode == 0
    try:
        env = {**cache, "NAGAYA_RUNTIME_STAGING_DIR": "/nonexistent/nagaya-mnt"}
        r = victim.nagaya("run", "st:1", "/bin/busybox", "cat", str(marker), env=env)
        assert r.returncode == 0 and r.stdout == "mine\n", r.stderr
        assert marker.read_text() == "mine\n" and name.is_symlink()
    finally:
        name.unlink(missing_ok=True)
        for p in Path("/tmp").glob(f".nagaya-{victim.u.uid}-*"):
            p.rmdir()
