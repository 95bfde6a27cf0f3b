"""The access matrix: owner, maintainer, developer, guest, non-member, anonymous and robot tokens (valid push,
valid pull, expired, revoked) × pull / push / delete / list — through the token endpoint, through skopeo
(run as an unprivileged user) and through nagaya's CLI — plus proof that an outsider cannot tell a private
repository from a missing one."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.site.conftest import Site, SiteUser, indexed, push, skopeo

pytestmark = pytest.mark.integration

ALL = {"pull", "push", "delete", "list"}
EXPECT: dict[str, set[str] | None] = {       # None: the credentials themselves are refused (401)
    "owner": ALL,
    "maintainer": ALL,
    "developer": {"pull", "push", "list"},
    "guest": {"pull", "list"},
    "non-member": set(),
    "anonymous": set(),
    "robot-push": {"pull", "push", "list"},
    "robot-pull": {"pull", "list"},
    "robot-expired": None,
    "robot-revoked": None,
}
HUMANS = {"owner": "owner", "maintainer": "maint", "developer": "dev", "guest": "guest", "non-member": "outsider"}
PROJECT = "matrix"


@dataclass
class Actor:
    key: str
    runner: SiteUser                       # the unprivileged account the commands run as
    creds: tuple[str, str] | None          # what it presents (None: anonymous)


@pytest.fixture(scope="module")
def matrix(site: Site, logged_in: dict[str, SiteUser], image_archive: Path) -> dict[str, Actor]:
    owner = logged_in["owner"]
    assert owner.nagaya("project", "create", PROJECT).returncode == 0
    for key, role in (("maint", "maintainer"), ("dev", "developer"), ("guest", "guest")):
        r = owner.nagaya("project", "member", "add", PROJECT, logged_in[key].name, "--role", role)
        assert r.returncode == 0, r.stderr
    robots = {}
    for name, scope, expires in (("push", "push", "30d"), ("pull", "pull", "30d"), ("expired", "pull", "1s"),
                                 ("revoked", "push", "30d")):
        r = owner.nagaya("token", "create", "--project", PROJECT, "--scope", scope, "--expires", expires,
                         "--name", name, "--json")
        assert r.returncode == 0, r.stderr
        t = json.loads(r.stdout)
        robots[name] = (t["username"], t["secret"])
    assert owner.nagaya("token", "revoke", "--project", PROJECT, "revoked").returncode == 0
    oc = owner.creds(site.registry)
    assert push(owner, image_archive, f"{site.registry}/{PROJECT}/seed:1", oc).returncode == 0
    for key in EXPECT:
        r = push(owner, image_archive, f"{site.registry}/{PROJECT}/victim-{key}:1", oc)
        assert r.returncode == 0, r.stderr
    indexed(site, owner, f"{PROJECT}/seed", "1")                # the tags listing below reads the index
    time.sleep(1.2)                                             # let the 1-second token expire
    actors = {k: Actor(k, logged_in[v], logged_in[v].creds(site.registry)) for k, v in HUMANS.items()}
    actors["anonymous"] = Actor("anonymous", logged_in["outsider"], None)
    for name in ("push", "pull", "expired", "revoked"):
        actors[f"robot-{name}"] = Actor(f"robot-{name}", logged_in["outsider"], robots[name])
    return actors


@pytest.mark.parametrize("key", list(EXPECT))
def test_token_endpoint(site: Site, matrix: dict[str, Actor], key: str) -> None:
    a, want = matrix[key], EXPECT[key]
    granted = site.granted(f"{PROJECT}/seed", "pull,push,delete", a.creds)
    if want is None:
        assert granted == 401
        return
    assert granted == want - {"list"}
    # `*` and partial requests: the intersection, never an error
    assert site.granted(f"{PROJECT}/seed", "delete", a.creds) == want & {"delete"}
    star = site.granted(f"{PROJECT}/seed", "*", a.creds)
    assert star == ({"*"} if want >= {"pull", "push", "delete"} else want - {"list"})
    # list, through the API: the tag index
    r = site.api("GET", f"/api/repositories/{PROJECT}/seed/tags", auth=a.creds)
    assert r.status_code == (200 if "list" in want else 404), r.text


@pytest.mark.parametrize("action", ["pull", "push", "delete", "list"])
@pytest.mark.parametrize("key", list(EXPECT))
def test_skopeo(site: Site, matrix: dict[str, Actor], image_archive: Path, key: str, action: str) -> None:
    a = matrix[key]
    allowed = action in (EXPECT[key] or set())
    reg = site.registry
    if action == "pull":
        dest = a.runner.u.mkdir(a.runner.u.home / f"pull-{uuid.uuid4().hex[:8]}")
        r = skopeo(a.runner, ["copy", f"docker://{reg}/{PROJECT}/seed:1", f"dir:{dest}"], a.creds)
    elif action == "push":
        r = push(a.runner, image_archive, f"{reg}/{PROJECT}/pushed-{key}:1", a.creds)
    elif action == "delete":
        r = skopeo(a.runner, ["delete", f"docker://{reg}/{PROJECT}/victim-{key}:1"], a.creds)
    else:
        r = skopeo(a.runner, ["list-tags", f"docker://{reg}/{PROJECT}/seed"], a.creds)
        if r.returncode == 0:
            assert json.loads(r.stdout)["Tags"] == ["1"]
    assert (r.returncode == 0) == allowed, f"{key} {action}: rc={r.returncode} {r.stderr[-400:]}"
    if not allowed:      # refused by the registry's auth, not failing for some unrelated reason
        assert re.search(r"unauthorized|denied|authentication required|invalid username/password", r.stderr,
                         re.I), r.stderr[-400:]
    if action == "delete" and allowed:
        r = skopeo(matrix["owner"].runner, ["inspect", "--raw", f"docker://{reg}/{PROJECT}/victim-{key}:1"],
                   matrix["owner"].creds)
        assert r.returncode != 0                               # really gone


@pytest.mark.parametrize("key", list(HUMANS))
def test_cli_listing(matrix: dict[str, Actor], key: str) -> None:
    a = matrix[key]
    allowed = "list" in (EXPECT[key] or set())
    r = a.runner.nagaya("repo", "tags", f"{PROJECT}/seed", "--json")
    assert (r.returncode == 0) == allowed, r.stderr
    if allowed:
        assert [t["tag"] for t in json.loads(r.stdout)] == ["1"]
    else:
        assert r.returncode == 3 and r.stderr.strip() == f"nagaya: repository {PROJECT}/seed not found"
    r = a.runner.nagaya("repo", "ls", "--json")
    names = {x["name"] for x in json.loads(r.stdout)}
    assert (f"{PROJECT}/seed" in names) == allowed
    r = a.runner.nagaya("project", "ls", "--json")
    assert (PROJECT in {p["name"] for p in json.loads(r.stdout)}) == (key != "non-member")


def _registry_answer(site: Site, repo: str, creds: tuple[str, str] | None) -> tuple[int, str, str]:
    tok = site.token(f"repository:{repo}:pull,push,delete", creds).json()["token"]
    r = httpx.get(f"http://{site.registry}/v2/{repo}/manifests/1", timeout=10,
                  headers={"Authorization": f"Bearer {tok}"})
    body = r.json() if r.content else {}
    codes = ",".join(e.get("code", "") for e in body.get("errors", []))
    return r.status_code, codes, r.headers.get("www-authenticate", "").replace(repo, "REPO")


@pytest.mark.parametrize("key", ["non-member", "anonymous", "robot-pull"])
def test_private_is_indistinguishable_from_missing(site: Site, matrix: dict[str, Actor],
                                                   logged_in: dict[str, SiteUser], key: str) -> None:
    a = matrix[key]
    private = f"{logged_in['owner'].name}/notify-or-not"     # a private project of someone else
    existing = _registry_answer(site, f"{PROJECT}/seed", a.creds) if key != "robot-pull" else \
        _registry_answer(site, private, a.creds)
    missing_repo = _registry_answer(site, f"{PROJECT}/no-such-repo", a.creds) if key != "robot-pull" else \
        _registry_answer(site, f"{logged_in['owner'].name}/no-such-repo", a.creds)
    missing_project = _registry_answer(site, "no-such-project/x", a.creds)
    assert existing == missing_repo == missing_project
    assert existing[0] == 401
    if key != "robot-pull":
        for path in (f"/api/projects/{PROJECT}", f"/api/projects/{PROJECT}/members"):
            r1 = site.api("GET", path, auth=a.creds)
            r2 = site.api("GET", path.replace(PROJECT, "no-such-project"), auth=a.creds)
            assert r1.status_code == r2.status_code == 404
            assert r1.json()["detail"].replace(PROJECT, "X") == r2.json()["detail"].replace("no-such-project", "X")
