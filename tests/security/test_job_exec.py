"""`nagaya job exec` crosses into a running container: one user attacks another's. The attacker forges a
record of their own that names the victim's container (every field copied right: the best case for the
attacker), squats the victim's runtime directory before the victim's job starts, or makes it a link to
their own. Each attack must fail without running anything in the victim's container, and the victim's job
and their own exec must still work."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.users import User
from tests.integration.sched_helpers import (
    ensure_users,
    import_images,
    job_processes,
    reset_user,
    stop_runner,
    submit,
    wait_for,
    wait_state,
)
from tests.security.adversary import no_kernel_link_protection, sh  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

ENV = {"NAGAYA_SCHED_KILL_GRACE": "2", "NAGAYA_SCHED_IDLE_EXIT": "20", "NAGAYA_SCHED_BACKEND": "local"}
APP = "echo ready; while :; do sleep 0.2; done"


@pytest.fixture(scope="module")
def pair(system: None, rootfs: Path, app_layout: Path) -> Iterator[tuple[User, User]]:
    victim, attacker = ensure_users(("nagaya-x1", 5000000), ("nagaya-x2", 5100000))
    for u in (victim, attacker):
        u.extra_env.update(ENV)
        reset_user(u)
        shutil.rmtree(f"/tmp/.nagaya-jobs-{u.uid}", ignore_errors=True)
        import_images(u, rootfs, app_layout)
    yield victim, attacker
    for u in (victim, attacker):
        stop_runner(u)
        shutil.rmtree(f"/tmp/.nagaya-jobs-{u.uid}", ignore_errors=True)


def _start(u: User) -> str:
    job = submit(u, "--image", "bb", "--", "sh", "-c", APP)
    wait_for(lambda: "ready" in u.nagaya("logs", job).stdout, 30, "the app to start")
    return job


def _end(u: User, job: str) -> None:
    u.nagaya("cancel", job)
    wait_state(u, job)
    wait_for(lambda: not job_processes(u), 10, "no process of the job left")


def test_a_forged_record_never_leads_into_another_users_container(pair: tuple[User, User]) -> None:
    victim, attacker = pair
    vjob, ajob = _start(victim), _start(attacker)
    try:
        vdir, adir = Path(f"/tmp/.nagaya-jobs-{victim.uid}"), Path(f"/tmp/.nagaya-jobs-{attacker.uid}")
        vname = next(x for x in os.listdir(vdir) if x.startswith(f"local-{vjob}-"))
        aname = next(x for x in os.listdir(adir) if x.startswith(f"local-{ajob}-"))
        forged = json.loads((vdir / vname).read_text())          # read as root: more than the attacker can
        forged["env"] = {"PATH": "/bin:/usr/bin"}
        sh(attacker, f"cat > {adir / aname} <<'EOF'\n{json.dumps(forged)}\nEOF")
        marker = "/tmp/pwned-by-exec"
        r = attacker.nagaya("job", "exec", ajob, "--", "sh", "-c", f"touch {marker}; id")
        assert r.returncode != 0 and r.stdout == ""
        assert r.stderr.count("\n") == 1, r.stderr
        assert not Path(marker).exists()
        # Through the victim's job id: the attacker's database has no such job; the answer is a missing job's.
        r = attacker.nagaya("job", "exec", vjob, "--", "id")
        assert r.returncode != 0 and r.stdout == ""
        # The victim still gets in.
        r = victim.nagaya("job", "exec", vjob, "--", "id", "-u")
        assert r.returncode == 0 and r.stdout.strip() == str(victim.uid), r.stderr
    finally:
        _end(victim, vjob)
        _end(attacker, ajob)


@pytest.mark.parametrize("how", ["directory", "link"])
def test_a_squatted_runtime_dir_is_refused(pair: tuple[User, User], how: str) -> None:
    victim, attacker = pair
    vdir = Path(f"/tmp/.nagaya-jobs-{victim.uid}")
    shutil.rmtree(vdir, ignore_errors=True)
    own = Path(f"/tmp/.nagaya-jobs-bait-{attacker.uid}")
    shutil.rmtree(own, ignore_errors=True)
    if how == "directory":
        sh(attacker, f"mkdir -m 0777 {vdir}")
        bait = vdir
    else:
        sh(attacker, f"mkdir -m 0777 {own} && ln -s {own} {vdir}")
        bait = own
    # a planted record for the victim's next job, pointing at the attacker's own job's container
    ajob = _start(attacker)
    vjob = ""
    try:
        arec = next(Path(f"/tmp/.nagaya-jobs-{attacker.uid}").glob(f"local-{ajob}-*"))
        for n in range(1, 10):                          # whatever id the victim's job gets
            sh(attacker, f"cp {arec} {bait}/local-{n}-0.0@{os.uname().nodename}.json")
        before = sorted(os.listdir(bait))
        vjob = _start(victim)
        r = victim.nagaya("job", "exec", vjob, "--", "sh", "-c", "echo IN; readlink /proc/self/ns/pid")
        assert r.returncode != 0 and "IN" not in r.stdout, (r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr
        assert sorted(os.listdir(bait)) == before      # the victim's run wrote nothing into the attacker's place
        logs = victim.nagaya("logs", vjob).stdout
        assert "ready" in logs and "no record for `nagaya job exec`" in logs
    finally:
        if vjob:
            _end(victim, vjob)
        _end(attacker, ajob)
        shutil.rmtree(own, ignore_errors=True)
        if vdir.is_symlink():
            vdir.unlink()
        shutil.rmtree(vdir, ignore_errors=True)
