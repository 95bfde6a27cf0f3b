"""PBS's task relay and its signaller keep their pid and mark files in the job's $TMPDIR only: never in a
directory another user can write (a planted pid file would steer the user's kill, a planted link their write).
The check runs by bash on its own, against the directories it must refuse."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nagaya.sched import pbs


def _check(tmpdir: str | None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", **({"TMPDIR": tmpdir} if tmpdir is not None else {})}
    return subprocess.run(["bash", "-c", pbs.PRIVATE_TMPDIR + "\necho PRIVATE"], env=env, capture_output=True,
                          text=True, timeout=30)


def test_the_jobs_own_private_tmpdir_is_taken(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    r = _check(str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "PRIVATE", r.stderr


@pytest.mark.parametrize("case", ["unset", "empty", "shared /tmp", "group-writable", "a link", "missing",
                                  "another user's"])
def test_any_other_tmpdir_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    d = tmp_path / "job"
    d.mkdir(mode=0o700)
    value: str | None = str(d)
    if case == "unset":
        value = None
    elif case == "empty":
        value = ""
    elif case == "shared /tmp":
        value = "/tmp"
    elif case == "group-writable":
        d.chmod(0o770)
    elif case == "a link":
        (tmp_path / "link").symlink_to(d)
        value = str(tmp_path / "link")
    elif case == "missing":
        value = str(tmp_path / "gone")
    elif case == "another user's":
        os.chown(d, 65534, 65534)                      # the suite runs as root (tests/run.sh)
    r = _check(value)
    assert r.returncode == 1 and "PRIVATE" not in r.stdout, (case, r.stdout)
    assert r.stderr.count("\n") == 1 and "not a private directory" in r.stderr, r.stderr


def test_both_scripts_check_before_touching_anything() -> None:
    for script in (pbs.TASK_RELAY, pbs.TASK_SIGNAL):
        assert pbs.PRIVATE_TMPDIR in script
        assert script.index(pbs.PRIVATE_TMPDIR) < script.index("d=$TMPDIR/")
        assert "/tmp" not in script.replace(pbs.PRIVATE_TMPDIR, "")
