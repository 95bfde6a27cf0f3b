"""Attacks on interactive app sessions (server/apps.py, server/app_launch.py, portal/apps.py): one user's app
socket made to stand for another's, another user's session id, the token in what users see, requests to the
root dispatcher that try to steer the app's directory, the portal's cookies handed to an app. The end-to-end
attacks through the running portal (another user's session URL: 404 for pages, the API and websockets; a
cross-site write: 403; the token in no page and no log) are in tests/e2e/test_apps.py."""

from __future__ import annotations

import grp
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nagaya.errors import NotFound, PermissionDenied, UsageError
from nagaya.server import jobs as jobs_mod
from nagaya.server.app_launch import apps_root, check_app_args
from nagaya.server.apps import AppSession, AppSessions
from nagaya.server.portal.apps import _strip_cookies
from tests.helpers.users import User


class FakeJobs:
    """Only what the record operations need: the scheduler is never reached in these tests."""

    def __init__(self) -> None:
        self.cancelled: list[tuple[str, str]] = []

    def cancel(self, user: str, job: str, via: str = "") -> None:
        self.cancelled.append((user, job))


@pytest.fixture(scope="module")
def people() -> dict[str, User]:
    if os.geteuid() != 0:
        pytest.fail("these tests run as root: they make users and their directories")
    return {"victim": User.ensure("nagaya-appv", 1_810_000), "attacker": User.ensure("nagaya-appa", 1_880_000)}


@pytest.fixture
def apps() -> Iterator[AppSessions]:
    top = Path(tempfile.mkdtemp(prefix="nga-", dir="/tmp"))        # short: a socket path has 108 bytes at most
    top.chmod(0o755)
    state = top / "state"
    state.mkdir(mode=0o700)
    now = [1000.0]
    a = AppSessions(FakeJobs(), state, clock=lambda: now[0])  # type: ignore[arg-type]
    a.now = now  # type: ignore[attr-defined]
    apps_root(state).mkdir(mode=0o755)
    yield a
    shutil.rmtree(top, ignore_errors=True)


def session(a: AppSessions, who: User, sid: str) -> AppSession:
    rec = AppSession(id=sid, user=who.name, kind="jupyter", image="r/x:1", job="1", token="ab" * 32,
                     created=1000.0, deadline=1000.0 + 7200, last_seen=1000.0)
    a._save(rec)
    return rec


def user_dir(a: AppSessions, who: User, sid: str) -> Path:
    gid = grp.getgrgid(os.getgid()).gr_gid
    u = a.apps / who.name
    u.mkdir(mode=0o750, exist_ok=True)
    os.chown(u, who.uid, gid)
    d = u / sid
    d.mkdir(mode=0o750)
    os.chown(d, who.uid, gid)
    return d


def listen(path: Path, owner: User) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen()
    os.chown(path, owner.uid, owner.gid)
    return s


def test_another_users_socket_never_stands_for_a_session(apps: AppSessions, people: dict[str, User]) -> None:
    victim, attacker = people["victim"], people["attacker"]
    vsid, asid = "a" * 32, "b" * 32
    vrec, arec = session(apps, victim, vsid), session(apps, attacker, asid)
    vdir, adir = user_dir(apps, victim, vsid), user_dir(apps, attacker, asid)
    real = listen(vdir / "sock", victim)
    try:
        # The victim's own session reaches its socket.
        os.close(apps.open_socket(vrec))
        # The attacker's "socket" is a link to the victim's: refused, never followed.
        (adir / "sock").symlink_to(vdir / "sock")
        with pytest.raises(FileNotFoundError):
            apps.open_socket(arec)
        # A socket of the victim's moved into the attacker's session: not the session owner's, refused.
        (adir / "sock").unlink()
        other = listen(adir / "sock", victim)
        try:
            with pytest.raises(FileNotFoundError):
                apps.open_socket(arec)
        finally:
            other.close()
        # The attacker's session directory swapped for a link to the victim's: refused.
        (adir / "sock").unlink()
        adir.rmdir()
        adir.symlink_to(vdir)
        with pytest.raises(FileNotFoundError):
            apps.open_socket(arec)
        # A plain file where the socket should be: not a socket, refused.
        adir.unlink()
        user_dir(apps, attacker, "c" * 32)
        crec = session(apps, attacker, "c" * 32)
        (apps.apps / attacker.name / ("c" * 32) / "sock").write_text("x")
        with pytest.raises(FileNotFoundError):
            apps.open_socket(crec)
    finally:
        real.close()
    # And the victim's still works.
    real2 = listen(vdir / "sock2", victim)
    real2.close()
    os.close(apps.open_socket(vrec))


def test_another_users_session_is_the_same_as_a_missing_one(apps: AppSessions, people: dict[str, User]) -> None:
    victim, attacker = people["victim"], people["attacker"]
    rec = session(apps, victim, "d" * 32)
    for op in (lambda: apps.get(attacker.name, rec.id), lambda: apps.end(attacker.name, rec.id),
               lambda: apps.extend(attacker.name, rec.id)):
        with pytest.raises(NotFound) as e:
            op()
        assert "no session" in e.value.message
    with pytest.raises(NotFound):
        apps.get(attacker.name, "../" + rec.id)
    assert apps.jobs.cancelled == []                     # type: ignore[attr-defined]
    assert apps.get(victim.name, rec.id).ended == 0
    # What pages and the API show never holds the token.
    shown = rec.public(1000.0, 3600)
    assert "token" not in shown and rec.token not in repr(shown)


def test_the_dispatcher_refuses_app_requests_that_steer_it(people: dict[str, User]) -> None:
    spec = {"image": "r/x:1", "digest": "sha256:" + "0" * 64, "command": []}
    good = {"session": "e" * 32, "kind": "jupyter", "token": "f" * 64, "spec": spec}
    check_app_args(good)
    for bad in ({**good, "session": "../../etc"}, {**good, "session": "E" * 32}, {**good, "kind": "shell"},
                {**good, "token": "x; rm -rf ~"}, {**good, "token": ""}):
        with pytest.raises(UsageError):
            check_app_args(bad)
    req = {"id": "0" * 32, "user": people["victim"].name, "op": "app_submit", "args": good}
    jobs_mod._check(req, "nagaya")
    # The job's working directory (bound into the container) is the dispatcher's to choose, never the server's.
    with pytest.raises(UsageError):
        jobs_mod._check({**req, "args": {**good, "spec": {**spec, "cwd": "/etc"}}}, "nagaya")
    with pytest.raises(PermissionDenied):
        jobs_mod._check({**req, "user": "root"}, "nagaya")


def test_the_portal_cookies_never_reach_an_app() -> None:
    sent = "nagaya_session=SECRET; _xsrf=1; nagaya_login=L; theirs=2; NAGAYA_device=D"
    assert _strip_cookies(sent) == "_xsrf=1; theirs=2"


def test_culling_moves_with_the_clock_not_with_sleep(apps: AppSessions, people: dict[str, User]) -> None:
    victim = people["victim"]
    rec = session(apps, victim, "9" * 32)
    apps.idle = 3600
    assert apps.maintain(now=1000.0 + 3000) == []
    shown: dict[str, Any] = apps.get(victim.name, rec.id).public(1000.0 + 3100, apps.idle)
    assert shown["warn"] and shown["idle_left"] == 500                       # the page warns before the end
    apps.now[0] = 1000.0 + 3100                                              # type: ignore[attr-defined]
    apps.extend(victim.name, rec.id)                                          # "extend" counts as activity too
    assert apps.get(victim.name, rec.id).deadline == 1000.0 + 7200 + 3600
    assert apps.maintain(now=1000.0 + 3100 + 3500) == []
    ended = apps.maintain(now=1000.0 + 3100 + 3601)
    assert [x["session"] for x in ended] == [rec.id] and "idle" in ended[0]["why"]
    assert apps.jobs.cancelled == [(victim.name, "1")]                       # type: ignore[attr-defined]
    assert apps.maintain(now=10**7) == []                                    # ended once
    # Past its deadline, however busy: a fresh session ends at its time.
    busy = session(apps, victim, "8" * 32)
    ended = apps.maintain(now=busy.deadline)
    assert [x["session"] for x in ended] == [busy.id] and "time" in ended[0]["why"]
