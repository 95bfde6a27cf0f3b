"""The image keeper (runtime/keeper.py, src/starter/nagaya-keeper.c): runs of one kill domain share one kept
mount of an image, and the keeper ends when idle, when its session's leader has gone, or when killed, leaving
nothing behind. Each test runs in a session of its own (setsid), as a login or a batch job would: that
session's keeper is the one the test watches, and `$$` (the shell, session leader) names the session."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.users import User

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("session_images")]

# shell helpers for the scripts below: this session's keepers and FUSE servers
HELPERS = """
keepers() { ps -o pid=,stat=,comm= -s $$ | awk '$2 !~ /^Z/ && $3 == "nagaya-keeper" {print $1}'; }
servers() { ps -o pid=,stat=,comm= -s $$ | awk '$2 !~ /^Z/ && $3 ~ /^(nagaya-squashfs|squashfuse)/ {print $1}'; }
nk() { keepers | wc -l; }
ns() { servers | wc -l; }
"""


def session(user: User, script: str, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess:
    r = user.run(["setsid", "-w", "sh", "-c", HELPERS + script], env=env, timeout=timeout)
    return r


def gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        try:
            if open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z"):
                time.sleep(0.05)
                continue
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("path", ["starter", "python"])
def test_runs_share_one_kept_mount(alice: User, path: str) -> None:
    """Two containers at once and one after them: one keeper, one server, one superblock (the same device
    number, so the same kernel caches); no server of their own."""
    env = {"NAGAYA_STARTER": "off"} if path == "python" else None
    r = session(alice, """
        nagaya run bb sh -c 'stat -c %d /app/data.txt; sleep 2' > a.out &
        sleep 1
        nagaya run bb sh -c 'cat /app/data.txt; stat -c %d /app/data.txt'
        echo during k=$(nk) s=$(ns)
        wait
        nagaya run bb stat -c %d /app/data.txt
        cat a.out
        echo after k=$(nk) s=$(ns)
        rm -f a.out
    """, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "image" and lines[1] == "data", r.stdout
    devs = {lines[2], lines[6], lines[7]}
    assert len(devs) == 1, r.stdout                     # the same mount's superblock in all three
    assert "during k=1 s=1" in r.stdout and "after k=1 s=1" in r.stdout, r.stdout


def test_without_keeping_each_run_mounts_its_own(alice: User) -> None:
    r = session(alice, """
        nagaya run bb sh -c 'stat -c %d /app/data.txt; sleep 2' > a.out &
        sleep 1
        nagaya run bb stat -c %d /app/data.txt
        wait
        cat a.out; rm -f a.out
        echo k=$(nk)
    """, env={"NAGAYA_RUNTIME_KEEP_MOUNTED": "0"})     # at once: a device number is reused once freed
    assert r.returncode == 0, r.stderr
    a, b, k = r.stdout.split()
    assert a != b and k == "k=0", r.stdout


def test_idle_keeper_ends_and_removes_its_names(alice: User) -> None:
    r = session(alice, """
        nagaya run bb true
        name=$(ps -o args= -s $$ | awk '$1 ~ /nagaya-keeper$/ {print $3}')
        echo k=$(nk) s=$(ns) $name
        ls ~/.cache/nagaya/starter | grep -c "^$name\\." || true
        sleep 3
        echo k=$(nk) s=$(ns)
        ls ~/.cache/nagaya/starter | grep -c "^$name\\." || true
    """, env={"NAGAYA_RUNTIME_KEEP_MOUNTED": "1"})
    assert r.returncode == 0, r.stderr
    first, names_before, after, names_after = r.stdout.splitlines()
    assert first.startswith("k=1 s=1 keeper-") and names_before == "2", r.stdout     # .sock and .lock
    assert after == "k=0 s=0" and names_after == "0", r.stdout


def test_keeper_ends_with_its_session(alice: User) -> None:
    """A logout or a batch job's end (the session's leader exits): the keeper ends as soon as no run uses it,
    whatever keep_mounted says, so a scheduler that ends only the job's session leaves nothing behind."""
    r = session(alice, "nagaya run bb true; keepers; servers")
    assert r.returncode == 0, r.stderr
    pids = [int(x) for x in r.stdout.split()]
    assert len(pids) == 2, r.stdout
    assert all(gone(p) for p in pids), alice.processes(keepers=True)


def test_killed_keeper_and_server_are_replaced(alice: User) -> None:
    r = session(alice, """
        nagaya run bb true
        kill -9 $(servers); sleep 0.3
        nagaya run bb cat /app/data.txt
        echo k=$(nk) s=$(ns)
        kill -9 $(keepers); sleep 0.3
        echo k=$(nk) s=$(ns)
        NAGAYA_STARTER=off nagaya run bb cat /app/data.txt
        nagaya run bb cat /app/data.txt
        echo k=$(nk) s=$(ns)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["image data", "k=1 s=1", "k=0 s=0", "image data", "image data",
                                     "k=1 s=1"], r.stdout


def test_concurrent_first_runs_start_one_keeper(alice: User) -> None:
    r = session(alice, """
        for i in 1 2 3 4 5 6; do
            if [ $((i % 2)) = 0 ]; then NAGAYA_STARTER=off nagaya run bb cat /app/data.txt > o$i &
            else nagaya run bb cat /app/data.txt > o$i & fi
        done
        wait
        cat o1 o2 o3 o4 o5 o6; rm -f o1 o2 o3 o4 o5 o6
        echo k=$(nk) s=$(ns)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["image data"] * 6 + ["k=1 s=1"], r.stdout


def test_one_sessions_end_never_breaks_anothers_container(alice: User, workdir: Path) -> None:
    """Two jobs of one user on one node: killing the first one's session (its keeper and server with it), as a
    scheduler ends a job, leaves the second one's running container reading its image."""
    first = alice.popen(["setsid", "-w", "sh", "-c", HELPERS + "nagaya run bb true; keepers; sleep 60"],
                        stdout=subprocess.PIPE, text=True)
    try:
        kept_first = int(first.stdout.readline())
        flag = workdir / "go"
        second = alice.popen(["setsid", "-w", "sh", "-c", HELPERS + f"""
            nagaya run bb sh -c 'cat /app/data.txt; while [ ! -e {flag} ]; do sleep 0.05; done;
                                 cat /app/data.txt; ls /bin | wc -l'
            keepers"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert second.stdout.readline() == "image data\n"
        os.killpg(os.getsid(first.pid), signal.SIGKILL)
        assert gone(kept_first)
        flag.touch()
        out, err = second.communicate(timeout=30)
        assert second.returncode == 0, err
        lines = out.splitlines()
        assert lines[0] == "image data" and int(lines[1]) > 10, out
        assert int(lines[2]) != kept_first
    finally:
        if first.poll() is None:
            os.killpg(os.getsid(first.pid), signal.SIGKILL)
        first.wait()


def test_corrupt_image_is_refused_in_one_line_through_the_keeper(alice: User, workdir: Path,
                                                                 rootfs: Path) -> None:
    cache = workdir / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    assert alice.nagaya("image", "import", str(rootfs), "--name", "bad", env=env).returncode == 0
    sqfs = next((cache / "nagaya" / "images").glob("*.sqfs"))
    data = sqfs.read_bytes()
    sqfs.write_bytes(data[:96] + bytes(len(data) - 96))
    r = session(alice, "nagaya run bad true; echo rc=$?; echo k=$(nk) s=$(ns)", env=env)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is corrupt; remove and re-import it" in lines[0], r.stderr
    assert r.stdout.split() == ["rc=125", "k=1", "s=0"], r.stdout       # the keeper holds no mount of it


def test_a_removed_image_is_let_go(alice: User, workdir: Path, rootfs: Path) -> None:
    """`image rm` (or `cache gc`) of a kept image: the keeper unmounts it and its server ends, so its space comes
    back at once, while the keeper stays for the session's other images (and runs)."""
    env = {"XDG_CACHE_HOME": str(workdir / "cache")}
    assert alice.nagaya("image", "import", str(rootfs), "--name", "brief", env=env).returncode == 0
    r = session(alice, """
        nagaya run brief cat /app/data.txt
        echo k=$(nk) s=$(ns)
        nagaya image rm brief >/dev/null
        sleep 1.5
        echo k=$(nk) s=$(ns)
    """, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["image data", "k=1 s=1", "k=1 s=0"], r.stdout


FAKE_KEEPER = """
import os, socket
from nagaya.runtime.keeper import key
p = os.path.expanduser("~/.cache/nagaya/starter/keeper-" + key() + ".sock")
if os.path.exists(p):
    os.unlink(p)
s = socket.socket(socket.AF_UNIX)
s.bind(p)
s.listen(8)
print("ready", flush=True)
held = []
while True:
    c, _ = s.accept()
    c.recv(4096)
    socket.send_fds(c, [b"ok\\n"], [os.open("/dev/null", os.O_RDONLY)])     # not a mount
    held.append(c)
    print("asked", flush=True)
"""


def test_a_clone_that_cannot_be_attached_falls_back_to_a_mount_of_its_own(alice: User) -> None:
    """What an LSM or an older kernel refusing move_mount looks like: the run mounts the image itself."""
    r = session(alice, f"""
        /opt/nagaya/bin/python3 -c '{FAKE_KEEPER}' > fake.out &
        fake=$!
        while ! grep -q ready fake.out 2>/dev/null; do sleep 0.05; done
        nagaya run bb cat /app/data.txt
        NAGAYA_STARTER=off nagaya run bb cat /app/data.txt
        kill $fake; grep -c asked fake.out; rm -f fake.out
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["image data", "image data", "2"], r.stdout + r.stderr
