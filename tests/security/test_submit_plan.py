"""The compiled starter's submit plan (src/starter/submit.c, THREAT_MODEL B27) names the qsub it runs and the
job's wrapper: a plan is code. Another account must never get one replayed in a victim's `nagaya submit`: a
plan in a directory someone else can write, owned by someone else, reached through a symlink or a hard link,
writable by others, or a FIFO at its name is refused, and the submit goes to the Python path (which, with no
scheduler configured here, fails in one line: what matters is that the payload never ran). The control test
shows the payload does run from a plan the victim owns, so the refusals are what keeps it out."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nagaya.sched.submitplan import plan_name
from tests.conftest import require
from tests.helpers.userconf import settings_in_config
from tests.helpers.users import User

pytestmark = pytest.mark.integration
FAST = "nagaya-starter: submit fast path"
PAYLOAD = """#!/bin/sh
touch @MARK@
echo 7.pwned
"""


@pytest.fixture
def place(alice: User) -> Iterator[Path]:
    exe = shutil.which("nagaya", path=alice.env()["PATH"]) or ""
    with open(exe, "rb") as f:
        require(f.read(4) == b"\x7fELF", f"{exe} is not the compiled starter (deploy/install.sh with cc)")
    d = Path(tempfile.mkdtemp(prefix="nagaya-sec-submit-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def victim(alice: User, place: Path) -> Iterator[tuple[User, Path, Path, str]]:
    """alice, her working directory, the payload's mark, and a plan that runs the payload as her `qsub`."""
    work = alice.mkdir(place / "work")
    state = alice.mkdir(work / "state")
    state.chmod(0o700)
    mark = work / "PWNED"                  # where the payload (run as alice) can write
    qsub = place / "evil-qsub"
    qsub.write_text(PAYLOAD.replace("@MARK@", str(mark)))
    qsub.chmod(0o755)
    facts = alice.run(["/opt/nagaya/bin/python3", "-c", "import os, pwd; u = os.umask(0); g = os.getgid(); "
                       "print(os.getuid(), g, ','.join(str(x) for x in sorted(y for y in os.getgroups() if y != g)),"
                       " pwd.getpwuid(os.getuid()).pw_name, u, sep='\\t')"], check=True).stdout.strip("\n")
    uid, gid, groups, name, umask = facts.split("\t")
    text = "".join([
        "nagaya-submit-plan 1\n", f"key\tpbs\tsecimg\t{os.uname().nodename}\n",
        f"ident\t{uid}\t{gid}\t{groups}\t{name}\t{alice.home}\n", f"umask\t{umask}\n", "backend\tpbs\n",
        f"qsub\t{qsub}\n", "mode\targv\n", "namemax\t230\n", f"statedir\t{state}\n", "ref\tsecimg@sha256:0\n",
        "digest\tsha256:0\n", "image\tsecimg\n", f"audit_file\t{place}/audit.jsonl\n", "audit_site\t\n",
        "audit_syslog\t0\n", "arg\t-N\n", "arg\tNAGAYASUBMITNAME\n", "script\t#!/bin/bash\\n@NAGAYA_SUBMIT_CMD@\\n\n",
        "end\n"])
    # no scheduler for the Python path: it fails in one line, after the starter refused the plan
    with settings_in_config(alice, {"NAGAYA_SCHED_PBS_BIN": str(place / "no-pbs")}):
        yield alice, work, mark, text


def plan_path(user: User, cache: Path | None = None) -> Path:
    return (cache or user.home / ".cache") / "nagaya" / "starter" / plan_name("pbs", "secimg", os.uname().nodename)


def put(user: User, text: str, cache: Path | None = None) -> Path:
    p = plan_path(user, cache)
    if cache is None:
        user.mkdir(p.parent)
        p.parent.chmod(0o700)
    if p.is_symlink() or p.exists():
        p.unlink()
    p.write_text(text)
    os.chown(p, user.uid, user.gid)
    p.chmod(0o600)
    return p


def submit(user: User, work: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return user.nagaya("submit", "--backend", "pbs", "--image", "secimg", "--", "true", cwd=work, input="",
                       env={"NAGAYA_STARTER": "debug", **(env or {})})


def assert_refused(r: subprocess.CompletedProcess, mark: Path, why: str) -> None:
    assert FAST not in r.stderr and "nagaya-starter: python path" in r.stderr and why in r.stderr, r.stderr
    assert not mark.exists() and "pwned" not in r.stdout, (r.stdout, r.stderr)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("nagaya: "), r.stderr


def test_the_payload_runs_when_the_plan_is_trusted(victim: tuple[User, Path, Path, str]) -> None:
    user, work, mark, text = victim
    put(user, text)
    r = submit(user, work)
    assert FAST in r.stderr and r.stdout == "Submitted batch job 7\n" and mark.exists(), r.stderr


def test_plan_in_a_directory_another_user_owns(victim: tuple[User, Path, Path, str], bob: User,
                                               place: Path) -> None:
    user, work, mark, text = victim
    cache = place / "cache"
    for d in (cache, cache / "nagaya", cache / "nagaya" / "starter"):
        bob.mkdir(d).chmod(0o700 if d.name == "starter" else 0o755)
    bad = plan_path(user, cache)
    bob.run(["sh", "-c", f"umask 077; cat > {bad}"], input=text, check=True)
    (cache / "nagaya" / "starter").chmod(0o755)
    bad.chmod(0o644)
    assert_refused(submit(user, work, {"XDG_CACHE_HOME": str(cache)}), mark, "no private plan directory")


def test_plan_directory_others_can_write(victim: tuple[User, Path, Path, str]) -> None:
    user, work, mark, text = victim
    p = put(user, text)
    try:
        p.parent.chmod(0o777)
        assert_refused(submit(user, work), mark, "no private plan directory")
    finally:
        p.parent.chmod(0o700)


def test_plan_owned_by_another_user(victim: tuple[User, Path, Path, str], bob: User) -> None:
    user, work, mark, text = victim
    p = put(user, text)
    os.chown(p, bob.uid, bob.gid)
    p.chmod(0o644)
    assert_refused(submit(user, work), mark, "not the user's own private regular file")


def test_symlinked_plan(victim: tuple[User, Path, Path, str], place: Path) -> None:
    user, work, mark, text = victim
    p = put(user, text)
    target = place / "elsewhere.submit"
    target.write_text(text)
    os.chown(target, user.uid, user.gid)    # even a file of the victim's own, if reached through a link
    target.chmod(0o600)
    p.unlink()
    p.symlink_to(target)
    assert_refused(submit(user, work), mark, "no submit plan for this image yet")


def test_hard_linked_plan(victim: tuple[User, Path, Path, str], place: Path) -> None:
    user, work, mark, text = victim
    p = put(user, text)
    os.link(p, place / "second-name")
    assert_refused(submit(user, work), mark, "not the user's own private regular file")


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_plan_others_can_write(victim: tuple[User, Path, Path, str], mode: int) -> None:
    user, work, mark, text = victim
    put(user, text).chmod(mode)
    assert_refused(submit(user, work), mark, "not the user's own private regular file")


def test_fifo_at_the_plan_name_does_not_hang(victim: tuple[User, Path, Path, str]) -> None:
    user, work, mark, text = victim
    p = put(user, text)
    p.unlink()
    os.mkfifo(p, 0o600)
    os.chown(p, user.uid, user.gid)
    assert_refused(submit(user, work), mark, "not the user's own private regular file")
    assert stat.S_ISFIFO(p.lstat().st_mode)


def test_plan_of_another_identity_or_a_changed_dependency(victim: tuple[User, Path, Path, str],
                                                          place: Path) -> None:
    user, work, mark, text = victim
    put(user, text.replace("\nend\n", f"\ndep\t{place}/evil-qsub\t0\t0\t0\t0\nend\n"))
    assert_refused(submit(user, work), mark, "a file the submit plan depends on changed")
    put(user, text.replace(f"\t{user.home}\n", "\t/home/someone-else\n"))
    assert_refused(submit(user, work), mark, "for another backend, image, node, identity or umask")
