"""`nagaya reproduce`: a past job or run again on exactly its image digest, as the unprivileged user who ran
it — after the tag moved (the old digest comes back from the registry), and after the owner's account
expired and maintenance archived the image and removed it from the registry (it comes back from the
site's archive, through the server, under the project's access rules)."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.integration.sched_helpers import TERMINAL, stop_runner, submit, wait_for, wait_state
from tests.integration.site.conftest import Site, SiteUser, ensure_user, module_people, push, skopeo
from tests.integration.site.test_lifecycle import archive_with, fresh_env, indexed, maintain, ok

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def people(site: Site, site_system: None) -> dict[str, SiteUser]:
    users = module_people(site, "rp", ("user", "other", "admin"))
    yield users
    for u in users.values():
        stop_runner(u.u)


def records(u: SiteUser, action: str) -> list[dict]:
    p = u.u.home / ".local" / "share" / "nagaya" / "audit.jsonl"
    return [r for r in (json.loads(x) for x in p.read_text().splitlines() if x.strip()) if r["action"] == action]


def finished(u: SiteUser, job: str) -> tuple[dict, str]:
    info = wait_state(u.u, job, TERMINAL, timeout=60)
    return info, ok(u.nagaya("logs", job)).stdout


def run_and_submit(u: SiteUser, ref: str) -> tuple[str, str]:
    """One `nagaya run` and one local batch job of `ref`, from a directory of their own: (run id, job id)."""
    work = u.u.mkdir(u.u.home / f"rp-work-{uuid.uuid4().hex[:6]}")
    env = fresh_env(u)
    ok(u.nagaya("run", ref, cwd=work, env=env))
    run_id = records(u, "run")[-1]["id"]
    job = submit(u.u, "--image", ref, "--backend", "local", "--", "/bin/busybox", "cat", "/msg", cwd=work, env=env)
    info, _ = finished(u, job)
    assert info["state"] == "COMPLETED", info
    return run_id, job


def test_reproduce_after_the_tag_moved(site: Site, people: dict[str, SiteUser], base_dir) -> None:
    u, admin = people["user"], people["admin"]
    repo = f"{u.name}/rp-app"
    ref = f"{site.registry}/{repo}:latest"
    creds = u.creds(site.registry)
    ok(push(u, archive_with(base_dir, "rp-one"), ref, creds))
    d1 = indexed(site, admin, repo, "latest")["digest"]
    run_id, job = run_and_submit(u, ref)
    ok(push(u, archive_with(base_dir, "rp-two"), ref, creds))               # the tag moves on
    wait_for(lambda: indexed(site, admin, repo, "latest")["digest"] != d1, 30, "the tag to move")
    assert ok(u.nagaya("run", ref, env=fresh_env(u))).stdout == "rp-two"

    # a dry run says what would happen, and submits nothing
    env = fresh_env(u)
    jobs_before = len(json.loads(ok(u.nagaya("jobs", "--json")).stdout))
    plan = json.loads(ok(u.nagaya("reproduce", job, "--dry-run", "--json", env=env)).stdout)
    assert plan["digest"] == d1 and plan["ref"] == f"{site.registry}/{repo}@{d1}" and plan["backend"] == "local"
    assert plan["command"] == ["/bin/busybox", "cat", "/msg"] and plan["resources"]["cpus"] == 1
    assert plan["image_source"] == "registry, else the site archive" and plan["dry_run"]
    assert len(json.loads(ok(u.nagaya("jobs", "--json")).stdout)) == jobs_before
    assert "would run" in ok(u.nagaya("reproduce", job, "--dry-run", env=env)).stdout

    # the job again: the old digest, by digest from the registry, into an empty cache
    out = json.loads(ok(u.nagaya("reproduce", job, "--json", env=env)).stdout)
    assert out["image_source"] == "registry" and out["digest"] == d1 and out["id"] != job
    info, log = finished(u, out["id"])
    assert info["state"] == "COMPLETED" and info["digest"] == d1 and log == "rp-one"
    # ... and it is a job on record like any other: reproducible in turn
    again = json.loads(ok(u.nagaya("reproduce", out["id"], "--dry-run", "--json", env=env)).stdout)
    assert again["digest"] == d1 and again["image_source"] == "cache"

    # the run again, by a prefix of its id: same command (the image's CMD), same image
    r = ok(u.nagaya("reproduce", "--run", run_id[:8], env=env))
    assert r.stdout == "rp-one"
    assert records(u, "run")[-1]["digest"] == d1 and records(u, "reproduce")[-1]["details"]["reproduces"] == \
        {"run": run_id}

    # bad input: one line, non-zero
    for args, words in ((["999999"], "no record of job 999999"), (["--run", "nope0000"], "no record of run"),
                        ([], "give a JOB id or --run ID")):
        r = u.nagaya("reproduce", *args)
        assert r.returncode != 0 and r.stderr.startswith("nagaya: ") and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    listed = json.loads(ok(u.nagaya("reproduce", "--list", "--json")).stdout)
    assert {"kind": "job", "id": job} in [{k: x[k] for k in ("kind", "id")} for x in listed]


def test_reproduce_an_archived_image(site: Site, people: dict[str, SiteUser], base_dir) -> None:
    admin, other = people["admin"], people["other"]
    leaver = ensure_user("nys-rp-leaver", f"pw-rp-leaver-{os.getpid()}")
    leaver.login(site.server)
    try:
        ref = f"{site.registry}/{leaver.name}/thesis:final"
        ok(push(leaver, archive_with(base_dir, "rp-thesis"), ref, leaver.creds(site.registry)))
        digest = indexed(site, admin, f"{leaver.name}/thesis", "final")["digest"]
        run_id, job = run_and_submit(leaver, ref)

        # the account expires; after the grace period its images are archived and removed from the registry
        now = datetime.now(UTC)
        ok(admin.nagaya("admin", "user", "set", leaver.name, "--expires", (now - timedelta(minutes=1)).isoformat()))
        rep = maintain(site, "--no-gc", "--now", (now + timedelta(days=40)).isoformat())
        mine = [a for a in rep["archived"] if a["project"] == leaver.name]
        assert [(a["tag"], a["removed"]) for a in mine] == [("final", True)]
        assert skopeo(admin, ["inspect", f"docker://{ref}"], admin.creds(site.registry)).returncode != 0
        # the account comes back (a returning student); the registry no longer has the image
        ok(admin.nagaya("admin", "user", "set", leaver.name, "--expires", "never"))
        assert leaver.nagaya("pull", f"{site.registry}/{leaver.name}/thesis@{digest}",
                             env=fresh_env(leaver)).returncode != 0

        # reproduce: from the archive, verified against the recorded digest
        env = fresh_env(leaver)
        out = json.loads(ok(leaver.nagaya("reproduce", job, "--json", env=env)).stdout)
        assert out["image_source"] == "archive" and out["digest"] == digest
        info, log = finished(leaver, out["id"])
        assert info["state"] == "COMPLETED" and info["digest"] == digest and log == "rp-thesis"
        cached = json.loads(ok(leaver.nagaya("cache", "ls", "--json", env=env)).stdout)
        assert [(i["digest"], i["tags"]) for i in cached["images"]] == [(digest, [])]     # by digest, untagged
        r = ok(leaver.nagaya("reproduce", "--run", run_id, env=fresh_env(leaver)))
        assert r.stdout == "rp-thesis"

        # the archive keeps the project's rules: another user learns nothing
        hits = httpx.get(f"{site.server}/api/archive", params={"digest": digest}, timeout=30,
                         auth=leaver.creds(site.registry)).json()
        assert [h["repository"] for h in hits] == [f"{leaver.name}/thesis"]
        r = httpx.get(f"{site.server}/api/archive", params={"digest": digest}, auth=other.creds(site.registry),
                      timeout=30)
        assert r.status_code == 200 and r.json() == []
        r = httpx.get(f"{site.server}{hits[0]['url']}", auth=other.creds(site.registry), timeout=30)
        assert r.status_code == 404
        assert httpx.get(f"{site.server}{hits[0]['url']}", timeout=30).status_code in (401, 404)
    finally:
        ok(admin.nagaya("admin", "user", "set", leaver.name, "--expires", "never"))
        stop_runner(leaver.u)
