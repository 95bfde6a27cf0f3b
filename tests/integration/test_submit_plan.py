"""`nagaya submit` on Grid Engine and PBS from the compiled starter's submit plan (src/starter/submit.c): what
it does must be exactly what the Python path does. A recording `qsub` in front of the scheduler's own (it
keeps its argv, environment and stdin, then execs the real one) shows both paths hand the scheduler the same
bytes; the job record, the audit record and the output are the same but for the job's id and the time; the
job runs with its arguments intact; and a change the plan depends on sends the next submit to Python."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers.userconf import settings_in_config
from tests.helpers.users import User
from tests.integration.sched_helpers import wait_for

pytestmark = pytest.mark.integration

FAST = "nagaya-starter: submit fast path"
# printable ASCII that shlex quotes in every way: spaces, quotes, $, ;, an empty argument, a leading dash
COMMAND = ["sh", "-c", 'printf "%s|" "$@" > "$0"', "out.txt", "a b", "it's", "", "$HOME", "x;y", "-n", "\"q\""]
WROTE = "a b|it's||$HOME|x;y|-n|\"q\"|"
RECORDER = """#!/bin/bash
# records what nagaya hands the scheduler, then is the scheduler's own qsub
d=@REC@/$(date +%s%N)-$$; mkdir -p "$d"
printf '%s\\0' "$@" > "$d/argv"; env -0 | sort -z > "$d/env"; cat > "$d/stdin"
exec @REAL@ "$@" < "$d/stdin"
"""


@pytest.fixture(scope="module", params=["pbs", "gridengine"])
def backend(request: pytest.FixtureRequest, system: None) -> Iterator[tuple[str, dict[str, str]]]:
    """One real scheduler at a time (the clusters are machine-wide)."""
    if request.param == "pbs":
        from tests.helpers.pbs import PBS_EXEC, PBSCluster

        require(os.access(f"{PBS_EXEC}/sbin/pbs_server", os.X_OK), "OpenPBS is not installed (deploy/openpbs.sh)")
        c = PBSCluster().start()
        real = f"{PBS_EXEC}/bin/qsub"
    else:
        from tests.helpers.gridengine import GridEngineCluster

        require(os.access("/usr/sbin/sge_qmaster", os.X_OK), "Grid Engine is not installed (deploy/install.sh)")
        c = GridEngineCluster().start()
        real = "/usr/bin/qsub"
    try:
        yield request.param, {**c.env, "REAL_QSUB": real}
    finally:
        c.stop()


@pytest.fixture
def setup(backend: tuple[str, dict[str, str]], alice: User, rootfs: Path) -> Iterator[tuple[User, Path, Path, str]]:
    name, env = backend
    work = Path(tempfile.mkdtemp(prefix="submitplan-", dir=alice.home))
    os.chown(work, alice.uid, alice.gid)
    rec, bindir = work / "rec", Path(tempfile.mkdtemp(prefix="submitplan-bin-"))
    bindir.chmod(0o755)
    alice.mkdir(rec)
    (bindir / "qsub").write_text(RECORDER.replace("@REC@", str(rec)).replace("@REAL@", env["REAL_QSUB"]))
    (bindir / "qsub").chmod(0o755)
    real = Path(env["REAL_QSUB"]).parent                    # the scheduler's other commands, as they are
    for tool in (os.listdir(real) if name == "pbs" else ("qstat", "qacct", "qdel", "qmod", "qrsh", "qhold", "qrls")):
        if tool != "qsub":
            (bindir / tool).symlink_to(real / tool)
    assert alice.nagaya("image", "import", str(rootfs), "--name", "subplan").returncode == 0
    settings = {k: v for k, v in env.items() if k != "REAL_QSUB"}
    settings.update({"NAGAYA_SCHED_STATE_DIR": str(work / "state"), "NAGAYA_SCHED_BACKEND": name,
                     f"NAGAYA_SCHED_{'PBS' if name == 'pbs' else 'GRIDENGINE'}_BIN": str(bindir)})
    # settings in the user's config file, as at a site: a NAGAYA_* variable keeps every submit on Python
    saved = dict(alice.extra_env)
    with settings_in_config(alice, settings):
        plans = alice.home / ".cache" / "nagaya" / "starter"
        for p in plans.glob("*.submit"):
            p.unlink()
        yield alice, work, rec, name
    alice.extra_env.clear()
    alice.extra_env.update(saved)
    alice.nagaya("image", "rm", "subplan")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(bindir, ignore_errors=True)


def nagaya_bin(user: User) -> str:
    exe = shutil.which("nagaya", path=user.env()["PATH"]) or ""
    with open(exe, "rb") as f:
        require(f.read(4) == b"\x7fELF", f"{exe} is not the compiled starter (deploy/install.sh with cc)")
    return exe


def submit(user: User, work: Path, starter: str, *extra: str) -> subprocess.CompletedProcess:
    return user.nagaya("submit", *extra, "--image", "subplan", "--", *COMMAND, cwd=work, input="",
                       env={"NAGAYA_STARTER": starter})


def recorded(rec: Path) -> dict[str, bytes]:
    """The newest recorded qsub call (and it is removed, so the next is the next one)."""
    d = sorted(rec.iterdir())[-1]
    out = {k: (d / k).read_bytes() for k in ("argv", "env", "stdin")}
    # NAGAYA_STARTER=off|debug is the one variable the two paths are told apart by
    out["env"] = b"\0".join(x for x in out["env"].split(b"\0") if not x.startswith(b"NAGAYA_STARTER="))
    shutil.rmtree(d)
    return out


def job_id(out: str) -> str:
    m = re.fullmatch(r"Submitted batch job (\S+)\n", out)
    assert m, out
    return m.group(1)


def record(work: Path, backend: str, job: str) -> str:
    text = (work / "state" / backend / f"{job}.job").read_text()
    text = text.replace(f'"id": "{job}"', '"id": "ID"')
    return re.sub(r'"submit_time": "[0-9T:-]+"', '"submit_time": "T"', text)


def audit_line(user: User, job: str) -> str:
    lines = (user.home / ".local/share/nagaya/audit.jsonl").read_text().splitlines()
    # the newest: job ids start again at 0 with each fresh scheduler, and the log is the user's for good
    line = [x for x in lines if f'"job":"{job}"' in x and '"action":"submit"' in x][-1]
    line = line.replace(f'"job":"{job}"', '"job":"ID"')
    return re.sub(r'"id":"[0-9a-f]{12}","image"', '"id":"X","image"', re.sub(r'"time":"[^"]+"', '"time":"T"', line))


def test_the_fast_path_submits_what_the_python_path_submits(setup: tuple[User, Path, Path, str]) -> None:
    user, work, rec, backend = setup
    nagaya_bin(user)
    py = submit(user, work, "off")
    assert py.returncode == 0, py.stderr
    py_job, py_rec = job_id(py.stdout), recorded(rec)
    first = submit(user, work, "debug")         # no plan yet: Python submits and writes one
    assert first.returncode == 0 and "no submit plan" in first.stderr, first.stderr
    assert recorded(rec) == py_rec
    (work / "out.txt").unlink(missing_ok=True)
    fast = submit(user, work, "debug")
    assert fast.returncode == 0 and FAST in fast.stderr, fast.stderr
    fast_job = job_id(fast.stdout)
    assert fast_job != py_job
    fast_rec = recorded(rec)
    assert fast_rec["argv"] == py_rec["argv"]           # the qsub options and the job's wrapper, byte for byte
    assert fast_rec["stdin"] == py_rec["stdin"]
    assert fast_rec["env"] == py_rec["env"]             # what qsub -V carries into the job
    if backend == "pbs":
        assert b"\0--\0/bin/bash\0-c\0" in fast_rec["argv"]     # the wrapper as the job's executable
    else:
        assert fast_rec["stdin"].startswith(b"#!/bin/bash\n")
    assert record(work, backend, fast_job) == record(work, backend, py_job)
    assert audit_line(user, fast_job) == audit_line(user, py_job)
    wait_for(lambda: (work / "out.txt").exists() and (work / "out.txt").read_text() == WROTE, 60,
             "the fast-submitted job's app")
    # --json, both ways
    fj = submit(user, work, "debug", "--json")
    pj = submit(user, work, "off", "--json")
    assert FAST in fj.stderr and fj.returncode == pj.returncode == 0, fj.stderr + pj.stderr
    a, b = json.loads(fj.stdout), json.loads(pj.stdout)
    same = [x.stdout.replace(f'"id": "{y["id"]}"', '"id": "ID"') for x, y in ((fj, a), (pj, b))]
    assert same[0] == same[1]
    recorded(rec)
    recorded(rec)
    # the job shows as any other
    show = user.nagaya("job", "show", "--json", fast_job, cwd=work)
    assert show.returncode == 0 and json.loads(show.stdout)["command"] == COMMAND, show.stdout + show.stderr


def test_what_the_plan_depends_on_sends_the_submit_to_python(setup: tuple[User, Path, Path, str]) -> None:
    user, work, _rec, _backend = setup
    nagaya_bin(user)
    assert submit(user, work, "debug").returncode == 0          # the plan
    assert FAST in submit(user, work, "debug").stderr
    conf = user.home / ".config" / "nagaya" / "nagaya.toml"
    conf.write_text(conf.read_text() + "\n")                    # the user's config changed
    r = submit(user, work, "debug")
    assert r.returncode == 0 and "a file the submit plan depends on changed" in r.stderr, r.stderr
    assert FAST in submit(user, work, "debug").stderr           # and the fresh plan serves again
    r = user.nagaya("submit", "--image", "subplan", "--", *COMMAND, cwd=work, input="",
                    env={"NAGAYA_STARTER": "debug", "NAGAYA_SCHED_PARTITION": ""})
    assert r.returncode == 0 and "a NAGAYA_ variable" in r.stderr, r.stderr
    script = work / "job.sh"                                    # a file by the command's name may be a batch script
    script.write_text("#!/bin/sh\n#PBS -N scripted\n#$ -N scripted\necho hi\n")
    os.chown(script, user.uid, user.gid)
    r = user.nagaya("submit", "--image", "subplan", "job.sh", cwd=work, input="", env={"NAGAYA_STARTER": "debug"})
    assert r.returncode == 0 and "may be a batch script" in r.stderr, r.stderr
    r = user.nagaya("submit", "--image", "subplan", "--time", "5", "--", "true", cwd=work, input="",
                    env={"NAGAYA_STARTER": "debug"})
    assert r.returncode == 0 and "an option the starter does not replay" in r.stderr, r.stderr
    subprocess.run(["touch", str(user.home / ".cache/nagaya/refs/subplan/latest")], check=True)
    r = submit(user, work, "debug")                             # the tag moved (here: touched)
    assert r.returncode == 0 and "a file the submit plan depends on changed" in r.stderr, r.stderr
