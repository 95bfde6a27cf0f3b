"""Attacks on the relay to apps on other nodes (server/app_relay.py): requests that would steer the dispatcher
(odd session ids, job ids, node names), and, on the node, a session socket that is a link to another user's
app, another user's socket moved into the session, or a session directory swapped for a link: the relay (as the
session's owner) connects to none of them. The path through Slurm is tests/integration/test_app_relay_slurm.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nagaya.errors import UsageError
from nagaya.server.app_relay import check_relay_args
from tests.helpers.users import User

GOOD = {"session": "ab" * 16, "job_id": "12", "node": "n2"}


@pytest.mark.parametrize("bad", [{"session": "../x"}, {"session": "AB" * 16}, {"job_id": "--jobid=1"},
                                 {"job_id": "1 2"}, {"node": "-w"}, {"node": "n1,n2"}, {"node": "../n"},
                                 {"node": "n" * 80}, {"node": 3}])
def test_requests_that_would_steer_the_dispatcher_are_refused(bad: dict) -> None:
    check_relay_args(dict(GOOD))
    with pytest.raises(UsageError):
        check_relay_args({**GOOD, **bad})


@pytest.fixture(scope="module")
def people() -> dict[str, User]:
    if os.geteuid() != 0:
        pytest.fail("these tests run as root: they make users and their sockets")
    return {"victim": User.ensure("nagaya-relv", 1_910_000), "attacker": User.ensure("nagaya-rela", 1_920_000)}


@pytest.fixture
def tree(people: dict[str, User]) -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="ngrl-", dir="/tmp"))
    top.chmod(0o755)
    for u in people.values():
        d = top / u.name / "s"
        d.mkdir(parents=True)
        for p in (d.parent, d):
            os.chown(p, u.uid, u.gid)
            p.chmod(0o750 if p == d else 0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def listen_as(u: User, path: Path) -> tuple[socket.socket, list[bytes]]:
    """A socket of u's at path that records what reaches it."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    os.chown(path, u.uid, u.gid)
    path.chmod(0o666)
    s.listen(4)
    got: list[bytes] = []

    def serve() -> None:
        try:
            while True:
                c, _ = s.accept()
                got.append(c.recv(4096))
                c.sendall(b"secret of " + u.name.encode())
                c.close()
        except OSError:
            pass
    threading.Thread(target=serve, daemon=True).start()
    return s, got


def relay_as(u: User, d: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={u.uid}", f"--regid={u.gid}", "--clear-groups", "--",
                           sys.executable, "-I", "-m", "nagaya.server.app_relay", "node", str(d)],
                          input=b"hello", capture_output=True, timeout=60)


def test_the_relay_reaches_only_its_owners_own_socket(tree: Path, people: dict[str, User]) -> None:
    victim, attacker = people["victim"], people["attacker"]
    vdir, adir = tree / victim.name / "s", tree / attacker.name / "s"
    vs, vgot = listen_as(victim, vdir / "sock")
    try:
        # the victim's own relay reaches the victim's app (the positive control)
        r = relay_as(victim, vdir)
        assert r.returncode == 0 and r.stdout == b"secret of " + victim.name.encode(), r
        # the attacker's "socket" is a link to the victim's: not followed
        (adir / "sock").symlink_to(vdir / "sock")
        r = relay_as(attacker, adir)
        assert r.returncode != 0 and b"secret" not in r.stdout, r
        # a socket of the victim's moved into the attacker's session: not the attacker's, refused
        (adir / "sock").unlink()
        os.link(vdir / "sock", adir / "sock")
        r = relay_as(attacker, adir)
        assert r.returncode != 0 and b"secret" not in r.stdout and b"not its owner" in r.stderr, r
        # the attacker's session directory swapped for a link to the victim's: refused
        (adir / "sock").unlink()
        adir.rmdir()
        adir.symlink_to(vdir)
        r = relay_as(attacker, adir)
        assert r.returncode != 0 and b"secret" not in r.stdout, r
        assert vgot == [b"hello"]                      # only the victim's own relay ever reached the app
    finally:
        vs.close()
