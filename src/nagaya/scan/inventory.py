"""What an image has installed, read from its files without running it: the dpkg status database (and
distroless status.d), apk's installed database, Python dist-info/egg-info METADATA, and /etc/os-release
for the distribution the advisories are keyed by.

Two ways in: a cached image's squashfs (rdsquashfs lists it and reads single files; nothing is unpacked)
or a registry image's layer tars (read top layer first so whiteouts and upper files win).
"""

from __future__ import annotations

import email.parser
import posixpath
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import IO

from nagaya.errors import ImageError

MAX_FILE = 64 << 20                 # a dpkg status is a few MB; anything past this is not a package database
MAX_TOTAL = 256 << 20               # all the files read from one image (the server reads pushed images)
MAX_FILES = 20000
DPKG_STATUS = "var/lib/dpkg/status"
DPKG_STATUS_D = "var/lib/dpkg/status.d/"
APK_INSTALLED = "lib/apk/db/installed"
OS_RELEASE = ("etc/os-release", "usr/lib/os-release")
RPMDB = ("usr/lib/sysimage/rpm/rpmdb.sqlite", "var/lib/rpm/rpmdb.sqlite")
_PY_META = re.compile(r"(^|/)(site|dist)-packages/[^/]+\.(dist-info/METADATA|egg-info/PKG-INFO|egg-info)$")


def wanted(path: str) -> bool:
    """Whether a file of the image is one the inventory reads (paths without a leading slash)."""
    return (path in (DPKG_STATUS, APK_INSTALLED, *RPMDB) or path.startswith(DPKG_STATUS_D) or path in OS_RELEASE
            or bool(_PY_META.search(path)))


@dataclass
class Package:
    type: str                       # deb | apk | rpm | pypi
    name: str
    version: str
    source: str = ""                # deb: the source package (advisories name it); apk: the origin
    source_version: str = ""
    arch: str = ""
    path: str = ""                  # pypi: where its metadata is
    license: str = ""

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v}


@dataclass
class Inventory:
    distro: str = ""                # the OSV ecosystem of the OS packages: Debian:12, Alpine:v3.18
    os_name: str = ""
    packages: list[Package] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"distro": self.distro, "os": self.os_name, "packages": [p.to_json() for p in self.packages]}

    @classmethod
    def from_json(cls, obj: dict) -> Inventory:
        return cls(str(obj.get("distro", "")), str(obj.get("os", "")),
                   [Package(**p) for p in obj.get("packages") or [] if isinstance(p, dict)])


def _paragraphs(text: str) -> Iterable[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        if fields:
            yield fields


def parse_dpkg_status(text: str) -> list[Package]:
    out = []
    for p in _paragraphs(text):
        if "Package" not in p or "Version" not in p:
            continue
        status = p.get("Status", "install ok installed").split()
        if status[-1:] != ["installed"]:
            continue
        src, src_ver = p["Package"], p["Version"]
        if p.get("Source"):
            m = re.match(r"^(\S+)(?:\s+\((\S+)\))?", p["Source"])
            if m:
                src = m.group(1)
                src_ver = m.group(2) or src_ver
        out.append(Package("deb", p["Package"], p["Version"], src, src_ver, p.get("Architecture", "")))
    return out


def parse_apk_installed(text: str) -> list[Package]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        f: dict[str, str] = {}
        for line in block.splitlines():
            if len(line) > 2 and line[1] == ":" and line[0] not in f:
                f[line[0]] = line[2:]
        if "P" in f and "V" in f:
            out.append(Package("apk", f["P"], f["V"], f.get("o", f["P"]), f["V"], f.get("A", ""),
                               license=f.get("L", "")))
    return out


def parse_python_metadata(text: str, path: str) -> Package | None:
    msg = email.parser.Parser().parsestr(text, headersonly=True)
    name, version = msg.get("Name"), msg.get("Version")
    if not name or not version:
        return None
    return Package("pypi", str(name).strip(), str(version).strip(), path=path,
                   license=str(msg.get("License-Expression") or msg.get("License") or "").strip()[:200])


def parse_os_release(text: str) -> tuple[str, str]:
    """(OSV ecosystem, pretty name) from os-release."""
    kv = {}
    for line in text.splitlines():
        k, eq, v = line.partition("=")
        if eq:
            kv[k.strip()] = v.strip().strip('"\'')
    ident, ver = kv.get("ID", ""), kv.get("VERSION_ID", "")
    pretty = kv.get("PRETTY_NAME", ident)
    if ident == "debian":
        return (f"Debian:{ver.split('.')[0]}" if ver else "Debian:sid"), pretty
    if ident == "alpine" and ver:
        return "Alpine:v" + ".".join(ver.split(".")[:2]), pretty
    if ident == "ubuntu" and ver:
        return f"Ubuntu:{ver}", pretty
    rpm_names = {"rocky": "Rocky Linux", "almalinux": "AlmaLinux", "rhel": "Red Hat", "opensuse-leap": "openSUSE",
                 "fedora": "Fedora"}
    if ident in rpm_names and ver:
        return f"{rpm_names[ident]}:{ver.split('.')[0]}", pretty
    return "", pretty


def build(files: dict[str, bytes]) -> Inventory:
    """The inventory from the wanted files' contents (image paths without a leading slash)."""
    inv = Inventory()
    for p in OS_RELEASE:
        if p in files:
            inv.distro, inv.os_name = parse_os_release(files[p].decode(errors="replace"))
            break
    for path in sorted(files):
        text = files[path].decode(errors="replace")
        if path == DPKG_STATUS or path.startswith(DPKG_STATUS_D):
            inv.packages += parse_dpkg_status(text)
        elif path == APK_INSTALLED:
            inv.packages += parse_apk_installed(text)
        elif path in RPMDB:
            from nagaya.scan import rpmdb

            inv.packages += [Package("rpm", h["name"], rpmdb.evr(h), rpmdb.source_name(h), rpmdb.evr(h),
                                     h.get("arch", "")) for h in rpmdb.packages(files[path])]
        elif _PY_META.search(path):
            pkg = parse_python_metadata(text, "/" + posixpath.dirname(path))
            if pkg:
                inv.packages.append(pkg)
    return inv


# -- reading the files ---------------------------------------------------------------------------

def _run(cmd: list[str], what: str) -> bytes:
    try:
        p = subprocess.run(cmd, capture_output=True, check=False, timeout=600)
    except FileNotFoundError:
        raise ImageError(f"{cmd[0]} is not installed (Debian package squashfs-tools-ng)") from None
    if p.returncode != 0:
        raise ImageError(f"{what}: {p.stderr.decode(errors='replace').strip()[:300]}")
    return p.stdout


def squashfs_files(squashfs: str) -> dict[str, bytes]:
    """The wanted files of a squashfs image: one listing (metadata only), then each file read alone."""
    listing = _run(["rdsquashfs", "-d", squashfs], f"cannot list {squashfs}").decode(errors="replace")
    paths = []
    for line in listing.splitlines():
        kind, _, rest = line.partition(" ")
        if kind != "file":
            continue
        path = rest.split(" ", 1)[0]
        if path.startswith('"'):            # a quoted name (spaces): not one of ours
            continue
        path = path.lstrip("/")
        if wanted(path):
            paths.append(path)
    if len(paths) > MAX_FILES:
        raise ImageError(f"{squashfs}: more than {MAX_FILES} package metadata files: not scanned")
    out = {}
    for p in paths:
        data = _run(["rdsquashfs", "-c", "/" + p, squashfs], f"cannot read /{p} in {squashfs}")
        if len(data) <= MAX_FILE:
            out[p] = data
    return out


def layer_files(layers: Iterable[Callable[[], IO[bytes]]]) -> dict[str, bytes]:
    """The wanted files of an image given its layers top (newest) first, each an opener of its
    uncompressed tar stream; whiteouts and opaque directories hide what lies below."""
    out: dict[str, bytes] = {}
    hidden: set[str] = set()            # exact paths decided by an upper layer (file or whiteout)
    opaque: list[str] = []              # directories whose lower contents are hidden
    total = 0
    for opener in layers:
        decided: set[str] = set()
        new_opaque: list[str] = []          # opaque dirs and whited-out paths: everything under them
        with opener() as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                name = posixpath.normpath(m.name.lstrip("./") or ".").lstrip("/")
                base, d = posixpath.basename(name), posixpath.dirname(name)
                if base == ".wh..wh..opq":
                    new_opaque.append(d + "/")
                    continue
                if base.startswith(".wh."):
                    decided.add(posixpath.join(d, base[4:]))
                    new_opaque.append(posixpath.join(d, base[4:]) + "/")
                    continue
                if name in hidden or any(name.startswith(o) for o in opaque):
                    continue
                decided.add(name)
                if m.isfile() and wanted(name) and m.size <= MAX_FILE:
                    total += m.size
                    if total > MAX_TOTAL or len(out) >= MAX_FILES:
                        raise ImageError(f"the image's package databases exceed {MAX_TOTAL >> 20} MiB or "
                                         f"{MAX_FILES} files: not scanned")
                    f = tar.extractfile(m)
                    if f is not None:
                        out[name] = f.read(MAX_FILE)
        hidden |= decided
        opaque += new_opaque
    return out
