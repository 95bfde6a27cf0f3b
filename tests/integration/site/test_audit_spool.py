"""`nagaya run` records reach the site's one audit trail through the site spool, ingested by `nagaya admin
maintain`: attributed to the spool file's owner (never the user a record claims), once (a second run, a lost
offset file, and a `pull` that was also forwarded at once, all add nothing), and found by
`nagaya admin audit --user U --image REF`. Also: maintain shrinks shared node caches to the configured cap
and never removes an image a running container uses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.site.conftest import NAGAYA, Site, SiteUser, module_people, push, run_root
from tests.integration.site.test_lifecycle import archive_with, indexed, ok

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def people(site: Site, site_system: None) -> dict[str, SiteUser]:
    return module_people(site, "sp", ("alice", "bob", "admin"))


@pytest.fixture
def spool() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-spool-"))
    d.chmod(0o1777)                     # like /tmp: everyone creates files of their own, no one removes others'
    yield d
    shutil.rmtree(d, ignore_errors=True)


def maintain(site: Site, env: dict[str, str], *args: str) -> dict:
    r = run_root([NAGAYA, "admin", "maintain", "--state-dir", str(site.state_dir), "--json", "--no-gc", *args],
                 env={**os.environ, **env}, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def trail(admin: SiteUser, *args: str) -> list[dict]:
    return json.loads(ok(admin.nagaya("admin", "audit", "--json", *args)).stdout)


def records(u: SiteUser) -> list[dict]:
    p = u.u.home / ".local" / "share" / "nagaya" / "audit.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def test_runs_reach_the_audit_trail_once(site: Site, people: dict[str, SiteUser], spool: Path,
                                         base_dir: Path) -> None:
    alice, bob, admin = people["alice"], people["bob"], people["admin"]
    env = {"NAGAYA_AUDIT_SITE_DIR": str(spool)}
    ref = f"{site.registry}/{alice.name}/spool-app:1"
    ok(push(alice, archive_with(base_dir, f"spool-{uuid.uuid4().hex[:6]}"), ref, alice.creds(site.registry)))
    digest = indexed(site, admin, f"{alice.name}/spool-app", "1")["digest"]
    ok(alice.nagaya("run", ref, env=env))
    ok(alice.nagaya("run", ref, "/bin/busybox", "true", env=env))
    ok(alice.nagaya("pull", ref, env=env))                       # forwarded at once and spooled
    runs = [r for r in records(alice) if r["action"] == "run"][-2:]
    pulled = [r for r in records(alice) if r["action"] == "pull"][-1]
    assert all(r["digest"] == digest and r["id"] for r in runs)
    # bob forges: a record claiming to be alice's, in his file, and a file named after alice's colleague
    forged = {**runs[0], "id": uuid.uuid4().hex[:12], "user": alice.name, "uid": alice.u.uid}
    ok(bob.run(["sh", "-c", f"cat >> {spool}/{bob.name}.jsonl && cat {spool}/{bob.name}.jsonl > "
                            f"{spool}/nys-sp-carol.jsonl"],
               input=json.dumps(forged) + "\n" + json.dumps({"action": "registry.delete", "image": ref}) + "\n"))
    assert (spool / f"{alice.name}.jsonl").stat().st_uid == alice.u.uid

    rep = maintain(site, env)["audit_spool"]
    assert rep["ingested"] >= 3 and rep["refused"] == 2 and rep["errors"] == [], rep
    rows = trail(admin, "--user", alice.name, "--image", ref, "--action", "cli.run")
    assert sorted(r["details"]["id"] for r in rows) == sorted(r["id"] for r in runs)
    assert all(r["digest"] == digest and r["repository"] == f"{alice.name}/spool-app" and r["tag"] == "1"
               and r["source"].startswith("spool:") for r in rows)
    assert rows[0]["details"]["exit_code"] == 0 and rows[0]["details"]["command"]
    # the forged records are bob's (both files are his), and a server action never enters from a spool
    bobs = trail(admin, "--user", bob.name, "--action", "cli.run")
    assert [r["details"]["id"] for r in bobs].count(forged["id"]) == 1
    assert not trail(admin, "--user", alice.name, "--action", "registry.delete", "--image", ref)
    # the pull was forwarded when it happened: the spooled copy is the same event
    assert [r["details"].get("id") for r in trail(admin, "--user", alice.name, "--action", "cli.pull",
                                                  "--image", ref)].count(pulled["id"]) == 1

    # idempotent: again, and again without the offsets (every record re-read, none added)
    again = maintain(site, env)["audit_spool"]
    assert again["ingested"] == 0 and again["duplicates"] == 0, again
    run_root(["rm", "-f", str(site.state_dir / "audit-spool.json")])
    again = maintain(site, env)["audit_spool"]
    assert again["ingested"] == 0 and again["duplicates"] >= 5, again
    assert len(trail(admin, "--user", alice.name, "--image", ref, "--action", "cli.run")) == 2
    # the human report says the same
    r = run_root([NAGAYA, "admin", "maintain", "--state-dir", str(site.state_dir), "--no-gc", "--dry-run"],
                 env={**os.environ, **env}, timeout=300)
    assert r.returncode == 0 and "audit spool: 0 record(s) to ingest" in r.stdout, r.stderr + r.stdout
    # only what was appended since is read next time
    ok(alice.nagaya("run", ref, "/bin/busybox", "true", env=env))
    again = maintain(site, env)["audit_spool"]
    assert again["ingested"] == 1 and again["duplicates"] == 0, again


def test_maintain_gcs_shared_caches_but_never_an_image_in_use(site: Site, people: dict[str, SiteUser],
                                                              base_dir: Path) -> None:
    alice = people["alice"]
    shared = Path(tempfile.mkdtemp(prefix="nagaya-shared-cache-"))
    try:
        shared.chmod(0o755)
        cache_env = {**os.environ, "NAGAYA_IMAGE_CACHE_DIR": str(shared)}
        for name in ("busy", "idle"):               # the admin fills the site's shared cache
            r = run_root([NAGAYA, "image", "import", str(archive_with(base_dir, f"shared-{name}")), "--name",
                          f"site/{name}:1"], env=cache_env, timeout=300)
            assert r.returncode == 0, r.stderr
        subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
        user_env = {"NAGAYA_IMAGE_SHARED_CACHE_DIRS": str(shared),
                    "XDG_CACHE_HOME": str(alice.u.mkdir(alice.u.home / f"sc-{uuid.uuid4().hex[:6]}"))}
        # a container from the shared cache keeps running (until its stdin closes)
        p = alice.u.popen(["nagaya", "run", "site/busy:1", "/bin/busybox", "sh", "-c", "echo up; cat"],
                          env=user_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert p.stdout is not None and p.stdout.readline() == b"up\n"
            gc_env = {"NAGAYA_IMAGE_SHARED_CACHE_DIRS": str(shared), "NAGAYA_IMAGE_CACHE_MAX_SIZE": "1K"}
            dry = maintain(site, gc_env, "--dry-run")["cache_gc"]
            assert len(dry) == 1 and dry[0]["dry_run"] and len(dry[0]["removed_images"]) == 1
            assert len(list((shared / "images").glob("*.sqfs"))) == 2
            rep = maintain(site, gc_env)["cache_gc"][0]
            assert [i["tags"] for i in rep["removed_images"]] == [["site/idle:1"]], rep
            assert len(rep["kept_in_use"]) == 1
            r = alice.nagaya("run", "site/idle:1", env=user_env)
            assert r.returncode != 0, r.stdout
        finally:
            assert p.stdin is not None
            p.stdin.close()
            assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
        rep = maintain(site, gc_env)["cache_gc"][0]
        assert [i["tags"] for i in rep["removed_images"]] == [["site/busy:1"]] and rep["kept_in_use"] == []
        assert list((shared / "images").glob("*.sqfs")) == []
        # without a cap configured, nothing is touched
        assert maintain(site, {"NAGAYA_IMAGE_SHARED_CACHE_DIRS": str(shared)})["cache_gc"][0]["skipped"]
        # a user's own cache: `nagaya cache gc` applies the configured cap when given no --max-size
        own = {**user_env, "NAGAYA_IMAGE_SHARED_CACHE_DIRS": ""}
        ok(alice.nagaya("image", "import", str(archive_with(base_dir, "own-cache")), "--name", "own:1", env=own))
        r = ok(alice.nagaya("cache", "gc", "--json", env={**own, "NAGAYA_IMAGE_CACHE_MAX_SIZE": "1K"}))
        assert [i["tags"] for i in json.loads(r.stdout)["removed_images"]] == [["own:1"]]
    finally:
        shutil.rmtree(shared, ignore_errors=True)
