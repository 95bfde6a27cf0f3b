"""Image references as the OCI distribution spec writes them: [HOST[:PORT]/]PATH[:TAG][@DIGEST]."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nagaya.errors import UsageError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST_RE = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                      r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$")
MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
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
    return bool(_DIGEST_RE.match(value))


def parse(text: str) -> Reference:
    """Parse `text`; raise UsageError naming what is wrong."""
    if not text or len(text) > 4096 or any(c.isspace() for c in text):
        raise UsageError(f"invalid image reference {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise UsageError(f"invalid image reference {text!r}: digest must be sha256:<64 hex digits>")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid image reference {text!r}: bad tag {tag!r}")
    registry = ""
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _HOST_RE.match(first):
            raise UsageError(f"invalid image reference {text!r}: bad registry host {first!r}")
        registry, rest = first, remainder
    if not rest or not _PATH_RE.match(rest):
        raise UsageError(f"invalid image reference {text!r}: names are lowercase letters, digits and . _ - /")
    if len(rest) + len(registry) > MAX_NAME:
        raise UsageError(f"invalid image reference {text!r}: name longer than {MAX_NAME} characters")
    return Reference(registry, rest, tag, digest)
