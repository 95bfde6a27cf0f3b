"""Attachments: what is stored in a repository beside an image under a tag named after the image's digest
(cosign's scheme): its signature (`sha256-HEX.sig`, nagaya.trust.sign), its SBOM (`.sbom`, nagaya.scan.attach),
its lazy-pull squashfs (`.sqfs`, nagaya.image.lazy.artifact) and attestations (`.att`).

They are not versions anyone runs, so listings show them under the image they belong to, as badges, not as
tags. The one place that tells them apart, for the JSON API, the CLI (which prints the API's answer) and
the portal alike. They stay stored bytes: the quota counts them, and listings say how much they are."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

TAG = re.compile(r"^sha256-([0-9a-f]{64})\.(sig|sbom|sqfs|att)$")
LABELS = {"sig": "signed", "sbom": "SBOM", "sqfs": "lazy-ready", "att": "attested"}


class TagLike(Protocol):
    tag: str
    digest: str
    size: int


T = TypeVar("T", bound=TagLike)


@dataclass
class Attachment:
    kind: str           # sig | sbom | sqfs | att
    label: str          # what a badge says
    tag: str
    digest: str         # the attachment's own manifest
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "tag": self.tag, "digest": self.digest, "size": self.size}


def parse(tag: str) -> tuple[str, str] | None:
    """(the image's digest, kind) of an attachment tag; None for an ordinary tag."""
    m = TAG.match(tag)
    return (f"sha256:{m.group(1)}", m.group(2)) if m else None


@dataclass
class Listing:
    images: list[Any]                          # the ordinary tags, as given
    attachments: dict[str, list[Attachment]]   # image digest -> what is attached to it
    orphans: list[Any]                         # attachments of an image no tag here names (kept by digest)

    def of(self, digest: str) -> list[Attachment]:
        return self.attachments.get(digest, [])

    @staticmethod
    def label(tag: str) -> str:
        p = parse(tag)
        return LABELS[p[1]] if p else ""

    def usage(self) -> tuple[int, int]:
        """(how many, bytes) the attachments take: see `usage`."""
        return usage((a.digest, a.size) for atts in self.attachments.values() for a in atts)


def usage(items: Iterable[tuple[str, int]]) -> tuple[int, int]:
    """(how many, bytes) of attachments given as (manifest digest, size): each manifest once, as the quota
    counts each digest once."""
    seen = dict(items)
    return len(seen), sum(seen.values())


def json_usage(rows: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """`usage` of the JSON API's tag rows (attachments nested under images, or rows of their own)."""
    return usage([(str(a["digest"]), int(a["size"])) for t in rows for a in t.get("attachments") or []]
                 + [(str(t["digest"]), int(t["size"])) for t in rows if t.get("attachment_of")])


def split(tags: Sequence[T]) -> Listing:
    """Tell a repository's tags apart: images, and each one's attachments (every attachment tag, orphans
    included, is in `attachments` keyed by the digest it names)."""
    images: list[Any] = []
    attached: dict[str, list[Attachment]] = {}
    for t in tags:
        p = parse(t.tag)
        if p is None:
            images.append(t)
        else:
            attached.setdefault(p[0], []).append(Attachment(p[1], LABELS[p[1]], t.tag, t.digest, t.size))
    for atts in attached.values():
        atts.sort(key=lambda a: list(LABELS).index(a.kind))
    tagged = {t.digest for t in images}
    orphans = [t for t in tags if (p := parse(t.tag)) is not None and p[0] not in tagged]
    return Listing(images, attached, orphans)


def listing_json(tags: Sequence[T], rows: list[dict[str, Any]], include_all: bool = False) -> list[dict[str, Any]]:
    """The JSON API's answer for a repository's tags: one row per image tag with its `attachments`; with
    `include_all`, attachment tags as rows too (each says whose it is: `attachment_of`). `rows` are `tags`
    as JSON, in the same order. An attachment whose image has no tag here is always listed as a row."""
    listing = split(tags)
    tagged = {t.digest for t in listing.images}
    out: list[dict[str, Any]] = []
    for t, row in zip(tags, rows, strict=True):
        p = parse(t.tag)
        if p is None:
            out.append({**row, "attachments": [a.to_json() for a in listing.of(t.digest)]})
        elif include_all or p[0] not in tagged:
            out.append({**row, "attachments": [], "attachment_of": p[0], "kind": p[1]})
    return out


def badges(atts: Sequence[dict[str, Any]]) -> str:
    """`signed, SBOM` for a row of the JSON answer (the CLI's column)."""
    return ", ".join(str(a.get("label", a.get("kind", ""))) for a in atts)
