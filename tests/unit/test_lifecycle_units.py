"""The lifecycle's small pure parts: the site clock's offset, CLI event ids, spooled record times, and reading
the audit spool (owner attribution, offsets, a line still being written)."""

import json
import os
from datetime import datetime, timedelta

import pytest

from nagaya import audit
from nagaya.server import audit_spool
from nagaya.sitedb import auditlog, clock


@pytest.mark.parametrize(("text", "secs"), [("0", 0), ("+10d", 864000), ("-2h", -7200), ("90", 90), ("1w", 604800)])
def test_clock_offsets(text: str, secs: int) -> None:
    assert clock.parse_offset(text) == timedelta(seconds=secs)


@pytest.mark.parametrize("text", ["", "tomorrow", "1.5d", "+-3d", "3y"])
def test_bad_clock_offsets(text: str) -> None:
    with pytest.raises(ValueError, match="NAGAYA_CLOCK_OFFSET"):
        clock.parse_offset(text)


def test_clock_moves() -> None:
    before = clock.now()
    clock.set_offset(timedelta(days=40))
    try:
        assert clock.now() - before >= timedelta(days=40)
    finally:
        clock.set_offset(timedelta(0))
    assert clock.now() - before < timedelta(days=1)


def test_cli_event_ids_are_per_actor_and_record() -> None:
    rec = {"action": "run", "id": "abc123"}
    assert auditlog.cli_event_id("alice", rec) == auditlog.cli_event_id("alice", {**rec, "exit_code": 1})
    assert auditlog.cli_event_id("alice", rec) != auditlog.cli_event_id("bob", rec)
    assert auditlog.cli_event_id("alice", rec) != auditlog.cli_event_id("alice", {**rec, "id": "abc124"})
    assert len(auditlog.cli_event_id("a" * 300, {"action": "run"})) <= 64          # the column's width


def test_spool_time_is_the_records_own_but_never_future() -> None:
    now = datetime(2030, 1, 1, 12)
    assert auditlog.spool_time({"time": "2030-01-01T10:00:00.000Z"}, now) == datetime(2030, 1, 1, 10)
    assert auditlog.spool_time({"time": "2031-01-01T00:00:00Z"}, now) == now
    assert auditlog.spool_time({"time": "garbage"}, now) == now


def test_audit_records_keep_one_id_and_time() -> None:
    ev = audit.AuditEvent(action="submit", user="u", uid=1)
    first, second = json.loads(ev.to_json()), json.loads(ev.to_json())
    assert first == second and len(first["id"]) == 12 and first["time"].endswith("Z")


def test_read_spool(tmp_path) -> None:
    spool, state = tmp_path / "spool", tmp_path / "state"
    spool.mkdir()
    state.mkdir()
    f = spool / "someone-else.jsonl"
    f.write_text(json.dumps({"action": "run", "id": "r1", "user": "root"}) + "\nnot json\n" + '{"action": "ru')
    (spool / "ignored.txt").write_text("x\n")
    state_fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    s = audit_spool.read(str(spool), state_fd)
    assert len(s.files) == 1 and s.errors == []
    sf = s.files[0]
    me = __import__("pwd").getpwuid(os.getuid()).pw_name
    assert sf.owner == me                                  # the file's owner, whatever the record says
    assert [r["id"] for r in sf.records] == ["r1"] and sf.malformed == 1
    assert sf.offset == f.read_bytes().rfind(b"\n") + 1     # the unfinished line waits
    # the next run starts where this one ended
    (state / audit_spool.OFFSETS).write_text(json.dumps({sf.path: {"inode": sf.inode, "offset": sf.offset,
                                                                   "head": sf.head}}))
    with open(f, "a") as out:
        out.write('n", "id": "r2"}\n')
    s = audit_spool.read(str(spool), state_fd)
    assert [r["id"] for r in s.files[0].records] == ["r2"]
    # a replaced file is read from its start
    f.unlink()
    f.write_text(json.dumps({"action": "run", "id": "r3"}) + "\n" + "x" * 200 + "\n")
    assert [r["id"] for r in audit_spool.read(str(spool), state_fd).files[0].records] == ["r3"]     # + 1 malformed
