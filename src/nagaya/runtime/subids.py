"""Subordinate id ranges (/etc/subuid, /etc/subgid), needed by the runc backend and by builds."""

from __future__ import annotations


def ranges(path: str, name: str, uid: int) -> list[tuple[int, int]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (name, str(uid)) and parts[1].isdigit() and parts[2].isdigit():
                    out.append((int(parts[1]), int(parts[2])))
    except OSError:
        pass
    return out


def lookup(path: str, name: str, uid: int) -> int | None:
    """The first id of the user's first range, or None."""
    r = ranges(path, name, uid)
    return r[0][0] if r else None


def suggest_line(name: str, existing_paths: tuple[str, ...] = ("/etc/subuid", "/etc/subgid"),
                 count: int = 65536) -> str:
    """A free range for `name`, as an /etc/subuid line (the admin adds the same to /etc/subgid)."""
    top = 100000
    for path in existing_paths:
        try:
            with open(path) as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                        top = max(top, int(parts[1]) + int(parts[2]))
        except OSError:
            pass
    return f"{name}:{top}:{count}"
