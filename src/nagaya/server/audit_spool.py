"""The site audit spool (`[audit] site_dir`) into the server's one audit trail, by `nagaya admin maintain`.

Every `nagaya` command (above all `nagaya run`, which never talks to the server: its start-up path stays
lean) appends its record to `SITE_DIR/USER.jsonl`. The spool dir is sticky and world-writable, so a user
can create and append to files of their own only: a record is attributed to the **owner of its file**,
never to the `user` it claims. Ingestion is idempotent: each record has an id, and the trail's unique
event id (actor + record id) drops copies already there (a second run, or the copy `pull`/`submit` sent
at once). Offsets per file (inode, first bytes, bytes read) spare re-reading; a file replaced or truncated
is read again from its start, and its known records are dropped as copies.

Reading happens as root, before maintenance drops to the service account (the files are 0600)."""

from __future__ import annotations

import json
import os
import pwd
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

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


def read(site_dir: str, state_dir: Path) -> Spool:
    try:
        offsets: dict[str, Any] = json.loads((state_dir / OFFSETS).read_text())
    except (OSError, ValueError):
        offsets = {}
    files: list[SpoolFile] = []
    errors: list[str] = []
    try:
        names = sorted(os.listdir(site_dir))
    except OSError as e:
        return Spool([], [f"{site_dir}: {e.strerror}"])
    for name in names:
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(site_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            errors.append(f"{path}: {e.strerror}")
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                errors.append(f"{path}: owner uid {st.st_uid} has no account; not ingested")
                continue
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
    return Spool(files, errors)


def ingest(site: Any, spool: Spool, state_dir: Path, now: datetime, dry_run: bool) -> dict[str, Any]:
    from nagaya.errors import NagayaError
    from nagaya.store import lifecycle
    from nagaya.store.service import SiteService

    report: dict[str, Any] = {"files": len(spool.files), "ingested": 0, "duplicates": 0, "refused": 0,
                              "malformed": sum(f.malformed for f in spool.files), "errors": list(spool.errors)}
    offsets: dict[str, Any] = {}
    try:
        offsets = json.loads((state_dir / OFFSETS).read_text())
    except (OSError, ValueError):
        pass
    for f in spool.files:
        for attempt in (1, 2):      # a copy forwarded at the same moment may win the unique id: look again
            counts = {"ingested": 0, "duplicates": 0, "refused": 0}
            try:
                with site.db.session() as s:
                    svc = SiteService(s)
                    for rec in f.records:
                        try:
                            new = lifecycle.record_cli_event(svc, f.owner, rec, f"spool:{rec.get('host', '')}",
                                                             when=lifecycle.spool_time(rec, now))
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
        tmp = state_dir / (OFFSETS + ".tmp")
        tmp.write_text(json.dumps(offsets, indent=1) + "\n")
        os.replace(tmp, state_dir / OFFSETS)
    return report
