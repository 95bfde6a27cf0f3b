"""Version order per packaging ecosystem: Debian (dpkg's rules: epoch, `~`, revision), Alpine's apk, PEP 440.

Debian's order comes from python-debian (the dpkg algorithm, tested against dpkg itself); PEP 440 from
`packaging`; apk's has no packaged Python implementation, so it is written here after apk-tools' version.c.
"""

from __future__ import annotations

import re
from functools import cmp_to_key

from debian.debian_support import version_compare as _deb_compare
from packaging.version import InvalidVersion, Version


def debian(a: str, b: str) -> int:
    return _deb_compare(a, b)


# apk-tools: digits ("." digits)* [letter] ("_" suffix [digits])* ["-r" digits]
_APK_PRE = {"alpha": 0, "beta": 1, "pre": 2, "rc": 3}
_APK_POST = {"cvs": 5, "svn": 6, "git": 7, "hg": 8, "p": 9}
_APK_RE = re.compile(r"^(\d+(?:\.\d+)*)([a-z]?)((?:_[a-z]+\d*)*)(?:-r(\d+))?$")


def _apk_key(v: str) -> tuple | None:
    m = _APK_RE.match(v)
    if not m:
        return None
    nums, letter, suffixes, rev = m.groups()
    parts = nums.split(".")
    # apk compares the first number numerically and later ones as numbers too, except that a later part
    # with a leading zero compares as a fraction ("1.01" < "1.1"): keep the text for that case
    first = [(int(parts[0]), "")]
    rest = [(int(p), p) if not p.startswith("0") or p == "0" else (-1, p) for p in parts[1:]]
    sfx = []
    for s in re.findall(r"_([a-z]+)(\d*)", suffixes):
        name, n = s
        rank = _APK_PRE.get(name, _APK_POST.get(name, 4))
        sfx.append((rank, int(n or 0)))
    return (first + rest, letter, sfx, int(rev or 0))


def _cmp(a: object, b: object) -> int:
    return (a > b) - (a < b)  # type: ignore[operator]


def apk(a: str, b: str) -> int:
    ka, kb = _apk_key(a), _apk_key(b)
    if ka is None or kb is None:
        return _cmp(a, b)
    na, nb = ka[0], kb[0]
    for (xa, ta), (xb, tb) in zip(na, nb, strict=False):
        # a leading-zero part compares as text (a decimal fraction)
        c = _cmp(ta, tb) if xa == -1 or xb == -1 else _cmp(xa, xb)
        if c:
            return c
    if len(na) != len(nb):
        return _cmp(len(na), len(nb))
    if ka[1] != kb[1]:
        return _cmp(ka[1], kb[1])
    sa, sb = ka[2], kb[2]
    for x, y in zip(sa, sb, strict=False):
        if x != y:
            return _cmp(x, y)
    if len(sa) != len(sb):
        # a further suffix: a pre-release one makes the version older, a post-release one newer
        longer, sign = (sa, 1) if len(sa) > len(sb) else (sb, -1)
        rank = longer[min(len(sa), len(sb))][0]
        return sign * (1 if rank >= 4 else -1)
    return _cmp(ka[3], kb[3])


def pep440(a: str, b: str) -> int:
    try:
        return _cmp(Version(a), Version(b))
    except InvalidVersion:
        return _cmp(a, b)


def comparator(ecosystem: str):
    """The compare function (a, b) -> -1/0/1 for an OSV ecosystem name ("Debian:12", "Alpine:v3.18", "PyPI")."""
    base = ecosystem.split(":", 1)[0].lower()
    if base in ("debian", "ubuntu"):
        return debian
    if base == "alpine":
        return apk
    if base == "pypi":
        return pep440
    if base in ("rocky linux", "almalinux", "red hat", "opensuse", "fedora", "suse"):
        from nagaya.scan.rpmdb import compare

        return compare
    return lambda a, b: _cmp(a, b)


def sort_key(ecosystem: str):
    return cmp_to_key(comparator(ecosystem))
