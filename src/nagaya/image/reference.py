"""Image references as the OCI distribution spec writes them: [HOST[:PORT]/]PATH[:TAG][@DIGEST]."""

from __future__ import annotations

from nagaya.errors import UsageError
from nagaya.record import Record

# Hand-written matchers for the distribution spec's grammar: this module is on `nagaya run`'s start-up
# path, and importing `re` costs more than the whole check.
MAX_NAME = 255
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_HEX = frozenset("0123456789abcdef")
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_HOSTCHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def _component_ok(c: str) -> bool:
    """[a-z0-9]+ joined by one '.', one or two '_', or any number of '-'."""
    if not c or c[0] not in _ALNUM or c[-1] not in _ALNUM:
        return False
    i, n = 0, len(c)
    while i < n:
        if c[i] in _ALNUM:
            i += 1
            continue
        j = i
        while j < n and c[j] not in _ALNUM:
            j += 1
        sep = c[i:j]
        if not (sep in (".", "_", "__") or set(sep) == {"-"}):
            return False
        i = j
    return True


def _path_ok(p: str) -> bool:
    return all(_component_ok(c) for c in p.split("/"))


def _tag_ok(t: str) -> bool:
    return 0 < len(t) <= 128 and t[0] in _WORD and all(ch in _WORD or ch in ".-" for ch in t)


def _host_ok(h: str) -> bool:
    host, _, port = h.rpartition(":") if not h.endswith("]") and ":" in h else (h, "", "")
    if port and not (port.isdigit() and len(port) <= 5):
        return False
    if host.startswith("["):
        return host.endswith("]") and all(ch in _HEX or ch in "ABCDEF:" for ch in host[1:-1])
    return all(lbl and lbl[0] != "-" and lbl[-1] != "-" and all(ch in _HOSTCHARS for ch in lbl)
               for lbl in host.split("."))


class Reference(Record):
    _frozen = True

    """A parsed reference. `registry` is empty for local-only names."""

    registry: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.path}" if self.registry else self.path

    @property
    def tag_or_latest(self) -> str:
        return self.tag or "latest"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.path, tag, None)


def is_digest(value: str) -> bool:
    return len(value) == 71 and value.startswith("sha256:") and all(ch in _HEX for ch in value[7:])


def parse(text: str) -> Reference:
    """Parse `text`; raise UsageError naming what is wrong."""
    if not text or len(text) > 4096 or any(c.isspace() for c in text):
        raise UsageError(f"invalid image reference {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not is_digest(digest):
            raise UsageError(f"invalid image reference {text!r}: digest must be sha256:<64 hex digits>")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _tag_ok(tag):
            raise UsageError(f"invalid image reference {text!r}: bad tag {tag!r}")
    registry = ""
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _host_ok(first):
            raise UsageError(f"invalid image reference {text!r}: bad registry host {first!r}")
        registry, rest = first, remainder
    if not rest or not _path_ok(rest):
        raise UsageError(f"invalid image reference {text!r}: names are lowercase letters, digits and . _ - /")
    if len(rest) + len(registry) > MAX_NAME:
        raise UsageError(f"invalid image reference {text!r}: name longer than {MAX_NAME} characters")
    return Reference(registry, rest, tag, digest)


def project_of(name: str) -> str:
    """The project of REGISTRY/PROJECT/REPO ("" when there is none): what site policy and keys are per."""
    parts = name.split("/")
    return parts[1] if len(parts) > 2 else ""
