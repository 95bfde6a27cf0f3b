"""The store on SQLite and on PostgreSQL: migrations match the models, authorize() follows the role rules,
tokens expire and revoke, cascades and event de-duplication hold."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from nagaya.errors import Conflict, NotFound, PermissionDenied
from nagaya.sitedb import Principal, SiteDatabase, authorize
from nagaya.sitedb.auditlog import AuditQuery
from nagaya.sitedb.models import Base, Tag, utcnow
from nagaya.sitedb.service import SiteService

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SiteDatabase]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        pg = request.getfixturevalue("postgres")
        url = pg.createdb("t_" + uuid.uuid4().hex[:12])
    d = SiteDatabase(url)
    d.migrate()
    yield d
    d.dispose()


def test_migrations_match_models_and_are_idempotent(db: SiteDatabase) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from nagaya.sitedb.db import MIGRATIONS

    db.migrate()                                      # a second upgrade is a no-op
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert db.current_revision() == ScriptDirectory.from_config(cfg).get_current_head() == "0005"
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def _world(db: SiteDatabase) -> dict[str, Principal]:
    with db.session() as s:
        svc = SiteService(s)
        users = {n: svc.login(n, 1000 + i, n == "root-ish") for i, n in
                 enumerate(["alice", "bob", "carol", "dave", "eve", "root-ish", "frank"])}
        p = {n: svc.principal(u, ["lab"] if n == "frank" else []) for n, u in users.items()}
        svc.create_project(p["alice"], "proj")
        svc.add_member(p["alice"], "proj", "bob", "user", "maintainer")
        svc.add_member(p["alice"], "proj", "carol", "user", "developer")
        svc.add_member(p["alice"], "proj", "dave", "user", "guest")
        svc.add_member(p["alice"], "proj", "lab", "group", "developer")
        svc.create_project(p["root-ish"], "library", "site")
    return p


def test_authorize_rules(db: SiteDatabase) -> None:
    p = _world(db)
    want = ["pull", "push", "delete", "list"]
    expected = {"alice": {"pull", "push", "delete", "list"}, "bob": {"pull", "push", "delete", "list"},
                "carol": {"pull", "push", "list"}, "dave": {"pull", "list"}, "eve": set(),
                "frank": {"pull", "push", "list"}, "root-ish": {"pull", "push", "delete", "list"}}
    with db.session() as s:
        for name, acts in expected.items():
            assert authorize(s, p[name], "proj/app", want) == acts, name
            # partial grants: the intersection, never an error
            assert authorize(s, p[name], "proj/app", ["push"]) == acts & {"push"}, name
        anon = Principal.anonymous()
        assert authorize(s, anon, "proj/app", want) == set()
        assert authorize(s, anon, "library/base", want) == {"pull", "list"}
        assert authorize(s, p["eve"], "library/base", want) == {"pull", "list"}
        assert authorize(s, p["root-ish"], "library/base", want) == set(want)
        assert authorize(s, p["alice"], "library/base", ["*"]) == {"pull", "list"}
        assert authorize(s, p["alice"], "alice/x", ["*"]) == set(want)        # personal project on first login
        assert authorize(s, p["bob"], "alice/x", ["*"]) == set()
        # a missing project and a private one look the same to an outsider
        assert authorize(s, p["eve"], "nosuch/x", want) == authorize(s, p["eve"], "proj/x", want) == set()
        for bad in ("noslash", "UPPER/x", "proj/../x", "", "proj/" + "a" * 300):
            assert authorize(s, p["alice"], bad, want) == set()


def test_membership_rules(db: SiteDatabase) -> None:
    p = _world(db)
    with db.session() as s:
        svc = SiteService(s)
        with pytest.raises(PermissionDenied):
            svc.add_member(p["bob"], "proj", "eve", "user", "guest")     # maintainers do not manage members
        with pytest.raises(NotFound):
            svc.add_member(p["eve"], "proj", "eve", "user", "owner")     # outsiders cannot even see it
        with pytest.raises(Conflict):
            svc.remove_member(p["alice"], "proj", "alice", "user")      # the last owner stays
        with pytest.raises(Conflict):
            svc.create_project(p["bob"], "alice")                        # user names are personal projects
        with pytest.raises(PermissionDenied):
            svc.create_project(p["bob"], "site2", "site")
        assert [x.name for x in svc.projects(p["eve"])] == ["eve", "library"]
        svc.remove_member(p["alice"], "proj", "carol", "user")
        assert authorize(s, p["carol"], "proj/app", ["pull"]) == set()


def test_robot_tokens_expire_and_revoke(db: SiteDatabase) -> None:
    p = _world(db)
    with db.session() as s:
        svc = SiteService(s)
        _, ok = svc.create_robot(p["bob"], "proj", "ci", "push", utcnow() + timedelta(days=1))
        _, old = svc.create_robot(p["alice"], "proj", "old", "pull", utcnow() - timedelta(seconds=1))
        _, gone = svc.create_robot(p["alice"], "proj", "gone", "pull", None)
        svc.revoke_robot(p["alice"], "proj", "gone")
        with pytest.raises(PermissionDenied):
            svc.create_robot(p["carol"], "proj", "dev", "pull", None)   # developers cannot mint tokens
        with pytest.raises(Conflict):
            svc.create_robot(p["alice"], "proj", "ci", "pull", None)
        robot = svc.verify_robot(ok.username, ok.secret)
        assert robot is not None
        assert authorize(s, robot, "proj/app", ["pull", "push", "delete"]) == {"pull", "push"}
        assert authorize(s, robot, "alice/app", ["pull"]) == set()
        assert authorize(s, robot, "library/base", ["pull", "push"]) == {"pull"}
        assert svc.verify_robot(old.username, old.secret) is None
        assert svc.verify_robot(gone.username, gone.secret) is None
        assert svc.verify_robot(ok.username, ok.secret[:-1] + "x") is None
        assert svc.verify_robot("robot$proj+nope", ok.secret) is None
        states = {t.name: t.state for t in svc.robots(p["alice"], "proj")}
        assert states == {"ci": "active", "old": "expired", "gone": "revoked"}
        assert svc.robots(p["dave"]) == []


def test_registry_events_index_and_dedupe(db: SiteDatabase) -> None:
    p = _world(db)
    ev = {"id": "e1", "action": "push", "actor": {"name": "carol"}, "request": {"addr": "127.0.0.1:1"},
          "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": "proj/app",
                     "digest": "sha256:" + "a" * 64, "tag": "v1", "size": 500}}
    with db.session() as s:
        svc = SiteService(s)
        assert svc.apply_registry_event(ev, size=12345)
        assert not svc.apply_registry_event(ev)                       # the registry retries: applied once
        assert not svc.apply_registry_event({**ev, "id": "e2", "target": {**ev["target"],
                                             "mediaType": "application/octet-stream"}})    # blobs: ignored
    with db.session() as s:
        svc = SiteService(s)
        tags = svc.tags(p["dave"], "proj/app")
        assert [(t.tag, t.size, t.pushed_by) for t in tags] == [("v1", 12345, "carol")]
        with pytest.raises(NotFound):
            svc.tags(p["eve"], "proj/app")
        assert [r.name for r in svc.repositories(p["dave"])] == ["proj/app"]
        assert svc.repositories(p["eve"]) == []
        svc.apply_registry_event({"id": "e3", "action": "delete", "actor": {"name": "alice"},
                                  "target": {"repository": "proj/app", "digest": "sha256:" + "a" * 64}})
    with db.session() as s:
        assert s.query(Tag).count() == 0
        actions = [e.action for e in SiteService(s).audit_events(p["root-ish"], AuditQuery(limit=100))]
        assert "registry.push" in actions and "registry.delete" in actions
        with pytest.raises(PermissionDenied):
            SiteService(s).audit_events(p["alice"], AuditQuery())
