"""A small Debian-12-like image with known package versions, and a vulnerability database fixture in the real
formats (OSV JSON documents, one per advisory, zipped like OSV's all.zip; Debian's security tracker JSON),
with exactly the findings EXPECTED: a fixed-version boundary, an epoch, `~` versions, a binNMU's source
version, an open (unfixed) issue, a removed package, another release, PyPI with a CVSS vector, and files
hidden by an upper layer's whiteout."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from tests.helpers import images

OS_RELEASE = b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n'


def _para(name: str, version: str, source: str = "", status: str = "install ok installed") -> str:
    src = f"Source: {source}\n" if source else ""
    return (f"Package: {name}\nStatus: {status}\nPriority: optional\nSection: libs\nInstalled-Size: 100\n"
            f"Maintainer: Debian <debian@example.org>\nArchitecture: amd64\n{src}Version: {version}\n"
            f"Description: {name}\n a test package\n .\n with a long description\n")


DPKG_STATUS = "\n".join([
    _para("libssl3", "3.0.11-1~deb12u1", "openssl"),
    _para("bash", "5.2.15-2+b2", "bash (5.2.15-2)"),                # a binNMU: advisories name the source version
    _para("libfoo1", "1:1.0-1", "libfoo"),                          # an epoch
    _para("zlib1g", "1:1.2.13.dfsg-1", "zlib"),
    _para("oldpkg", "1.0-1", status="deinstall ok config-files"),   # removed: not installed
]).encode()
LOWER_STATUS = _para("ghost", "0.1-1").encode()                     # replaced by the upper layer's status


def metadata(name: str, version: str) -> bytes:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: x\n\nbody\n".encode()


def layers(busybox: bool = True) -> list[bytes]:
    sp = "usr/lib/python3/dist-packages"
    lower = [images.entry("etc/", "dir"), images.entry("etc/os-release", "file", OS_RELEASE),
             images.entry("var/", "dir"), images.entry("var/lib/", "dir"), images.entry("var/lib/dpkg/", "dir"),
             images.entry("var/lib/dpkg/status", "file", LOWER_STATUS),
             images.entry("usr/", "dir"), images.entry("usr/lib/", "dir"), images.entry("usr/lib/python3/", "dir"),
             images.entry(f"{sp}/", "dir"),
             images.entry(f"{sp}/urllib3-1.0.dist-info/", "dir"),
             images.entry(f"{sp}/urllib3-1.0.dist-info/METADATA", "file", metadata("urllib3", "1.0"))]
    if busybox:
        lower = [images.entry("bin/", "dir"),
                 images.entry("bin/busybox", "file", Path("/bin/busybox").read_bytes(), mode=0o755), *lower]
    upper = [images.entry("var/lib/dpkg/status", "file", DPKG_STATUS),
             images.entry(f"{sp}/.wh.urllib3-1.0.dist-info", "file"),
             images.entry(f"{sp}/requests-2.30.0.dist-info/", "dir"),
             images.entry(f"{sp}/requests-2.30.0.dist-info/METADATA", "file", metadata("requests", "2.30.0"))]
    return [images.tar_bytes(lower), images.tar_bytes(upper)]


def osv(ident: str, eco: str, name: str, events: list[dict], **extra) -> dict:
    aff = {"package": {"ecosystem": eco, "name": name}, "ranges": [{"type": "ECOSYSTEM", "events": events}]}
    aff.update(extra.pop("affected_extra", {}))
    return {"schema_version": "1.6.0", "id": ident, "modified": "2024-01-01T00:00:00Z", "affected": [aff], **extra}


def write_db(d: Path) -> Path:
    """OSV exports (Debian:12 all.zip, PyPI as loose JSON files) and a tracker JSON under `d`."""
    d.mkdir(parents=True, exist_ok=True)
    deb = [
        osv("DEBIAN-CVE-2023-0001", "Debian:12", "openssl", [{"introduced": "0"}, {"fixed": "3.0.11-1~deb12u2"}],
            upstream=["CVE-2023-0001"], affected_extra={"ecosystem_specific": {"urgency": "high"}}),
        # the boundary: fixed in exactly the installed version
        osv("DEBIAN-CVE-2023-0002", "Debian:12", "openssl", [{"introduced": "0"}, {"fixed": "3.0.11-1~deb12u1"}],
            upstream=["CVE-2023-0002"], affected_extra={"ecosystem_specific": {"urgency": "high"}}),
        # another release
        osv("DEBIAN-CVE-2023-0009", "Debian:11", "openssl", [{"introduced": "0"}, {"fixed": "9.9-1"}],
            upstream=["CVE-2023-0009"]),
        osv("DEBIAN-CVE-2023-0012", "Debian:12", "oldpkg", [{"introduced": "0"}, {"fixed": "2.0-1"}],
            upstream=["CVE-2023-0012"]),
        osv("DEBIAN-CVE-2023-0013", "Debian:12", "ghost", [{"introduced": "0"}, {"fixed": "1.0-1"}],
            upstream=["CVE-2023-0013"]),
    ]
    with zipfile.ZipFile(d / "all.zip", "w") as z:
        for doc in deb:
            z.writestr(f"{doc['id']}.json", json.dumps(doc))
    pypi = d / "pypi"
    pypi.mkdir(exist_ok=True)
    for doc in [
        osv("GHSA-j8r2-6x86-q33q", "PyPI", "requests", [{"introduced": "2.3.0"}, {"fixed": "2.31.0"}],
            aliases=["CVE-2023-32681"],
            severity=[{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:C/C:H/I:N/A:N"}]),
        osv("GHSA-aaaa-bbbb-cccc", "PyPI", "Requests", [{"introduced": "0"}, {"fixed": "2.30.0"}],
            aliases=["CVE-2023-0020"], database_specific={"severity": "HIGH"}),
        osv("GHSA-dddd-eeee-ffff", "PyPI", "urllib3", [{"introduced": "0"}, {"fixed": "2.0"}],
            aliases=["CVE-2023-0021"], database_specific={"severity": "HIGH"}),
    ]:
        (pypi / f"{doc['id']}.json").write_text(json.dumps(doc))
    rel = lambda status, fixed, urgency: {"releases": {"bookworm": {  # noqa: E731
        "status": status, "fixed_version": fixed, "urgency": urgency, "repositories": {"bookworm": fixed}}},
        "description": "test issue", "scope": "local"}
    tracker = {
        # `~`: 3.0.11-1~deb12u1 sorts before 3.0.11-1
        "openssl": {"CVE-2023-0003": rel("resolved", "3.0.11-1", "high"),
                    "CVE-2023-0001": rel("resolved", "3.0.11-1~deb12u2", "medium")},
        "bash": {"CVE-2023-0004": rel("resolved", "5.2.15-2", "high")},
        # the epoch: 1:1.0-1 is newer than 2.0-1, older than 1:1.1-1
        "libfoo": {"CVE-2023-0010": rel("resolved", "2.0-1", "high"),
                   "CVE-2023-0011": rel("resolved", "1:1.1-1", "medium")},
        "zlib": {"CVE-2023-0005": rel("open", None, "unimportant"),
                 "CVE-2023-0006": rel("resolved", "0", "high")},         # "0": never affected
    }
    (d / "tracker.json").write_text(json.dumps(tracker))
    return d


# (id, package, installed, fixed, severity)
EXPECTED = {
    ("CVE-2023-0001", "libssl3", "3.0.11-1~deb12u1", "3.0.11-1~deb12u2", "high"),
    ("CVE-2023-0003", "libssl3", "3.0.11-1~deb12u1", "3.0.11-1", "high"),
    ("CVE-2023-0011", "libfoo1", "1:1.0-1", "1:1.1-1", "medium"),
    ("CVE-2023-0005", "zlib1g", "1:1.2.13.dfsg-1", "", "negligible"),
    ("CVE-2023-32681", "requests", "2.30.0", "2.31.0", "medium"),
}


def findings_set(report: dict) -> set[tuple[str, str, str, str, str]]:
    return {(f["id"], f["package"], f["installed"], f["fixed"], f["severity"]) for f in report["findings"]}
