"""Attacks on the portal's terminal into a running job (server/job_terminal.py), the root dispatcher's side:
another account connecting to a terminal's socket (SO_PEERCRED) or the service account without the one-use
secret, a second connection to a used socket, job ids that would be options or paths, and a process of the
terminal that ignores the hangup. The end-to-end checks (another user's job: the websocket refused; the shell
sees the job's own processes; closing leaves nothing) are in tests/e2e/test_job_terminal.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nagaya.errors import UsageError
from nagaya.server.job_terminal import ACCEPT_TIMEOUT, Terminals, check_args, hang_up, session_members
from tests.helpers.users import User


@pytest.fixture(scope="module")
def people() -> dict[str, User]:
    if os.geteuid() != 0:
        pytest.fail("these tests run as root: they act as the dispatcher and as other accounts")
    return {"service": User.ensure("nagaya-termsvc", 1_710_000), "victim": User.ensure("nagaya-termv", 1_720_000),
            "attacker": User.ensure("nagaya-terma", 1_730_000)}


@pytest.fixture
def terms(people: dict[str, User]) -> Iterator[Terminals]:
    top = Path(tempfile.mkdtemp(prefix="ngt-", dir="/tmp"))
    spool = top / "spool"
    spool.mkdir(mode=0o750)
    fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    svc = people["service"]
    t = Terminals(fd, spool, svc.uid, svc.gid)
    os.chown(top, 0, svc.gid)
    top.chmod(0o750)
    os.chown(spool, 0, svc.gid)
    yield t
    os.close(t.fd)
    os.close(fd)
    shutil.rmtree(top, ignore_errors=True)


def connect_as(who: User, path: Path, send: bytes, wait: float = 30.0) -> bytes:
    """Connect to `path` as `who` (a child process with its uid), send `send`, return what comes back."""
    code = ("import socket,sys,time\n"
            f"s=socket.socket(socket.AF_UNIX); s.settimeout({wait!r})\n"
            "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('REFUSED', e.errno); sys.exit(0)\n"
            "s.sendall(bytes.fromhex(sys.argv[2])); out=b''\n"
            "try:\n while True:\n  c=s.recv(4096)\n  if not c: break\n  out+=c\nexcept OSError: pass\n"
            "sys.stdout.write(out.hex())\n")
    r = subprocess.run(["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", "--clear-groups", "--",
                        "/usr/bin/python3", "-I", "-c", code, str(path), send.hex()],
                       capture_output=True, text=True, timeout=wait + 30)
    assert r.returncode == 0, r.stderr
    return r.stdout.encode() if r.stdout.startswith("REFUSED") else bytes.fromhex(r.stdout.strip() or "")


def start(t: Terminals, victim: User) -> tuple[Path, str]:
    got = t.start(pwd_of(victim), {"job_id": "424242", "rows": 24, "cols": 80})
    assert "result" in got, got
    return t.path / got["result"]["socket"], got["result"]["secret"]


def pwd_of(u: User):  # type: ignore[no-untyped-def]
    import pwd

    return pwd.getpwnam(u.name)


def test_only_the_service_account_with_the_secret_gets_a_terminal(terms: Terminals,
                                                                   people: dict[str, User]) -> None:
    svc, victim, attacker = people["service"], people["victim"], people["attacker"]
    # Another account: the directory (root:SERVICE 0750) keeps it out before the socket is even reached.
    path, secret = start(terms, victim)
    assert oct(path.parent.stat().st_mode & 0o777) == "0o750" and path.parent.stat().st_uid == 0
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    assert connect_as(attacker, path, secret.encode() + b"\n").startswith(b"REFUSED")
    # The service account without the secret: the connection is dropped and the socket is gone (one use).
    assert connect_as(svc, path, b"0" * 64 + b"\n") == b""
    deadline = time.monotonic() + 10
    while path.exists():
        assert time.monotonic() < deadline, "a used terminal socket is still there"
        time.sleep(0.05)
    assert victim.processes() == []                          # nothing ran as the victim
    # The secret, from the service account: the victim's `job shell` runs (as the victim) and answers for
    # the job: this one does not exist, so the victim's own scheduler says so on the terminal.
    path, secret = start(terms, victim)
    out = connect_as(svc, path, secret.encode() + b"\n")
    assert b"not found" in out.lower() or b"no job" in out.lower(), out
    # And the socket is not there for a second peer.
    assert not path.exists()


def test_a_terminal_nobody_connects_to_expires(terms: Terminals, people: dict[str, User]) -> None:
    path, _ = start(terms, people["victim"])
    deadline = time.monotonic() + ACCEPT_TIMEOUT + 15
    while path.exists() or terms.open:
        assert time.monotonic() < deadline, "an unused terminal socket was never removed"
        time.sleep(0.2)


def test_terminals_per_user_are_capped(terms: Terminals, people: dict[str, User]) -> None:
    from nagaya.server.job_terminal import USER_TERMS

    got = [terms.start(pwd_of(people["victim"]), {"job_id": "1"}) for _ in range(USER_TERMS + 1)]
    assert all("result" in g for g in got[:USER_TERMS])
    assert got[-1].get("kind") == "JobsBusy"
    assert "result" in terms.start(pwd_of(people["attacker"]), {"job_id": "1"})   # another user is not held up


@pytest.mark.parametrize("job", ["--help", "-1", "../../etc", "1 2", "", "a/b", "x" * 80, 5])
def test_job_ids_that_are_not_plain_are_refused(job: object) -> None:
    with pytest.raises(UsageError):
        check_args({"job_id": job})


@pytest.mark.parametrize("size", [{"rows": 0}, {"cols": 10**6}, {"rows": "24"}])
def test_window_sizes_are_checked(size: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        check_args({"job_id": "12", **size})


def test_hangup_leaves_nothing_even_what_ignores_it(people: dict[str, User]) -> None:
    u = people["victim"]
    # A session of the user's with a process that ignores SIGHUP and a grandchild in its own process group.
    p = subprocess.Popen(["setsid", "setpriv", f"--reuid={u.uid}", f"--regid={u.gid}", "--clear-groups", "--",
                          "/bin/sh", "-c", "trap '' HUP; (sleep 3001 &) ; sleep 3002"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while len(session_members(p.pid)) < 3:
        assert time.monotonic() < deadline, session_members(p.pid)
        time.sleep(0.05)
    hang_up(p.pid)
    p.wait(10)
    assert session_members(p.pid) == []
    assert not [x for x in u.processes() if "sleep 300" in x]


def test_the_socket_directory_is_never_adopted(people: dict[str, User]) -> None:
    """SPOOL/terms made first by the service account (to plant a link or listen itself): refused."""
    top = Path(tempfile.mkdtemp(prefix="ngt-", dir="/tmp"))
    try:
        spool = top / "spool"
        spool.mkdir(mode=0o750)
        (spool / "terms").mkdir()
        os.chown(spool / "terms", people["service"].uid, people["service"].gid)
        fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
        try:
            from nagaya.safefs import UnsafePath

            with pytest.raises(UnsafePath):
                Terminals(fd, spool, people["service"].uid, people["service"].gid)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(top, ignore_errors=True)



def test_a_shell_that_reads_nothing_never_wedges_the_relay() -> None:
    """Keystrokes flooding a terminal whose program reads none: the dispatcher's thread is not stuck in a
    write to the pty; past PENDING_MAX unread bytes the terminal ends (and the server's side sees it end)."""
    import threading

    from nagaya.server.job_terminal import FRAME_MAX, PENDING_MAX, _relay, frame

    master, slave = os.openpty()
    sleeper = subprocess.Popen(["sleep", "60"], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    ours, theirs = socket.socketpair()
    done = threading.Event()
    t = threading.Thread(target=lambda: (_relay(theirs, master), done.set()), daemon=True)
    t.start()
    try:
        chunk = frame(b"d", b"x" * (FRAME_MAX // 2))
        sent = 0
        ours.settimeout(10)
        while sent <= PENDING_MAX + FRAME_MAX and not done.is_set():
            try:
                ours.sendall(chunk)
            except OSError:
                break                                    # the relay closed its end: it is over
            sent += len(chunk)
        assert done.wait(20), "the relay is stuck writing to a terminal that reads nothing"
    finally:
        sleeper.kill()
        sleeper.wait()
        ours.close()
        theirs.close()
        os.close(master)
