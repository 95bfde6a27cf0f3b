"""The site's offline vulnerability database: OSV JSON exports and/or Debian's security tracker JSON, imported
into one indexed SQLite file that scans read (`nagaya admin vulndb update|status`).

Sources (a directory, a file, or an http(s) URL of one):
  - OSV: one JSON document per advisory (a directory tree of *.json, or OSV's per-ecosystem all.zip);
  - Debian's tracker (https://security-tracker.debian.org/tracker/data/json): {source package: {CVE:
    {"releases": {codename: {"status", "fixed_version", "urgency"}}}}}; each release becomes "Debian:N".
The new database is written beside the old one and renamed over it: scans never see half an import.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nagaya.errors import UsageError

SEVERITIES = ("unknown", "negligible", "low", "medium", "high", "critical")
RANK = {s: i for i, s in enumerate(SEVERITIES)}
DEBIAN_RELEASES = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13", "forky": "14", "sid": "sid"}
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE affected (
    id TEXT NOT NULL,           -- the advisory (a CVE when it has one)
    ecosystem TEXT NOT NULL,    -- OSV's: Debian:12, Alpine:v3.18, PyPI
    package TEXT NOT NULL,      -- Debian: the source package; PyPI: the normalized name
    introduced TEXT NOT NULL,   -- "0": from the beginning
    fixed TEXT,                 -- NULL: no fix yet
    last_affected TEXT,
    versions TEXT,              -- JSON list of explicitly affected versions (OSV "versions"), or NULL
    severity TEXT NOT NULL,
    summary TEXT NOT NULL
);
CREATE INDEX affected_pkg ON affected (ecosystem, package);
"""


def normalize_severity(text: Any) -> str:
    t = str(text or "").strip().lower()
    if t in ("moderate",):
        return "medium"
    if t in ("important",):
        return "high"
    if t in ("unimportant", "not yet assigned", "end-of-life", ""):
        return "negligible" if t == "unimportant" else "unknown"
    return t if t in RANK else "unknown"


def pypi_name(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Row:
    id: str
    ecosystem: str
    package: str
    introduced: str
    fixed: str | None
    last_affected: str | None
    versions: list[str] | None
    severity: str
    summary: str


def _osv_id(doc: dict[str, Any]) -> str:
    ident = str(doc.get("id") or "")
    if ident.startswith("CVE-"):
        return ident
    for a in doc.get("aliases") or []:
        if isinstance(a, str) and a.startswith("CVE-"):
            return a
    up = [a for a in doc.get("upstream") or [] if isinstance(a, str) and a.startswith("CVE-")]
    return up[0] if len(up) == 1 else ident


def _cvss3_severity(vector: str) -> str:
    """The qualitative rating of a CVSS v3 base vector (FIRST's formula)."""
    import math

    m = dict(p.split(":", 1) for p in vector.split("/")[1:] if ":" in p)
    try:
        av = {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2}[m["AV"]]
        ac = {"L": 0.77, "H": 0.44}[m["AC"]]
        changed = m["S"] == "C"
        pr = {"N": 0.85, "L": 0.68 if changed else 0.62, "H": 0.5 if changed else 0.27}[m["PR"]]
        ui = {"N": 0.85, "R": 0.62}[m["UI"]]
        c, i, a = ({"H": 0.56, "L": 0.22, "N": 0.0}[m[k]] for k in ("C", "I", "A"))
    except KeyError:
        return "unknown"
    iss = 1 - (1 - c) * (1 - i) * (1 - a)
    impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if changed else 6.42 * iss
    expl = 8.22 * av * ac * pr * ui
    if impact <= 0:
        return "negligible"
    score = min((1.08 if changed else 1) * (impact + expl), 10)
    score = math.ceil(score * 10 - 1e-9) / 10
    return "critical" if score >= 9 else "high" if score >= 7 else "medium" if score >= 4 else "low"


def _osv_severity(doc: dict[str, Any], aff: dict[str, Any]) -> str:
    for src in (aff.get("ecosystem_specific") or {}, aff.get("database_specific") or {},
                doc.get("database_specific") or {}):
        for key in ("severity", "urgency"):
            if isinstance(src, dict) and src.get(key):
                s = normalize_severity(src[key])
                if s != "unknown":
                    return s
    for sev in (aff.get("severity") or []) + (doc.get("severity") or []):
        if isinstance(sev, dict) and str(sev.get("type")) == "CVSS_V3":
            return _cvss3_severity(str(sev.get("score") or ""))
    return "unknown"


def osv_rows(doc: dict[str, Any]) -> Iterator[Row]:
    if not isinstance(doc, dict) or doc.get("withdrawn"):
        return
    ident = _osv_id(doc)
    summary = str(doc.get("summary") or doc.get("details") or "")[:300]
    for aff in doc.get("affected") or []:
        if not isinstance(aff, dict):
            continue
        pkg = aff.get("package") or {}
        eco, name = str(pkg.get("ecosystem") or ""), str(pkg.get("name") or "")
        if not eco or not name:
            continue
        if eco == "PyPI":
            name = pypi_name(name)
        sev = _osv_severity(doc, aff)
        versions = [str(v) for v in aff.get("versions") or []] or None
        ranges = [r for r in aff.get("ranges") or [] if isinstance(r, dict) and r.get("type") in ("ECOSYSTEM",)]
        made = False
        for r in ranges:
            intro: str | None = None
            for ev in r.get("events") or []:
                if "introduced" in ev:
                    intro = str(ev["introduced"])
                elif intro is not None and ("fixed" in ev or "last_affected" in ev):
                    yield Row(ident, eco, name, intro, str(ev["fixed"]) if "fixed" in ev else None,
                              str(ev["last_affected"]) if "last_affected" in ev else None, None, sev, summary)
                    intro, made = None, True
            if intro is not None:                   # introduced and never fixed
                yield Row(ident, eco, name, intro, None, None, None, sev, summary)
                made = True
        if not made and versions:
            yield Row(ident, eco, name, "", None, None, versions, sev, summary)


def tracker_rows(data: dict[str, Any]) -> Iterator[Row]:
    for pkg, cves in data.items():
        if not isinstance(cves, dict):
            continue
        for cve, info in cves.items():
            if not isinstance(info, dict) or not str(cve).startswith(("CVE-", "TEMP-")):
                continue
            summary = str(info.get("description") or "")[:300]
            for codename, rel in (info.get("releases") or {}).items():
                number = DEBIAN_RELEASES.get(str(codename))
                if number is None or not isinstance(rel, dict):
                    continue
                status, fixed = rel.get("status"), rel.get("fixed_version")
                sev = normalize_severity(rel.get("urgency"))
                if status == "resolved" and fixed and fixed != "0":
                    yield Row(str(cve), f"Debian:{number}", str(pkg), "0", str(fixed), None, None, sev, summary)
                elif status == "open":
                    yield Row(str(cve), f"Debian:{number}", str(pkg), "0", None, None, None, sev, summary)


def _json_docs(name: str, data: bytes) -> Iterator[tuple[str, Any]]:
    try:
        yield name, json.loads(data)
    except ValueError:
        raise UsageError(f"{name}: not JSON") from None


def _from_zip(name: str, data: bytes) -> Iterator[tuple[str, Any]]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UsageError(f"{name}: not a zip file") from None
    for info in zf.infolist():
        if info.filename.endswith(".json") and not info.is_dir():
            yield from _json_docs(f"{name}!{info.filename}", zf.read(info))


def _documents(source: str) -> Iterator[tuple[str, Any]]:
    if source.startswith(("http://", "https://")):
        import httpx

        try:
            r = httpx.get(source, timeout=300, follow_redirects=True)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise UsageError(f"{source}: {e}") from None
        yield from (_from_zip if source.endswith(".zip") or r.content[:2] == b"PK" else _json_docs)(source, r.content)
        return
    p = Path(source)
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in (".json", ".zip"))
        if not files:
            raise UsageError(f"{source}: no .json or .zip files")
    elif p.is_file():
        files = [p]
    else:
        raise UsageError(f"{source}: no such file or directory")
    for f in files:
        data = f.read_bytes()
        yield from (_from_zip if f.suffix == ".zip" else _json_docs)(str(f), data)


def rows_of(doc: Any) -> Iterator[Row]:
    """An OSV advisory, or a tracker document (a mapping of package -> CVE -> info)."""
    if isinstance(doc, dict) and ("affected" in doc or "schema_version" in doc) and "id" in doc:
        yield from osv_rows(doc)
    elif isinstance(doc, list):                 # some exports bundle advisories in a list
        for d in doc:
            yield from osv_rows(d)
    elif isinstance(doc, dict):
        yield from tracker_rows(doc)


def update(db_path: str, sources: list[str]) -> dict[str, Any]:
    """Import `sources` into a new database that replaces `db_path` when complete; returns its status."""
    if not sources:
        raise UsageError("vulndb update: give --from DIR|FILE|URL")
    target = Path(db_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        con = sqlite3.connect(tmp)
        con.executescript(_SCHEMA)
        advisories: set[str] = set()
        n = 0
        for source in sources:
            for _name, doc in _documents(source):
                batch = [(r.id, r.ecosystem, r.package, r.introduced, r.fixed, r.last_affected,
                          json.dumps(r.versions) if r.versions else None, r.severity, r.summary) for r in rows_of(doc)]
                con.executemany("INSERT INTO affected VALUES (?,?,?,?,?,?,?,?,?)", batch)
                advisories.update(b[0] for b in batch)
                n += len(batch)
        if not n:
            raise UsageError(f"{', '.join(sources)}: no advisories found (OSV JSON or Debian tracker JSON)")
        ecosystems = [e for (e,) in con.execute("SELECT DISTINCT ecosystem FROM affected ORDER BY 1")]
        meta = {"source": " ".join(sources), "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "advisories": str(len(advisories)), "entries": str(n), "ecosystems": " ".join(ecosystems)}
        con.executemany("INSERT INTO meta VALUES (?,?)", meta.items())
        con.commit()
        con.close()
        os.chmod(tmp, 0o644)                    # every user's scan (and the run-time policy) reads it
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return status(db_path)


class VulnDB:
    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise UsageError(f"no vulnerability database at {path} (an admin imports one: "
                             "nagaya admin vulndb update --from DIR|URL)")
        self.path = path
        self.con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> VulnDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT key, value FROM meta"))

    def entries(self, ecosystem: str, package: str) -> list[Row]:
        out = []
        for r in self.con.execute("SELECT id, ecosystem, package, introduced, fixed, last_affected, versions, "
                                  "severity, summary FROM affected WHERE ecosystem = ? AND package = ?",
                                  (ecosystem, package)):
            out.append(Row(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None, r[7], r[8]))
        return out


def status(db_path: str) -> dict[str, Any]:
    with VulnDB(db_path) as db:
        m = db.meta()
    return {"path": db_path, "source": m.get("source", ""), "updated": m.get("updated", ""),
            "advisories": int(m.get("advisories", 0)), "entries": int(m.get("entries", 0)),
            "ecosystems": m.get("ecosystems", "").split()}


def stamp(db_path: str) -> str:
    """What identifies this database's content for cached verdicts (inode, size, mtime)."""
    try:
        st = os.stat(db_path)
    except OSError:
        return "-"
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
