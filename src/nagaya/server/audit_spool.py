"""The site audit spool (`[audit] site_dir`) into the server's one audit trail, by `nagaya admin maintain`.

Every `nagaya` command (above all `nagaya run`, which never talks to the server: its start-up path stays
lean) appends its record to `SITE_DIR/USER.jsonl`. The spool dir is sticky and world-writable, so a user
can create and append to files of their own only: a record is attributed to the **owner of its file**,
never to the `user` it claims. Ingestion is idempotent: each record has an id, and the trail's unique
event id (actor + record id) drops copies already there (a second run, or the copy `pull`/`submit` sent
at once). Offsets per file (inode, first bytes, bytes read) spare re-reading; a file replaced or truncated
is read again from its start, and its known records are dropped as copies.

Reading happens as root, before maintenance drops to the service account (the files are 0600). The spool
dir is opened by fd (root's, sticky, no link on the way) and every name in it with O_NOFOLLOW|O_NONBLOCK:
a symlink, hard link, FIFO or device planted there is skipped and reported, never followed or waited on."""

from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from nagaya import safefs

OFFSETS = "audit-spool.json"
MAX_READ = 64 << 20            # per file and run; the rest waits for the next run
HEAD = 256                     # bytes: the first record's time and id make them unique to the file


@dataclass
class SpoolFile:
    path: str
    owner: str
    inode: int
    offset: int                  # where this run's reading ended (a line boundary)
    head: str                    # a hash of the file's first bytes: tells a new file that reuses an inode
    records: list[dict[str, Any]] = field(default_factory=list)
    malformed: int = 0


@dataclass
class Spool:
    files: list[SpoolFile]
    errors: list[str]


def _head(fd: int, upto: int) -> str:
    """A hash of the file's first bytes (at most HEAD, none past what was read)."""
    import hashlib

    return hashlib.sha256(os.pread(fd, min(HEAD, upto), 0)).hexdigest()[:16]


def _offsets(state_fd: int) -> dict[str, Any]:
    try:
        data = json.loads(safefs.read_at(state_fd, OFFSETS))
    except (OSError, ValueError, safefs.UnsafePath):
        return {}
    return data if isinstance(data, dict) else {}


def read(site_dir: str, state_fd: int) -> Spool:
    offsets = _offsets(state_fd)
    files: list[SpoolFile] = []
    errors: list[str] = []
    try:
        dfd = safefs.open_dir(site_dir, last_shared=True)
    except (OSError, safefs.UnsafePath) as e:
        return Spool([], [f"{site_dir}: {e}"])
    try:
        names = sorted(os.listdir(dfd))
        for name in names:
            if name.endswith(".jsonl"):
                _read_one(dfd, site_dir, name, offsets, files, errors)
    finally:
        os.close(dfd)
    return Spool(files, errors)


def _read_one(dfd: int, site_dir: str, name: str, offsets: dict[str, Any], files: list[SpoolFile],
              errors: list[str]) -> None:
    path = os.path.join(site_dir, name)
    try:
        fd = safefs.open_at(dfd, name)
    except (OSError, safefs.UnsafePath) as e:
        errors.append(f"{path}: {safefs.describe(e)}; not ingested")
        return
    try:
        st = os.fstat(fd)
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            errors.append(f"{path}: owner uid {st.st_uid} has no account; not ingested")
            return
        seen = offsets.get(path) or {}
        # the same file as last time (inode numbers get reused: the bytes read then must match), not shorter
        start = int(seen.get("offset", 0))
        same = seen.get("inode") == st.st_ino and start <= st.st_size and seen.get("head") == _head(fd, start)
        start = start if same else 0
        os.lseek(fd, start, os.SEEK_SET)
        data = b""
        while len(data) < MAX_READ and (chunk := os.read(fd, min(1 << 20, MAX_READ - len(data)))):
            data += chunk
        end = data.rfind(b"\n") + 1         # a line still being written waits for the next run
        head = _head(fd, start + end)
    finally:
        os.close(fd)
    f = SpoolFile(path, owner, st.st_ino, start + end, head)
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            f.malformed += 1
            continue
        if isinstance(rec, dict):
            f.records.append(rec)
        else:
            f.malformed += 1
    files.append(f)


def ingest(site: Any, spool: Spool, state_fd: int, now: datetime, dry_run: bool) -> dict[str, Any]:
    from nagaya.errors import NagayaError
    from nagaya.sitedb.auditlog import spool_time
    from nagaya.sitedb.service import SiteService

    report: dict[str, Any] = {"files": len(spool.files), "ingested": 0, "duplicates": 0, "refused": 0,
                              "malformed": sum(f.malformed for f in spool.files), "errors": list(spool.errors)}
    offsets = _offsets(state_fd)
    for f in spool.files:
        for attempt in (1, 2):      # a copy forwarded at the same moment may win the unique id: look again
            counts = {"ingested": 0, "duplicates": 0, "refused": 0}
            try:
                with site.db.session() as s:
                    svc = SiteService(s)
                    for rec in f.records:
                        try:
                            new = svc.record_cli_event(f.owner, rec, f"spool:{rec.get('host', '')}",
                                               when=spool_time(rec, now))
                        except NagayaError:
                            counts["refused"] += 1          # e.g. a server-only action: never from a client
                            continue
                        counts["ingested" if new else "duplicates"] += 1
                    if dry_run:
                        s.rollback()
                break
            except IntegrityError:
                if attempt == 2:
                    raise
        for k, v in counts.items():
            report[k] += v
        offsets[f.path] = {"inode": f.inode, "offset": f.offset, "head": f.head}
    if not dry_run:
        safefs.write_at(state_fd, OFFSETS, (json.dumps(offsets, indent=1) + "\n").encode(), 0o600)
    return report
