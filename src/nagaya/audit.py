"""The append-only audit trail: one JSON object per line, written with O_APPEND so records never
interleave, to the user's log and, where the site configures it, a site spool and syslog.
`nagaya admin maintain` ingests the site spool into the server's one audit trail; the spool file's owner,
never the record's `user`, is who it is attributed to."""

from __future__ import annotations

import os
import time

from nagaya.record import Factory, Record

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any


class AuditEvent(Record):
    action: str                          # run, import, pull, push, submit, login, admin, ...
    user: str
    uid: int
    image: str = ""
    digest: str = ""
    command: list[str] = Factory(list)
    cwd: str = ""
    host: str = ""
    exit_code: int | None = None
    duration_s: float | None = None
    details: dict[str, Any] = Factory(dict)
    time: str = ""
    id: str = ""                         # random; `nagaya reproduce --run ID`, and the site's de-duplication

    def to_json(self) -> str:
        # Fixed at the first call: the user's log, the site spool and the server get the same record.
        if not self.time:
            self.time = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        if not self.id:
            self.id = os.urandom(6).hex()
        if not self.host:
            self.host = os.uname().nodename
        d = self.to_dict()
        from nagaya.runtime.fastjson import dumps_compact  # json.dumps without importing json

        return dumps_compact(d)


def _append(path: str | Path, line: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


_spool_fd: int | None = None


def open_spool(cfg: Any) -> None:
    """Open and check the site spool now, before `nagaya run` enters its user namespace: in there, root's
    directories show as owned by the overflow uid and can no longer be told apart from a stranger's."""
    global _spool_fd
    if cfg.audit.site_dir and _spool_fd is None:
        from nagaya import safefs

        try:
            _spool_fd = safefs.open_dir(cfg.audit.site_dir, last_shared=True)
        except (OSError, safefs.UnsafePath):
            _spool_fd = None


def record(event: AuditEvent, cfg: Any) -> None:
    """Append `event` everywhere configured. Auditing never makes the user's command fail."""
    line = event.to_json()
    try:
        _append(cfg.audit_file, line)
    except OSError:
        pass
    if cfg.audit.site_dir:
        # The spool is sticky and world-writable: USER.jsonl may have been taken first by someone else (their
        # file, a link, a FIFO). safefs.append_own writes only to a regular file of ours with one link, else
        # to the next free name; the site attributes each file to its owner, so any name of ours will do.
        from nagaya import safefs

        where = _spool_fd if _spool_fd is not None else cfg.audit.site_dir
        safefs.append_own(where, [f"{event.user}.jsonl", f"{event.user}.1.jsonl"], (line + "\n").encode())
    if cfg.audit.syslog:
        import socket

        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.connect("/dev/log")
            s.send(f"<86>nagaya[{os.getpid()}]: {line}".encode()[:8000])
            s.close()
        except OSError:
            pass


def read(path: str | Path) -> list[dict[str, Any]]:
    import json

    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue
    except FileNotFoundError:
        pass
    return out
