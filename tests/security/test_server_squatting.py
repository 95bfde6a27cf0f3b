"""Names a user will own are reserved. A project named after an account that has not logged in yet is
refused (API and portal); a squatted project from before the rule (planted in the database here) is never
adopted at that user's first login: its owner keeps no hold over the user, the user gets no personal
project, and the admins see `project.squatted`."""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.site.conftest import Site, SiteUser, ensure_user, module_people
from tests.security.helpers import as_service, audit, csrf, portal

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def users(site: Site) -> dict[str, SiteUser]:
    return module_people(site, "sq", ("attacker", "admin"))


def test_project_named_after_an_account_is_refused(site: Site, users: dict[str, SiteUser]) -> None:
    late = ensure_user("nys-sq-late", f"pw-late-{os.getpid()}")           # exists, never logged in
    attacker, admin = users["attacker"], users["admin"]
    for who in (attacker, admin):                                         # admins included, site projects too
        for kind in ("group", "site"):
            r = site.api("POST", "/api/projects", auth=who.creds(site.registry), json={"name": late.name, "kind": kind})
            assert r.status_code in (403, 409), r.text
    c, _ = portal(site, attacker.name, attacker.password)
    r = c.post("/projects", data={"name": late.name, "kind": "group", "csrf": csrf(c)})
    assert r.status_code == 409, r.text
    # the victim's first login then gets their own personal project
    out = late.nagaya("login", "--password-stdin", "--json", site.server, input=late.password + "\n")
    assert out.returncode == 0 and json.loads(out.stdout)["personal_project"] == late.name, out.stdout + out.stderr
    r = site.api("GET", f"/api/projects/{late.name}/members", auth=late.creds(site.registry))
    assert [(m["name"], m["role"]) for m in r.json()] == [(late.name, "owner")], r.text
    # an ordinary name is still free
    r = site.api("POST", "/api/projects", auth=attacker.creds(site.registry), json={"name": "nys-sq-lab"})
    assert r.status_code in (201, 409), r.text


PLANT = """
import json, sys
from nagaya.server.settings import ServerSettings
from nagaya.sitedb import SiteDatabase
from nagaya.sitedb.models import Membership, Project, User
from sqlalchemy import select
db = SiteDatabase(ServerSettings.load(__import__('pathlib').Path(sys.argv[1])).database)
with db.session() as s:
    owner = s.scalar(select(User).where(User.name == sys.argv[2]))
    p = Project(name=sys.argv[3], kind="group", owner_id=owner.id)
    s.add(p); s.flush()
    s.add(Membership(project_id=p.id, user_id=owner.id, role="owner"))
    s.commit()
"""


def test_first_login_never_adopts_a_squatted_project(site: Site, users: dict[str, SiteUser],
                                                      image_archive: object) -> None:
    attacker, admin = users["attacker"], users["admin"]
    late = ensure_user("nys-sq-late2", f"pw-late2-{os.getpid()}")
    r = as_service(PLANT, str(site.state_dir / "server.json"), attacker.name, late.name)
    assert r.returncode == 0, r.stderr

    out = late.nagaya("login", "--password-stdin", "--json", site.server, input=late.password + "\n")
    assert out.returncode == 0, out.stderr                              # the victim can still log in
    assert json.loads(out.stdout)["personal_project"] is None, out.stdout
    lc = late.creds(site.registry)
    assert site.api("GET", f"/api/projects/{late.name}/members", auth=lc).status_code in (403, 404)
    assert site.granted(f"{late.name}/app", "pull,push", lc) in (set(), 401, 403)   # not their project
    members = site.api("GET", f"/api/projects/{late.name}/members", auth=attacker.creds(site.registry)).json()
    assert [(m["name"], m["role"]) for m in members] == [(attacker.name, "owner")], members   # not adopted
    ev = audit(site, admin.creds(site.registry), action="project.squatted", user=late.name)
    assert ev and ev[-1]["details"]["owner"] == attacker.name, ev
    # a second login changes nothing and says so again
    again = late.nagaya("login", "--password-stdin", "--json", site.server, input=late.password + "\n")
    assert again.returncode == 0 and json.loads(again.stdout)["personal_project"] is None
