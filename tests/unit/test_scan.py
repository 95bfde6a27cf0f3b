"""nagaya.scan without a site: version order (dpkg's `~` and epochs, apk, PEP 440), the database import from
OSV and Debian tracker documents, inventory parsing (layers with whiteouts), matching and the SPDX document."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

from nagaya.errors import UsageError
from nagaya.scan import inventory, match, sbom, versions, vulndb
from tests.helpers import vulnfixture


@pytest.mark.parametrize(("a", "b", "want"), [
    ("1.0~rc1-1", "1.0-1", -1), ("1:0.9-1", "2.0-1", 1), ("3.0.11-1~deb12u1", "3.0.11-1", -1),
    ("3.0.11-1~deb12u1", "3.0.11-1~deb12u2", -1), ("1.0-1", "1.0-1", 0), ("1.0+b1", "1.0", 1), ("1.0~~", "1.0~", -1),
])
def test_debian_order(a: str, b: str, want: int) -> None:
    assert versions.debian(a, b) == want and versions.debian(b, a) == -want


@pytest.mark.parametrize(("a", "b", "want"), [
    ("1.2.3-r0", "1.2.3-r1", -1), ("1.2.3_rc1", "1.2.3", -1), ("1.2.3_p1", "1.2.3", 1), ("1.10", "1.9", 1),
    ("1.2a", "1.2", 1), ("3.0.8-r0", "3.0.10-r0", -1), ("1.2_alpha1", "1.2_beta1", -1), ("2.0", "2.0", 0),
    ("1.01", "1.1", -1),
])
def test_apk_order(a: str, b: str, want: int) -> None:
    assert versions.apk(a, b) == want and versions.apk(b, a) == -want


def test_pep440_order() -> None:
    assert versions.pep440("2.31.0", "2.4.0") == 1 and versions.pep440("1.0rc1", "1.0") == -1
    assert versions.comparator("PyPI")("1.0.post1", "1.0") == 1


def test_cvss3() -> None:
    assert vulndb._cvss3_severity("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H") == "critical"      # 9.8
    assert vulndb._cvss3_severity("CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:C/C:H/I:N/A:N") == "medium"        # 6.1
    assert vulndb._cvss3_severity("CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N") == "medium"        # 5.5
    assert vulndb._cvss3_severity("nonsense") == "unknown"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("vulndb")
    src = vulnfixture.write_db(d / "src")
    path = str(d / "vulndb.sqlite")
    st = vulndb.update(path, [str(src)])
    assert st["advisories"] == 13 and "Debian:12" in st["ecosystems"] and "PyPI" in st["ecosystems"]
    return path


def test_update_refuses_nothing(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UsageError, match="no advisories"):
        vulndb.update(str(tmp_path / "db.sqlite"), [str(tmp_path / "x.json")])
    assert not (tmp_path / "db.sqlite").exists() and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    with pytest.raises(UsageError, match="not JSON"):
        (tmp_path / "y.json").write_text("{")
        vulndb.update(str(tmp_path / "db.sqlite"), [str(tmp_path / "y.json")])


def _layer_files() -> dict[str, bytes]:
    return inventory.layer_files([lambda data=data: io.BytesIO(data) for data in reversed(vulnfixture.layers(False))])


def test_inventory_from_layers() -> None:
    inv = inventory.build(_layer_files())
    assert inv.distro == "Debian:12"
    got = {(p.type, p.name, p.version, p.source, p.source_version) for p in inv.packages}
    assert got == {("deb", "libssl3", "3.0.11-1~deb12u1", "openssl", "3.0.11-1~deb12u1"),
                   ("deb", "bash", "5.2.15-2+b2", "bash", "5.2.15-2"),
                   ("deb", "libfoo1", "1:1.0-1", "libfoo", "1:1.0-1"),
                   ("deb", "zlib1g", "1:1.2.13.dfsg-1", "zlib", "1:1.2.13.dfsg-1"),
                   ("pypi", "requests", "2.30.0", "", "")}           # urllib3 is whited out, ghost replaced


def test_expected_findings(db: str) -> None:
    inv = inventory.build(_layer_files())
    with vulndb.VulnDB(db) as v:
        findings = match.scan(inv, v)
    assert {(f.id, f.package, f.installed, f.fixed, f.severity) for f in findings} == vulnfixture.EXPECTED
    assert match.fixable(findings) == 4 and match.counts(findings)["high"] == 2
    assert findings[0].severity == "high"


def test_apk_inventory_and_match(tmp_path: Path) -> None:
    inst = b"C:Q1x=\nP:musl\nV:1.2.4-r1\nA:x86_64\no:musl\nL:MIT\n\nC:Q1y=\nP:libcrypto3\nV:3.1.4-r0\no:openssl\n\n"
    inv = inventory.build({"lib/apk/db/installed": inst,
                           "etc/os-release": b'ID=alpine\nVERSION_ID=3.18.4\n'})
    assert inv.distro == "Alpine:v3.18" and [p.source for p in inv.packages] == ["musl", "openssl"]
    (tmp_path / "a.json").write_text(json.dumps(vulnfixture.osv("ALPINE-CVE-1", "Alpine:v3.18", "openssl",
                                                                [{"introduced": "0"}, {"fixed": "3.1.4-r1"}])))
    (tmp_path / "b.json").write_text(json.dumps(vulnfixture.osv("ALPINE-CVE-2", "Alpine:v3.18", "musl",
                                                                [{"introduced": "0"}, {"fixed": "1.2.4-r1"}])))
    vulndb.update(str(tmp_path / "db"), [str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    with vulndb.VulnDB(str(tmp_path / "db")) as v:
        assert [(f.id, f.package, f.fixed) for f in match.scan(inv, v)] == [("ALPINE-CVE-1", "libcrypto3", "3.1.4-r1")]


def test_spdx() -> None:
    inv = inventory.build(_layer_files())
    doc = sbom.spdx(inv, "reg/x/y:1", "sha256:" + "a" * 64)
    assert doc["spdxVersion"] == "SPDX-2.3" and len(doc["packages"]) == 6
    purls = {r["referenceLocator"] for p in doc["packages"] for r in p.get("externalRefs", [])}
    assert "pkg:deb/debian/libssl3@3.0.11-1~deb12u1?arch=amd64&distro=debian-12&upstream=openssl" in purls
    assert "pkg:pypi/requests@2.30.0" in purls
    ids = {p["SPDXID"] for p in doc["packages"]}
    assert all(r["relatedSpdxElement"] in ids for r in doc["relationships"])


def test_vuln_block_rules() -> None:
    from nagaya.trust import gate

    rules = [{"scope": "*", "severity": "critical"}, {"scope": "reg:5000/lab", "severity": "high"}]
    assert gate._vuln_rule(rules, "reg:5000/lab/x")[0] == 1
    assert gate._vuln_rule(rules, "reg:5000/labx/y")[0] == 0
    assert gate._vuln_rule(rules, "")[0] == 0                                  # a local-only image: "*"
    assert gate._vuln_rule(rules[1:], "other/x") is None
    for bad in ({"scope": "*"}, {"scope": "*", "severity": "severe"}, {"severity": "high"},
                {"scope": "*", "severity": "high", "except": "CVE-1"}):
        with pytest.raises(UsageError, match="vuln_block rule 1"):
            gate._vuln_rule([bad], "x")


def _rpm_header(fields: list[tuple[int, int, bytes]]) -> bytes:
    """A header blob as rpm stores it in rpmdb.sqlite: index entries, then the data store."""
    index, data = b"", b""
    for tag, typ, value in fields:
        if typ == 4:
            data += b"\0" * (-len(data) % 4)            # INT32 is aligned
        index += struct.pack(">iIiI", tag, typ, len(data), 1)
        data += value
    return struct.pack(">II", len(fields), len(data)) + index + data


@pytest.mark.parametrize(("a", "b", "want"), [
    ("1.0", "1.0", 0), ("1.0", "1.1", -1), ("1.0a", "1.0", 1), ("1.0~rc1", "1.0", -1), ("1.0^git1", "1.0", 1),
    ("1.0^git1", "1.0.1", -1), ("2.10", "2.9", 1), ("1.a", "1.1", -1), ("1:1.0-1", "2.0-1", 1),
    ("3.0.7-24.el9", "3.0.7-25.el9_3", -1), ("3.0.7-25.el9_3", "3.0.7-25.el9_3", 0),
])
def test_rpm_order(a: str, b: str, want: int) -> None:
    from nagaya.scan import rpmdb

    assert rpmdb.compare(a, b) == want and rpmdb.compare(b, a) == -want


def test_rpmdb_sqlite(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "rpmdb.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, blob BLOB NOT NULL)")
    for name, ver, rel, epoch, src in (("openssl-libs", "3.0.7", "24.el9", 1, "openssl-3.0.7-24.el9.src.rpm"),
                                       ("bash", "5.1.8", "6.el9", None, "bash-5.1.8-6.el9.src.rpm")):
        fields = [(1000, 6, name.encode() + b"\0"), (1001, 6, ver.encode() + b"\0"), (1002, 6, rel.encode() + b"\0"),
                  (1022, 6, b"x86_64\0"), (1044, 6, src.encode() + b"\0")]
        if epoch is not None:
            fields.append((1003, 4, struct.pack(">I", epoch)))
        con.execute("INSERT INTO Packages (blob) VALUES (?)", (_rpm_header(fields),))
    con.execute("INSERT INTO Packages (blob) VALUES (?)", (b"\xff\xff\xff\xff garbage",))
    con.commit()
    con.close()
    inv = inventory.build({"usr/lib/sysimage/rpm/rpmdb.sqlite": path.read_bytes(),
                           "etc/os-release": b'ID="rocky"\nVERSION_ID="9.3"\n'})
    assert inv.distro == "Rocky Linux:9"
    assert {(p.name, p.version, p.source) for p in inv.packages} == {
        ("openssl-libs", "1:3.0.7-24.el9", "openssl"), ("bash", "5.1.8-6.el9", "bash")}
    (tmp_path / "a.json").write_text(json.dumps(vulnfixture.osv(
        "RLSA-2024:1", "Rocky Linux:9", "openssl", [{"introduced": "0"}, {"fixed": "1:3.0.7-25.el9_3"}],
        aliases=["CVE-2024-0001"])))
    (tmp_path / "b.json").write_text(json.dumps(vulnfixture.osv(
        "RLSA-2024:2", "Rocky Linux:9", "bash", [{"introduced": "0"}, {"fixed": "5.1.8-6.el9"}])))
    vulndb.update(str(tmp_path / "db"), [str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    with vulndb.VulnDB(str(tmp_path / "db")) as v:
        assert [(f.id, f.package, f.fixed) for f in match.scan(inv, v)] == [
            ("CVE-2024-0001", "openssl-libs", "1:3.0.7-25.el9_3")]
