"""Which advisories apply to an inventory: per package, the database's entries for its ecosystem and name,
compared with that ecosystem's version order. A finding names the fix when the database knows one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nagaya.scan import versions
from nagaya.scan.inventory import Inventory, Package
from nagaya.scan.vulndb import RANK, SEVERITIES, VulnDB, pypi_name


@dataclass
class Finding:
    id: str
    package: str            # the installed package (binary name)
    installed: str
    fixed: str              # "" when no fix is known
    severity: str
    type: str
    source: str = ""        # the source package the advisory names (deb)
    summary: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _key(pkg: Package, distro: str) -> tuple[str, str, str] | None:
    """(ecosystem, name in the database, version to compare) for a package."""
    if pkg.type == "pypi":
        return "PyPI", pypi_name(pkg.name), pkg.version
    if pkg.type == "deb" and distro.startswith(("Debian:", "Ubuntu:")):
        return distro, pkg.source or pkg.name, pkg.source_version or pkg.version
    if pkg.type == "apk" and distro.startswith("Alpine:"):
        return distro, pkg.source or pkg.name, pkg.version
    if pkg.type == "rpm" and distro:
        return distro, pkg.source or pkg.name, pkg.version
    return None


def affects(cmp, version: str, introduced: str, fixed: str | None, last_affected: str | None,
            listed: list[str] | None) -> bool:
    if listed is not None and not introduced:
        return version in listed
    if introduced not in ("", "0") and cmp(version, introduced) < 0:
        return False
    if fixed is not None:
        return cmp(version, fixed) < 0
    if last_affected is not None:
        return cmp(version, last_affected) <= 0
    return True


def scan(inv: Inventory, db: VulnDB) -> list[Finding]:
    found: dict[tuple[str, str, str], Finding] = {}
    for pkg in inv.packages:
        k = _key(pkg, inv.distro)
        if k is None:
            continue
        eco, name, version = k
        cmp = versions.comparator(eco)
        for e in db.entries(eco, name):
            if not affects(cmp, version, e.introduced, e.fixed, e.last_affected, e.versions):
                continue
            fkey = (e.id, pkg.type, pkg.name)
            f = Finding(e.id, pkg.name, pkg.version, e.fixed or "", e.severity, pkg.type,
                        name if name != pkg.name else "", e.summary)
            old = found.get(fkey)
            if old is None or RANK[f.severity] > RANK[old.severity] or (not old.fixed and f.fixed):
                found[fkey] = f
    return sorted(found.values(), key=lambda f: (-RANK[f.severity], f.id, f.package))


def counts(findings: list[Finding]) -> dict[str, int]:
    c = dict.fromkeys(reversed(SEVERITIES), 0)
    for f in findings:
        c[f.severity] += 1
    return c


def fixable(findings: list[Finding]) -> int:
    """How many findings a rebuild (with the fixed packages) would remove."""
    return sum(1 for f in findings if f.fixed)


def worst(findings: list[Finding], allowed: frozenset[str] = frozenset()) -> Finding | None:
    rest = [f for f in findings if f.id not in allowed]
    return max(rest, key=lambda f: RANK[f.severity]) if rest else None
