"""The root job dispatcher against its own spool, which the service account can write: links and FIFOs the
service account plants must never make root write, truncate, chown or read a file of root's, nor stall the
dispatcher; and the owner of a listed job is the account the operation ran as, not what its database says.

Hard links are planted as root here: where `fs.protected_hardlinks` is off (the code must not rely on it),
the service account could plant the same ones itself."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.site.conftest import Site, SiteUser, module_people
from tests.security.adversary import no_kernel_link_protection  # noqa: F401  (fixture: the code must hold without)
from tests.security.helpers import as_service, request_as_server, spool, wait_reply

pytestmark = pytest.mark.integration

PRECIOUS = b"root's own data\n"


@pytest.fixture(scope="module")
def users(site: Site) -> dict[str, SiteUser]:
    return module_people(site, "sd", ("victim", "forger"))


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    """A file of root's that no other account may change (in a directory only root can enter)."""
    p = tmp_path / "precious"
    p.write_bytes(PRECIOUS)
    p.chmod(0o600)
    return p


def _intact(p: Path) -> None:
    st = p.stat()
    assert p.read_bytes() == PRECIOUS and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600, \
        "the dispatcher changed a file of root's"


def _answered(site: Site, user: SiteUser) -> None:
    """The dispatcher still serves: a plain request of the victim's is answered."""
    reply = wait_reply(site, request_as_server(site, user.name, "list"), timeout=25)
    assert reply is not None and isinstance(reply.get("result"), list), reply


def test_planted_reply_links_are_replaced_not_followed(site: Site, users: dict[str, SiteUser], precious: Path) -> None:
    replies = spool(site) / "replies"
    hard, soft = secrets.token_hex(16), secrets.token_hex(16)
    # the names the reply is written under: the old fixed temp name and the final one
    for name in (f".{hard}.tmp", f"{hard}.json"):
        os.link(precious, replies / name)
    r = as_service("import os,sys; d=sys.argv[1]; [os.symlink(sys.argv[2], f'{d}/{n}') for n in sys.argv[3:]]",
                   str(replies), str(precious), f".{soft}.tmp", f"{soft}.json")
    assert r.returncode == 0, r.stderr
    for rid in (hard, soft):
        request_as_server(site, users["victim"].name, "list", rid=rid)
        reply = wait_reply(site, rid)
        assert reply is not None and isinstance(reply.get("result"), list), reply     # the victim's work done
    _intact(precious)
    for name in (f".{hard}.tmp", f".{soft}.tmp"):          # the old temp names: left alone, never written
        (replies / name).unlink(missing_ok=True)
    assert precious.stat().st_nlink == 1


def test_planted_requests_are_refused_and_never_stall(site: Site, users: dict[str, SiteUser], tmp_path: Path) -> None:
    victim = users["victim"].name
    requests = spool(site) / "requests"
    fifo, soft, hard = (secrets.token_hex(16) for _ in range(3))
    # Root's files holding well-formed requests: following a link to them would run an operation.
    targets = {}
    for rid in (soft, hard):
        t = tmp_path / f"{rid}.req"
        t.write_text(json.dumps({"id": rid, "user": victim, "op": "list", "args": {}}))
        t.chmod(0o644)
        targets[rid] = t
    os.link(targets[hard], requests / f"{hard}.json")
    r = as_service("import os,sys; d=sys.argv[1]; os.mkfifo(f'{d}/{sys.argv[2]}.json'); "
                   "os.symlink(sys.argv[4], f'{d}/{sys.argv[3]}.json')",
                   str(requests), fifo, soft, str(targets[soft]))
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    _answered(site, users["victim"])               # the FIFO stalls nothing: an honest request is served
    assert time.monotonic() - t0 < 10
    for rid in (fifo, soft, hard):
        assert wait_reply(site, rid, timeout=1) is None, f"the dispatcher acted on a planted request {rid}"
        assert not os.path.lexists(requests / f"{rid}.json"), "a planted request was left in the spool"
    for t in targets.values():
        assert t.exists() and t.stat().st_nlink == 1 and t.stat().st_uid == 0   # removed: the link, not the file


def test_owner_is_the_account_the_operation_ran_as(site: Site, users: dict[str, SiteUser]) -> None:
    """A user's own jobs database may claim anything; the reply names the account the dispatcher used."""
    forger = users["forger"]
    assert wait_reply(site, request_as_server(site, forger.name, "list")) is not None   # creates the database
    found = sorted(forger.u.home.glob(".local/*/nagaya/jobs/jobs.db"))
    assert found, "the local executor keeps its jobs elsewhere: update this test"
    db = found[0]
    with sqlite3.connect(db) as c:           # as root, then handed back: the forger could do the same
        c.execute("INSERT INTO jobs (name, user, state, image, ref, digest, command, cwd, env, submit_time) "
                  "VALUES ('x', 'root', 'COMPLETED', 'i', 'r', 'sha256:0', '[]', '/', '{}', 0)")
    subprocess.run(["chown", "-R", f"{forger.u.uid}:{forger.u.gid}", str(db.parent)], check=True)
    reply = wait_reply(site, request_as_server(site, forger.name, "list"))
    assert reply is not None and reply.get("result"), reply
    assert {j["user"] for j in reply["result"]} == {forger.name}, reply
    job_id = reply["result"][-1]["id"]
    status = wait_reply(site, request_as_server(site, forger.name, "status", {"job_id": job_id}))
    assert status is not None and status["result"]["user"] == forger.name, status


def test_dispatcher_refuses_a_swapped_spool(site_system: None, tmp_path: Path) -> None:
    """The state dir belongs to the service account: a jobs-spool it replaced with a link to a directory of
    root's, or made itself, is refused at start, and root changes nothing there."""
    base = Path(tempfile.mkdtemp(prefix="nagaya-sec-swap-"))
    base.chmod(0o755)
    state = base / "state"
    state.mkdir()
    subprocess.run(["chown", "nagaya:", str(state)], check=True)
    target = tmp_path / "root-dir"
    target.mkdir(mode=0o700)
    for plant in ("symlink", "own-dir"):
        spool_dir = state / "jobs-spool"
        code = "import os,sys; os.symlink(sys.argv[2], sys.argv[1])" if plant == "symlink" else \
            "import os,sys; os.mkdir(sys.argv[1], 0o777)"
        r = as_service(code, str(spool_dir), str(target))
        assert r.returncode == 0, r.stderr
        p = subprocess.run([sys.executable, "-m", "nagaya.server.jobs", "dispatch", str(spool_dir), "nagaya"],
                           capture_output=True, text=True, timeout=20)
        assert p.returncode != 0, f"the dispatcher accepted a {plant} spool"
        st = target.stat()
        assert st.st_uid == 0 and st.st_gid == 0 and stat.S_IMODE(st.st_mode) == 0o700 and not any(target.iterdir())
        if plant == "own-dir":
            st = spool_dir.stat()
            assert st.st_uid != 0 and not (spool_dir / "requests").exists()     # not adopted, not chowned
        subprocess.run(["rm", "-rf", str(spool_dir)], check=True)
    shutil.rmtree(base)
