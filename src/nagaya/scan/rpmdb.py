"""rpm's package database in its SQLite form (rpm >= 4.16: /usr/lib/sysimage/rpm/rpmdb.sqlite, or
/var/lib/rpm/rpmdb.sqlite), read without rpm: each row of `Packages` is a header blob (big-endian: index
count, data length, 16-byte index entries of tag/type/offset/count, then the data), and rpm's version order
(rpmvercmp) for matching. The Berkeley DB form of older releases is not read."""

from __future__ import annotations

import re
import sqlite3
import struct
import tempfile

PATHS = ("usr/lib/sysimage/rpm/rpmdb.sqlite", "var/lib/rpm/rpmdb.sqlite")
TAGS = {1000: "name", 1001: "version", 1002: "release", 1003: "epoch", 1022: "arch", 1044: "sourcerpm"}
MAX_ENTRIES = 100_000


def parse_header(blob: bytes) -> dict[str, str]:
    """The fields nagaya needs from one header blob; {} when it is malformed."""
    if len(blob) < 8:
        return {}
    il, dl = struct.unpack(">II", blob[:8])
    start = 8 + 16 * il
    if il > MAX_ENTRIES or start + dl > len(blob):
        return {}
    data = blob[start:start + dl]
    out: dict[str, str] = {}
    for i in range(il):
        tag, typ, off, _count = struct.unpack(">iIiI", blob[8 + 16 * i:24 + 16 * i])
        name = TAGS.get(tag)
        if name is None or not 0 <= off < len(data):
            continue
        if typ in (6, 8, 9):                    # STRING, STRING_ARRAY, I18NSTRING: the first string
            end = data.find(b"\0", off)
            out[name] = data[off:end if end >= 0 else len(data)].decode(errors="replace")
        elif typ == 4 and off + 4 <= len(data):     # INT32
            out[name] = str(struct.unpack(">I", data[off:off + 4])[0])
    return out


def packages(db_bytes: bytes) -> list[dict[str, str]]:
    """Every package of an rpmdb.sqlite given as bytes (read from an image, opened from a private copy)."""
    with tempfile.NamedTemporaryFile(prefix="nagaya-rpmdb-", suffix=".sqlite") as f:
        f.write(db_bytes)
        f.flush()
        try:
            con = sqlite3.connect(f"file:{f.name}?mode=ro", uri=True)
            try:
                rows = con.execute("SELECT blob FROM Packages").fetchall()
            finally:
                con.close()
        except sqlite3.Error:
            return []
    out = []
    for (blob,) in rows:
        h = parse_header(bytes(blob)) if isinstance(blob, (bytes, memoryview)) else {}
        if h.get("name") and h.get("version"):
            out.append(h)
    return out


def evr(h: dict[str, str]) -> str:
    e = h.get("epoch", "")
    return (f"{e}:" if e and e != "0" else "") + h["version"] + (f"-{h['release']}" if h.get("release") else "")


def source_name(h: dict[str, str]) -> str:
    """`openssl-3.0.7-24.el9.src.rpm` -> `openssl`."""
    m = re.match(r"^(.+)-[^-]+-[^-]+\.(?:no)?src\.rpm$", h.get("sourcerpm", ""))
    return m.group(1) if m else h["name"]


def _segments(s: str) -> list[str]:
    return re.findall(r"~|\^|[0-9]+|[A-Za-z]+", s)


def rpmvercmp(a: str, b: str) -> int:
    """rpm's comparison of one version or release string (rpmio/rpmvercmp.c)."""
    if a == b:
        return 0
    sa, sb = _segments(a), _segments(b)
    i = 0
    while True:
        x = sa[i] if i < len(sa) else None
        y = sb[i] if i < len(sb) else None
        if x == "~" or y == "~":
            if x != y:
                return -1 if x == "~" else 1
        elif x == "^" or y == "^":
            if x is None:
                return -1
            if y is None:
                return 1
            if x != y:
                return -1 if x == "^" else 1        # a caret sorts before anything but the end
        elif x is None or y is None:
            return 0 if x == y else (-1 if x is None else 1)
        else:
            xn, yn = x.isdigit(), y.isdigit()
            if xn != yn:
                return 1 if xn else -1              # numbers are newer than letters
            if xn:
                xi, yi = int(x), int(y)
                if xi != yi:
                    return 1 if xi > yi else -1
            elif x != y:
                return 1 if x > y else -1
        i += 1


def compare(a: str, b: str) -> int:
    """EVR strings ([epoch:]version[-release])."""
    def split(s: str) -> tuple[int, str, str]:
        e, _, rest = s.rpartition(":") if ":" in s else ("0", "", s)
        v, _, r = rest.partition("-")
        return int(e or 0) if e.isdigit() else 0, v, r
    ea, va, ra = split(a)
    eb, vb, rb = split(b)
    if ea != eb:
        return 1 if ea > eb else -1
    c = rpmvercmp(va, vb)
    if c or not ra or not rb:
        return c
    return rpmvercmp(ra, rb)
