"""The image keeper (THREAT_MODEL B28) serves one user, and a run trusts only that user's keeper. Another
account can neither reach a keeper nor be taken for one: a socket at the keeper's name that is not the user's
own is never sent a request (SO_PEERCRED), a connection from another uid gets nothing, and a link planted at
the keeper's lock makes no keeper start. In every case the victim's run still succeeds (mounting its image
itself where no keeper of its own can serve it)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers.users import User

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("session_images")]
PY = "/opt/nagaya/bin/python3"
HELPERS = """
keepers() { ps -o pid=,stat=,comm= -s $$ | awk '$2 !~ /^Z/ && $3 == "nagaya-keeper" {print $1}'; }
nk() { keepers | wc -l; }
"""


def starter_dir(user: User) -> Path:
    return user.home / ".cache" / "nagaya" / "starter"


def staged(user: User, workdir: Path, body: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A session of the user's: prints its keeper's name (as runtime/keeper.py computes it there), waits for
    the test's `go` file, then runs `body`."""
    script = HELPERS + f"""
        name=$({PY} -c 'from nagaya.runtime.keeper import key; print("keeper-" + key())')
        echo $name
        while [ ! -e {workdir}/go ]; do sleep 0.05; done
        {body}
    """
    return user.popen(["setsid", "-w", "sh", "-c", script], env=env, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)


def test_other_users_cannot_reach_a_keeper(alice: User, bob: User, workdir: Path) -> None:
    p = staged(alice, workdir, "nagaya run bb true; echo k=$(nk); "
               "while [ ! -e go2 ]; do sleep 0.05; done; nagaya run bb cat /app/data.txt; echo k=$(nk)")
    name = p.stdout.readline().strip()
    (workdir / "go").touch()
    assert p.stdout.readline().strip() == "k=1"
    sock = starter_dir(alice) / f"{name}.sock"
    # bob: the starter directory is alice's alone
    r = bob.run([PY, "-c", "import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n    print(e.errno)\n",
                 str(sock)])
    assert r.stdout.strip() == "13", r.stdout + r.stderr            # EACCES
    # another uid that can reach the socket (root here) gets no answer, and no mount
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    s.settimeout(5)
    try:
        s.sendall(b"mount\t0\t/usr/local/libexec/nagaya/nagaya-squashfs\n")
        msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
    except (BrokenPipeError, ConnectionResetError):
        msg, fds = b"", []                                          # closed at once
    assert msg == b"" and fds == []
    s.close()
    (alice.home / "go2").touch()
    out, err = p.communicate(timeout=60)
    (alice.home / "go2").unlink()
    assert p.returncode == 0, err
    assert out.split() == ["image", "data", "k=1"], out             # the same keeper still serves alice


@pytest.mark.parametrize("path", ["starter", "python"])
def test_a_socket_not_the_users_own_is_never_asked(alice: User, workdir: Path, path: str) -> None:
    """A socket at alice's keeper name, bound by another uid and open to all: the run checks its peer's uid
    before it sends anything, then starts its own keeper (which replaces the name) and runs."""
    env = {"NAGAYA_STARTER": "off"} if path == "python" else None
    p = staged(alice, workdir, "nagaya run bb cat /app/data.txt; echo k=$(nk); "
               "stat -c %u ~/.cache/nagaya/starter/$name.sock", env=env)
    name = p.stdout.readline().strip()
    path_ = starter_dir(alice) / f"{name}.sock"
    path_.unlink(missing_ok=True)
    fake = socket.socket(socket.AF_UNIX)
    fake.bind(str(path_))
    os.chmod(path_, 0o777)
    fake.listen(8)
    got: list[bytes] = []

    def serve() -> None:
        fake.settimeout(20)
        try:
            while True:
                c, _ = fake.accept()
                c.settimeout(2)
                try:
                    got.append(c.recv(4096))
                except OSError:
                    pass
                c.close()
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    (workdir / "go").touch()
    out, err = p.communicate(timeout=60)
    fake.close()
    assert p.returncode == 0, err
    # alice's own keeper took the name (and it is gone with her session)
    assert out.split() == ["image", "data", "k=1", str(alice.uid)], out
    assert all(x == b"" for x in got), got                          # connected, perhaps; asked, never


def test_a_link_at_the_lock_starts_no_keeper(alice: User, workdir: Path) -> None:
    target = workdir / "precious"
    target.write_text("keep me\n")
    os.chown(target, alice.uid, alice.gid)
    p = staged(alice, workdir, "nagaya run bb cat /app/data.txt; echo k=$(nk)")
    name = p.stdout.readline().strip()
    lock = starter_dir(alice) / f"{name}.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    try:
        (workdir / "go").touch()
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.split() == ["image", "data", "k=0"], out         # served by a mount of its own
        assert target.read_text() == "keep me\n" and lock.is_symlink()
    finally:
        lock.unlink(missing_ok=True)


def test_a_plan_directory_others_can_enter_gets_no_keeper(alice: User, workdir: Path) -> None:
    d = starter_dir(alice)
    mode = d.stat().st_mode & 0o7777
    d.chmod(0o755)
    try:
        p = staged(alice, workdir, "nagaya run bb cat /app/data.txt; echo k=$(nk)")
        p.stdout.readline()
        (workdir / "go").touch()
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.split() == ["image", "data", "k=0"], out
    finally:
        d.chmod(mode)
