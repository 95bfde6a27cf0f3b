"""`nagaya site up|status|down`, login/logout, projects, members and robot tokens through the CLI, each
command run as an unprivileged test user against the real site (registry + server as `nagaya`)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx
import pytest

from tests.integration.site.conftest import NAGAYA, Site, SiteUser, daemons, push, run_root, site_down, site_up

pytestmark = pytest.mark.integration


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(pid)


def test_status_and_service_account(site: Site, people: dict[str, SiteUser]) -> None:
    r = people["outsider"].nagaya("site", "status", "--state-dir", str(site.state_dir), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["registry"] == site.registry and st["server"] == site.server and st["running"]
    assert st["registry"].startswith("127.0.0.1:") and st["server"].startswith("http://127.0.0.1:")
    import pwd

    nagaya_uid = pwd.getpwnam("nagaya").pw_uid
    assert set(st["pids"]) == {"server", "registry", "jobs"}
    for name, pid in st["pids"].items():
        # The server and the registry never run as root; only the narrow job dispatcher does (it starts each
        # user's scheduler operations as that user).
        assert _uid_of(pid) == (0 if name == "jobs" else nagaya_uid), name
    for secret in ("server.json", "registry.yml", "certs/token-signing.key"):
        assert stat.S_IMODE((site.state_dir / secret).stat().st_mode) == 0o600, secret
    # `site up` again is a no-op on a running site
    r = run_root([NAGAYA, "site", "up", "--state-dir", str(site.state_dir), "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["server"] == site.server
    # an unprivileged user cannot stop the site
    r = people["outsider"].nagaya("site", "down", "--state-dir", str(site.state_dir))
    assert r.returncode != 0 and r.stderr.startswith("nagaya: ") and len(r.stderr.strip().splitlines()) == 1
    assert httpx.get(f"{site.server}/openapi.json", timeout=10).json()["info"]["title"] == "nagaya"


def test_second_site_up_down_leaves_nothing(base_dir: Path, site_system: None) -> None:
    d = base_dir / "second"
    s = site_up(d)
    assert daemons(d)
    site_down(d)
    r = run_root([NAGAYA, "site", "status", "--state-dir", str(d), "--json"])
    assert r.returncode == 1 and json.loads(r.stdout)["running"] is False
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{s.server}/api/info", timeout=2)


def test_login_stores_a_token_not_the_password(site: Site, people: dict[str, SiteUser]) -> None:
    u = people["owner"]
    u.login(site.server)
    mode = stat.S_IMODE(u.auth_file.stat().st_mode)
    assert mode == 0o600
    data = json.loads(u.auth_file.read_text())
    assert data["nagaya"][site.registry] == {**data["nagaya"][site.registry], "server": site.server,
                                             "username": u.name}
    user, secret = u.creds(site.registry)
    assert user == u.name and secret.startswith("nyp_") and u.password not in u.auth_file.read_text()
    # the registry HOST:PORT works as the login target too (docker login style)
    r = u.nagaya("login", "--password-stdin", site.registry, input=u.password + "\n")
    assert r.returncode == 0, r.stderr
    # personal project created on first login
    r = u.nagaya("project", "ls", "--json")
    assert r.returncode == 0, r.stderr
    assert {"name": u.name, "kind": "personal", "role": "owner"}.items() <= \
        next(p for p in json.loads(r.stdout) if p["name"] == u.name).items()


def test_login_errors(site: Site, people: dict[str, SiteUser]) -> None:
    u = people["guest"]
    r = u.nagaya("login", "--password-stdin", site.server, input="wrong\n")
    assert r.returncode == 5 and r.stderr.startswith("nagaya: ") and len(r.stderr.strip().splitlines()) == 1
    r = u.nagaya("login", "--password-stdin", "--username", "nys-no-such-user", site.server, input="x\n")
    assert r.returncode == 5
    r = u.nagaya("login", "--password-stdin", "http://127.0.0.1:1", input="x\n")
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_logout_revokes_the_token(site: Site, people: dict[str, SiteUser]) -> None:
    u = people["labber"]
    u.login(site.server)
    creds = u.creds(site.registry)
    assert site.granted(f"{u.name}/x", "pull", creds) == {"pull"}
    r = u.nagaya("logout", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["revoked"] is True
    assert site.granted(f"{u.name}/x", "pull", creds) == 401
    r = u.nagaya("project", "ls")
    assert r.returncode == 5 and "login" in r.stderr
    u.login(site.server)


def test_projects_members_and_groups(site: Site, logged_in: dict[str, SiteUser], image_archive: Path) -> None:
    owner, dev, out, labber = logged_in["owner"], logged_in["dev"], logged_in["outsider"], logged_in["labber"]
    r = owner.nagaya("project", "create", "team-a", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["role"] == "owner"
    assert owner.nagaya("project", "create", "team-a").returncode == 7               # exists
    assert owner.nagaya("project", "create", "Bad Name").returncode == 2
    assert owner.nagaya("project", "create", dev.name).returncode == 7              # a user's personal name
    assert owner.nagaya("project", "member", "add", "team-a", dev.name, "--role", "developer").returncode == 0
    assert owner.nagaya("project", "member", "add", "team-a", "nys-lab", "--group", "--role", "guest").returncode == 0
    r = owner.nagaya("project", "member", "add", "team-a", "nys-nobody", "--role", "guest")
    assert r.returncode == 3 and "no such user" in r.stderr
    r = owner.nagaya("project", "member", "ls", "team-a", "--json")
    assert {(m["name"], m["kind"], m["role"]) for m in json.loads(r.stdout)} == \
        {(owner.name, "user", "owner"), (dev.name, "user", "developer"), ("nys-lab", "group", "guest")}
    # a developer cannot manage members; an outsider cannot see the project at all
    r = dev.nagaya("project", "member", "add", "team-a", out.name, "--role", "owner")
    assert r.returncode == 6 and r.stderr.startswith("nagaya: ")
    r = out.nagaya("project", "member", "ls", "team-a")
    r2 = out.nagaya("project", "member", "ls", "team-nope")
    assert r.returncode == r2.returncode == 3
    assert r.stderr.replace("team-a", "X") == r2.stderr.replace("team-nope", "X")
    assert "team-a" not in out.nagaya("project", "ls").stdout
    # the Unix group gives its member the guest role
    assert site.granted("team-a/app", "pull,push", labber.creds(site.registry)) == {"pull"}
    # the last owner stays
    assert owner.nagaya("project", "member", "rm", "team-a", owner.name).returncode == 7
    assert owner.nagaya("project", "member", "rm", "team-a", "nys-lab", "--group").returncode == 0
    assert site.granted("team-a/app", "pull", labber.creds(site.registry)) == set()
    # help everywhere
    for cmd in (["project", "--help"], ["project", "member", "add", "--help"], ["token", "create", "--help"],
                ["site", "up", "--help"], ["login", "--help"], ["repo", "ls", "--help"]):
        assert owner.nagaya(*cmd).returncode == 0, cmd


def test_site_project_admin_pushes_everyone_pulls(site: Site, logged_in: dict[str, SiteUser],
                                                 image_archive: Path) -> None:
    admin, dev = logged_in["admin"], logged_in["dev"]
    assert dev.nagaya("project", "create", "library-x", "--site").returncode == 6
    r = admin.nagaya("project", "create", "library", "--site", "--json")
    assert r.returncode == 0, r.stderr
    r = push(admin, image_archive, f"{site.registry}/library/busybox:1", admin.creds(site.registry))
    assert r.returncode == 0, r.stderr
    r = push(dev, image_archive, f"{site.registry}/library/evil:1", dev.creds(site.registry))
    assert r.returncode != 0
    assert site.granted("library/busybox", "pull,push", dev.creds(site.registry)) == {"pull"}
    assert site.granted("library/busybox", "pull,push", None) == {"pull"}
    r = dev.run(["skopeo", "inspect", "--raw", "--tls-verify=false", "--no-creds",
                 f"docker://{site.registry}/library/busybox:1"])
    assert r.returncode == 0, r.stderr


def test_robot_tokens_cli(site: Site, logged_in: dict[str, SiteUser]) -> None:
    owner, maint, dev, guest = (logged_in[k] for k in ("owner", "maint", "dev", "guest"))
    assert owner.nagaya("project", "create", "ci-proj").returncode == 0
    for who, role in ((maint, "maintainer"), (dev, "developer"), (guest, "guest")):
        assert owner.nagaya("project", "member", "add", "ci-proj", who.name, "--role", role).returncode == 0
    r = maint.nagaya("token", "create", "--project", "ci-proj", "--scope", "push", "--expires", "30d",
                     "--name", "build", "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    assert t["username"] == "robot$ci-proj+build" and t["secret"].startswith("nyr_") and t["state"] == "active"
    assert site.granted("ci-proj/app", "pull,push,delete", (t["username"], t["secret"])) == {"pull", "push"}
    assert site.granted("ci-proj/app", "pull", (t["username"], t["secret"] + "x")) == 401
    assert dev.nagaya("token", "create", "--project", "ci-proj", "--scope", "pull", "--expires", "1d").returncode == 6
    r = owner.nagaya("token", "ls", "--json")
    assert "robot$ci-proj+build" in [x["username"] for x in json.loads(r.stdout)]
    r = owner.nagaya("token", "ls", "--project", "ci-proj", "--json")
    rows = json.loads(r.stdout)
    assert [x["username"] for x in rows] == ["robot$ci-proj+build"]
    assert "secret" not in rows[0] and t["secret"] not in r.stdout
    assert "ci-proj" not in guest.nagaya("token", "ls", "--json").stdout
    assert guest.nagaya("token", "ls", "--project", "ci-proj").returncode == 6
    assert owner.nagaya("token", "create", "--project", "ci-proj", "--scope", "push", "--expires", "soon")\
        .returncode == 2
    r = owner.nagaya("token", "revoke", "robot$ci-proj+build", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "revoked"
    assert site.granted("ci-proj/app", "pull", (t["username"], t["secret"])) == 401
    assert owner.nagaya("token", "revoke", "--project", "ci-proj", "nope").returncode == 3


def test_notifications_feed_index_and_audit(site: Site, logged_in: dict[str, SiteUser], image_archive: Path) -> None:
    import time

    owner, guest, admin = logged_in["owner"], logged_in["guest"], logged_in["admin"]
    ref = f"{site.registry}/{owner.name}/notify:v1"
    r = push(owner, image_archive, ref, owner.creds(site.registry))
    assert r.returncode == 0, r.stderr
    r = owner.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                   f"--creds={':'.join(owner.creds(site.registry))}", f"docker://{ref}"])
    assert r.returncode == 0
    rows: list = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not rows:
        r = owner.nagaya("repo", "tags", f"{owner.name}/notify", "--json")
        rows = json.loads(r.stdout) if r.returncode == 0 else []
        time.sleep(0.2)
    assert rows and rows[0]["tag"] == "v1" and rows[0]["pushed_by"] == owner.name
    assert rows[0]["digest"].startswith("sha256:")
    assert rows[0]["size"] > os.path.getsize("/bin/busybox") // 3          # config + compressed layer
    # others cannot see it
    r = guest.nagaya("repo", "tags", f"{owner.name}/notify")
    assert r.returncode == 3
    assert f"{owner.name}/notify" not in guest.nagaya("repo", "ls").stdout
    # the audit table knows who pushed and pulled
    deadline = time.monotonic() + 15
    seen: set = set()
    while time.monotonic() < deadline and not {"registry.push", "registry.pull"} <= seen:
        ev = site.api("GET", "/api/audit", auth=admin.creds(site.registry), params={"limit": 500}).json()
        seen = {e["action"] for e in ev if e["repository"] == f"{owner.name}/notify" and e["actor"] == owner.name}
        time.sleep(0.2)
    assert {"registry.push", "registry.pull"} <= seen
    assert site.api("GET", "/api/audit", auth=owner.creds(site.registry)).status_code == 403
    # the webhook wants the shared secret
    r = site.api("POST", "/api/registry/events", json={"events": []})
    assert r.status_code == 401
    r = site.api("POST", "/api/registry/events", json={"events": []}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_site_on_postgresql(base_dir: Path, postgres, people: dict[str, SiteUser], image_archive: Path) -> None:
    url = postgres.createdb("nagaya_site")
    d = base_dir / "pg-site"
    s = site_up(d, env={"NAGAYA_SERVER_DATABASE": url})
    try:
        u = people["dev"]
        r = u.nagaya("login", "--password-stdin", "--json", s.server, input=u.password + "\n")
        assert r.returncode == 0, r.stderr
        r = push(u, image_archive, f"{s.registry}/{u.name}/pg:1", u.creds(s.registry))
        assert r.returncode == 0, r.stderr
        assert s.granted(f"{u.name}/pg", "pull,push", u.creds(s.registry)) == {"pull", "push"}
        assert json.loads((d / "server.json").read_text())["database"].startswith("postgresql")
    finally:
        site_down(d)
        people["dev"].nagaya("logout", s.registry)
