"""Site lifecycle against the real site: the one audit trail (`nagaya admin audit`, CLI events reaching the
server), per-project storage quotas enforced by the token service (skopeo and `nagaya push`), immutable tags,
retention and registry garbage collection (`nagaya admin maintain`, run as root like its cron job). Every
user-facing command runs as an unprivileged test user; only an admin's login may use the admin commands."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.helpers import images
from tests.integration.site.conftest import (
    NAGAYA,
    Site,
    SiteUser,
    ensure_user,
    indexed,
    module_people,
    push,
    run_root,
    skopeo,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lc(site: Site, site_system: None) -> dict[str, SiteUser]:
    return module_people(site, "lc", ("owner", "dev", "admin"))


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-2000:]}\n{r.stdout[-1000:]}"
    return r


def admin_audit(admin: SiteUser, *args: str) -> list[dict]:
    return json.loads(ok(admin.nagaya("admin", "audit", "--json", *args)).stdout)


def test_admin_audit_one_trail(site: Site, lc: dict[str, SiteUser], image_archive: Path) -> None:
    owner, admin, dev = lc["owner"], lc["admin"], lc["dev"]
    repo = f"{owner.name}/lc-audit"
    ref = f"{site.registry}/{repo}:1"
    ok(push(owner, image_archive, ref, owner.creds(site.registry)))
    digest = indexed(site, admin, repo, "1")["digest"]
    ok(owner.nagaya("pull", ref, "--json"))                 # the CLI reports the pull to the server

    rows = admin_audit(admin, "--user", owner.name, "--image", ref)
    actions = [r["action"] for r in rows]
    assert "registry.push" in actions and "cli.pull" in actions, actions
    pulled = next(r for r in rows if r["action"] == "cli.pull")
    assert pulled["actor"] == owner.name and pulled["digest"] == digest and pulled["repository"] == repo
    assert pulled["source"].startswith("cli:") and pulled["details"]["uid"] == owner.u.uid
    assert all(r["actor"] == owner.name for r in rows)
    # by digest alone, and nothing in the future
    assert {r["digest"] for r in admin_audit(admin, "--image", digest)} == {digest}
    assert admin_audit(admin, "--since", "2999-01-01") == []
    assert admin_audit(admin, "--user", owner.name, "--since", "1h", "--action", "cli.")
    # logins are in the same trail
    assert any(r["action"] == "login" for r in admin_audit(admin, "--user", dev.name, "--action", "login"))
    # CSV: a header and one line per event
    out = ok(admin.nagaya("admin", "audit", "--csv", "--user", owner.name, "--image", ref)).stdout
    table = list(csv.reader(io.StringIO(out)))
    assert table[0][:3] == ["time", "action", "actor"] and len(table) == len(rows) + 1
    # the human table works too
    assert "cli.pull" in ok(admin.nagaya("admin", "audit", "--user", owner.name, "--image", ref)).stdout
    # only admins read the trail
    r = owner.nagaya("admin", "audit", "--json")
    assert r.returncode != 0 and "admin" in r.stderr and r.stderr.startswith("nagaya: ")


def test_cli_cannot_forge_server_events(site: Site, lc: dict[str, SiteUser]) -> None:
    dev, admin = lc["dev"], lc["admin"]
    creds = dev.creds(site.registry)
    r = site.api("POST", "/api/audit", auth=creds, json={"action": "registry.delete", "image": "x/y:1"})
    assert r.status_code == 400
    assert site.api("POST", "/api/audit", json={"action": "run"}).status_code in (401, 403)
    marker = uuid.uuid4().hex
    r = site.api("POST", "/api/audit", auth=creds, json={"action": "run", "user": "nys-lc-admin", "image": "a/b:1",
                                                         "details": {"marker": marker}})
    assert r.status_code == 201
    hit = [e for e in admin_audit(admin, "--action", "cli.run", "--image", "a/b:1")
           if e["details"].get("marker") == marker]
    assert [e["actor"] for e in hit] == [dev.name]           # the caller, never the name in the body


def test_quota_refuses_push_through_skopeo_and_nagaya(site: Site, lc: dict[str, SiteUser],
                                                      image_archive: Path) -> None:
    owner, admin = lc["owner"], lc["admin"]
    project = f"lc-quota-{uuid.uuid4().hex[:6]}"
    ok(owner.nagaya("project", "create", project))
    creds = owner.creds(site.registry)
    # only admins set quotas
    r = owner.nagaya("admin", "project", "quota", project, "1K")
    assert r.returncode != 0 and "admin" in r.stderr
    q = json.loads(ok(admin.nagaya("admin", "project", "quota", project, "1K", "--json")).stdout)
    assert q == {"project": project, "quota_bytes": 1024, "used_bytes": 0}
    # under quota: the first push goes through, and fills the project
    ok(push(owner, image_archive, f"{site.registry}/{project}/bb:1", creds))
    size = indexed(site, admin, f"{project}/bb", "1")["size"]
    assert size > 1024
    q = json.loads(ok(admin.nagaya("admin", "project", "quota", project, "--json")).stdout)
    assert q["used_bytes"] == size
    # over quota: skopeo is refused at its token request, before any upload (skopeo 1.9 prints only the
    # status; the reason is in the answer, in the distribution error format, for clients that show it)
    r = push(owner, image_archive, f"{site.registry}/{project}/bb:2", creds)
    assert r.returncode != 0 and "403" in r.stderr and "bearer token" in r.stderr, r.stderr
    t = site.token(f"repository:{project}/bb:pull,push", creds)
    assert t.status_code == 403 and "storage quota" in t.json()["errors"][0]["message"]
    assert site.granted(f"{project}/bb", "pull", creds) == {"pull"}          # reading stays allowed
    # ... and so is `nagaya push`, with a one-line message naming the project
    local = f"lcq-{uuid.uuid4().hex[:6]}:1"
    ok(owner.nagaya("image", "import", str(image_archive), "--name", local))
    r = owner.nagaya("push", local, f"{site.registry}/{project}/other:1")
    assert r.returncode != 0 and r.stderr.startswith("nagaya: ") and f"project {project} is over its storage quota" \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # pulls are unaffected, and the refusal is audited
    ok(owner.nagaya("pull", f"{site.registry}/{project}/bb:1"))
    assert admin_audit(admin, "--action", "quota.refused", "--image", f"{project}/other")
    assert any(e["details"].get("project") == project for e in admin_audit(admin, "--action", "admin.quota"))
    # raising the quota lets pushes through again
    ok(admin.nagaya("admin", "project", "quota", project, "none"))
    ok(owner.nagaya("push", local, f"{site.registry}/{project}/other:1"))
    # other projects never were limited
    ok(push(owner, image_archive, f"{site.registry}/{owner.name}/lc-free:1", creds))


# ---- immutable tags, retention and garbage collection ------------------------------------------------------

def archive_with(base: Path, msg: str) -> Path:
    """busybox (a layer every such image shares) + a layer of its own with /msg."""
    d = base / "lc-archives"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    bb = images.tar_bytes([images.entry("bin/", "dir"),
                           images.entry("bin/busybox", "file", Path("/bin/busybox").read_bytes(), mode=0o755)])
    own = images.tar_bytes([images.entry("msg", "file", msg.encode())])
    layout = images.oci_layout(d / f"{msg}.layout", [bb, own], {"Cmd": ["/bin/busybox", "cat", "/msg"]})
    out = images.oci_archive(layout, d / f"{msg}.tar")
    subprocess.run(["chmod", "-R", "a+rX", str(layout), str(out)], check=True)
    return out


def blob_on_disk(site: Site, digest: str) -> bool:
    hexd = digest.split(":", 1)[1]
    return (site.state_dir / "registry" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd
            / "data").exists()


def layers_of(site: Site, who: SiteUser, ref: str) -> list[str]:
    r = ok(skopeo(who, ["inspect", "--raw", f"docker://{ref}"], who.creds(site.registry)))
    m = json.loads(r.stdout)
    return [m["config"]["digest"], *[x["digest"] for x in m["layers"]]]


def maintain(site: Site, *args: str) -> dict:
    r = run_root([NAGAYA, "admin", "maintain", "--state-dir", str(site.state_dir), "--json", *args], timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def fresh_env(u: SiteUser) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(u.u.mkdir(u.u.home / f"lc-cache-{uuid.uuid4().hex[:8]}"))}


def test_immutable_tags(site: Site, lc: dict[str, SiteUser], base_dir: Path) -> None:
    owner, admin = lc["owner"], lc["admin"]
    project = f"lc-imm-{uuid.uuid4().hex[:6]}"
    ok(owner.nagaya("project", "create", project))
    r = owner.nagaya("admin", "project", "policy", project, "--immutable", "v*")
    assert r.returncode != 0 and "admin" in r.stderr
    pol = json.loads(ok(admin.nagaya("admin", "project", "policy", project, "--immutable", "v*,release-*",
                                     "--json")).stdout)
    assert pol["immutable_pattern"] == "v*,release-*" and pol["keep_newest"] is None
    one, two = archive_with(base_dir, "imm-one"), archive_with(base_dir, "imm-two")
    creds = owner.creds(site.registry)
    ref = f"{site.registry}/{project}/app:v1"
    ok(push(owner, one, ref, creds))
    d1 = indexed(site, admin, f"{project}/app", "v1")["digest"]
    # `nagaya push` asks first and refuses before uploading
    local = f"lci-{uuid.uuid4().hex[:6]}:1"
    ok(owner.nagaya("image", "import", str(two), "--name", local))
    r = owner.nagaya("push", local, ref)
    assert r.returncode != 0 and "immutable tag" in r.stderr and r.stderr.startswith("nagaya: "), r.stderr
    # a mutable tag moves freely, a new immutable tag can be created
    ok(owner.nagaya("push", local, f"{site.registry}/{project}/app:latest"))
    ok(owner.nagaya("push", local, f"{site.registry}/{project}/app:v2"))
    # other clients: the server puts the old manifest back under the tag as soon as it hears of the push
    ok(push(owner, two, ref, creds))
    end = time.monotonic() + 30
    while json.loads(ok(skopeo(owner, ["inspect", f"docker://{ref}"], creds)).stdout)["Digest"] != d1:
        assert time.monotonic() < end, "the immutable tag was not restored"
        time.sleep(0.2)
    assert indexed(site, admin, f"{project}/app", "v1")["digest"] == d1
    assert ok(owner.nagaya("run", ref, env=fresh_env(owner))).stdout == "imm-one"
    assert admin_audit(admin, "--action", "tag.immutable.restored", "--image", f"{project}/app:v1")


def test_retention_and_gc_keep_shared_layers(site: Site, lc: dict[str, SiteUser], base_dir: Path) -> None:
    owner, admin = lc["owner"], lc["admin"]
    project = f"lc-ret-{uuid.uuid4().hex[:6]}"
    ok(owner.nagaya("project", "create", project))
    creds = owner.creds(site.registry)
    repo = f"{project}/app"
    refs = {}
    for tag, msg in (("release-1", "ret-one"), ("old", "ret-two"), ("new", "ret-three")):
        refs[tag] = f"{site.registry}/{repo}:{tag}"
        ok(push(owner, archive_with(base_dir, msg), refs[tag], creds))
        indexed(site, admin, repo, tag)
    blobs = {tag: layers_of(site, owner, ref) for tag, ref in refs.items()}
    shared = set(blobs["old"]) & set(blobs["new"]) & set(blobs["release-1"])
    only_old = set(blobs["old"]) - set(blobs["new"]) - set(blobs["release-1"])
    assert len(shared) == 1 and len(only_old) == 2            # busybox shared; config + /msg layer of its own
    ok(admin.nagaya("admin", "project", "policy", project, "--keep", "1", "--keep-pattern", "release-*"))

    dry = maintain(site, "--dry-run")
    mine = [r for r in dry["retention"] if r["repository"] == repo]
    assert [(r["tags"], r["deleted"]) for r in mine] == [(["old"], False)]
    assert all(blob_on_disk(site, b) for b in only_old | shared)
    ok(skopeo(owner, ["inspect", f"docker://{refs['old']}"], creds))          # a dry run changed nothing

    rep = maintain(site)
    mine = [r for r in rep["retention"] if r["repository"] == repo]
    assert [(r["tags"], r["deleted"]) for r in mine] == [(["old"], True)]
    assert rep["gc"]["registry_restarted"] and only_old <= set(rep["gc"]["blobs_removed"])
    assert not shared & set(rep["gc"]["blobs_removed"])
    assert not any(blob_on_disk(site, b) for b in only_old)
    assert all(blob_on_disk(site, b) for b in shared | set(blobs["new"]) | set(blobs["release-1"]))
    # the kept images still pull and run in full from a clean cache; the expired one is gone everywhere
    assert ok(owner.nagaya("run", refs["new"], env=fresh_env(owner))).stdout == "ret-three"
    assert ok(owner.nagaya("run", refs["release-1"], env=fresh_env(owner))).stdout == "ret-one"
    assert owner.nagaya("pull", refs["old"], env=fresh_env(owner)).returncode != 0
    tags = site.api("GET", f"/api/repositories/{repo}/tags", auth=admin.creds(site.registry)).json()
    assert sorted(t["tag"] for t in tags) == ["new", "release-1"]
    assert admin_audit(admin, "--action", "retention.delete", "--image", repo)
    # idempotent: a second run finds nothing to do
    again = maintain(site)
    assert not [r for r in again["retention"] if r["repository"] == repo] and again["gc"]["blobs_removed"] == []
    # one run at a time: while another holds the lock, a run skips
    fd = os.open(site.state_dir / "maintain.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert maintain(site)["skipped"]
    finally:
        os.close(fd)


# ---- account expiry ------------------------------------------------------------------------------------

def test_account_expiry_warn_freeze_handover_archive(site: Site, lc: dict[str, SiteUser],
                                                     base_dir: Path) -> None:
    owner, admin = lc["owner"], lc["admin"]
    leaver = ensure_user("nys-lc-leaver", f"pw-leaver-{os.getpid()}")
    leaver.login(site.server)
    creds = leaver.creds(site.registry)
    ref = f"{site.registry}/{leaver.name}/thesis:final"
    ok(push(leaver, archive_with(base_dir, "thesis"), ref, creds))
    digest = indexed(site, admin, f"{leaver.name}/thesis", "final")["digest"]
    team, solo = f"lc-team-{uuid.uuid4().hex[:6]}", f"lc-solo-{uuid.uuid4().hex[:6]}"
    for p in (team, solo):
        ok(leaver.nagaya("project", "create", p))
    ok(leaver.nagaya("project", "member", "add", team, owner.name, "--role", "owner"))
    now = datetime.now(UTC)

    # dry run: the consequences, nothing changed
    soon = (now + timedelta(days=3)).isoformat()
    dry = json.loads(ok(admin.nagaya("admin", "user", "set", leaver.name, "--expires", soon, "--dry-run",
                                     "--json")).stdout)
    assert dry["frozen"] == [leaver.name] and dry["archive"] == [{"project": leaver.name, "tags": 1}]
    assert dry["handover"] == [{"project": team, "to": owner.name}]
    assert dry["flagged"] == [{"project": solo, "to": None}]
    assert "warning" not in ok(leaver.nagaya("project", "ls")).stderr
    r = leaver.nagaya("admin", "user", "set", leaver.name, "--expires", "never")
    assert r.returncode != 0 and "admin" in r.stderr

    # before expiry: a warning at login and in any site command's output; everything still works
    ok(admin.nagaya("admin", "user", "set", leaver.name, "--expires", soon))
    r = ok(leaver.nagaya("project", "ls"))
    assert f"warning: your account {leaver.name} expires on" in r.stderr
    assert "warning: your account" in leaver.login(site.server).stderr
    creds = leaver.creds(site.registry)
    ok(push(leaver, archive_with(base_dir, "thesis"), f"{site.registry}/{leaver.name}/thesis:v2", creds))

    # at expiry: tokens stop working, the personal project is frozen (even for admins), pulls by others go on
    ok(admin.nagaya("admin", "user", "set", leaver.name, "--expires", (now - timedelta(minutes=1)).isoformat()))
    r = leaver.nagaya("project", "ls")
    assert r.returncode != 0 and "expired" in r.stderr
    assert site.token(f"repository:{leaver.name}/thesis:pull", creds).status_code == 401
    t = site.token(f"repository:{leaver.name}/thesis:pull,push", admin.creds(site.registry))
    assert t.status_code == 403 and "frozen" in t.json()["detail"]

    # maintenance, clock moved forward: in the grace period group projects are handed over or flagged
    archive_dir = site.state_dir / "archive" / leaver.name
    dry = maintain(site, "--no-gc", "--dry-run", "--now", (now + timedelta(days=40)).isoformat())
    assert {h["project"]: h["action"] for h in dry["handover"]}.items() >= {team: "handover", solo: "flagged"}.items()
    assert [a["tag"] for a in dry["archived"] if a["project"] == leaver.name] == ["final", "v2"]
    assert not archive_dir.exists()
    rep = maintain(site, "--no-gc", "--now", (now + timedelta(days=10)).isoformat())
    assert {h["project"]: h["to"] for h in rep["handover"]}.items() >= {team: owner.name, solo: None}.items()
    assert not [a for a in rep["archived"] if a["project"] == leaver.name]
    listed = ok(owner.nagaya("project", "ls", "--json"))
    info = {p["name"]: p for p in json.loads(listed.stdout)}
    assert team in info, listed.stdout + listed.stderr
    assert info[team]["owner"] == owner.name
    projects = site.api("GET", "/api/projects", auth=admin.creds(site.registry)).json()
    assert solo in {p["name"] for p in projects}                              # flagged, never deleted
    assert admin_audit(admin, "--action", "project.flagged")
    ok(skopeo(admin, ["inspect", f"docker://{ref}"], admin.creds(site.registry)))   # still in the registry

    # after the grace period: archived (OCI archives + index.json), then removed from the registry
    rep = maintain(site, "--no-gc", "--now", (now + timedelta(days=40)).isoformat())
    mine = {a["tag"]: a for a in rep["archived"] if a["project"] == leaver.name}
    assert set(mine) == {"final", "v2"} and all(a["removed"] for a in mine.values())
    index = json.loads((archive_dir / "index.json").read_text())
    assert {(e["tag"], e["digest"]) for e in index["images"]} >= {("final", digest)}
    r = run_root(["skopeo", "inspect", f"oci-archive:{archive_dir / Path(mine['final']['file']).name}"])
    assert r.returncode == 0 and json.loads(r.stdout)["Digest"] == digest, r.stderr
    assert skopeo(admin, ["inspect", f"docker://{ref}"], admin.creds(site.registry)).returncode != 0
    assert site.api("GET", f"/api/repositories/{leaver.name}/thesis/tags",
                    auth=admin.creds(site.registry)).status_code == 404
    assert admin_audit(admin, "--action", "expiry.archive", "--image", f"{leaver.name}/thesis")
    # idempotent
    again = maintain(site, "--no-gc", "--now", (now + timedelta(days=41)).isoformat())
    assert not [a for a in again["archived"] if a["project"] == leaver.name]
    ok(admin.nagaya("admin", "user", "set", leaver.name, "--expires", "never"))      # leave the account usable
