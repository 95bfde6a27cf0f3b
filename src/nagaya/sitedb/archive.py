"""The archive of expired accounts' images (written by `nagaya admin maintain`), as `nagaya reproduce` and
the API read it: the project's pull rule still applies after the registry forgot the image."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nagaya.errors import NotFound, UsageError
from nagaya.sitedb.authz import Principal, authorize
from nagaya.sitedb.part import Part


@dataclass
class ArchivedImage:
    project: str
    repository: str
    tag: str
    digest: str
    size: int | None
    archived_at: str | None
    url: str                # where the API serves the OCI archive


def archive_root(settings: Any, state_dir: Path | None = None) -> Path:
    """Where maintenance archives expired users' images: `archive_dir`, default STATE_DIR/archive (the
    state dir holds the signing key's directory when it is not given)."""
    if settings.archive_dir:
        return Path(settings.archive_dir)
    return (state_dir or Path(settings.signing_key).parent.parent) / "archive"


def _entries(root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        projects = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return
    for pdir in projects:
        try:
            index = json.loads((pdir / "index.json").read_text())
        except (OSError, ValueError):
            continue
        for e in index.get("images", []):
            if isinstance(e, dict) and isinstance(e.get("file"), str):
                yield pdir.name, e


class Archive(Part):
    def _may_pull(self, principal: Principal, e: dict[str, Any]) -> bool:
        return bool(authorize(self.s, principal, str(e.get("repository", "")), ["pull"]))

    def archived(self, principal: Principal, root: Path, digest: str) -> list[ArchivedImage]:
        """Archived images with this manifest digest that the caller may pull (its members with pull, and
        site admins)."""
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise UsageError("give a full sha256: digest")
        return [ArchivedImage(project=project, repository=e["repository"], tag=e.get("tag", ""), digest=digest,
                              size=e.get("size"), archived_at=e.get("archived_at"),
                              url=f"/api/archive/{project}/{e['file']}")
                for project, e in _entries(root) if e.get("digest") == digest and self._may_pull(principal, e)]

    def archive_file(self, principal: Principal, root: Path, project: str, name: str) -> Path:
        """The path of one archive the caller may read; anything else is a 404 (never a hint that it exists)."""
        for p, e in _entries(root):
            if p == project and e["file"] == name and "/" not in name and self._may_pull(principal, e):
                path = root / project / name
                if path.is_file():
                    return path
        raise NotFound(f"no archived image {project}/{name}")
