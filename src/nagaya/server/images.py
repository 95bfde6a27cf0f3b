"""Image operations the server does in the registry on a user's behalf: one implementation for the portal's
pages and the JSON API (and so the CLI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from nagaya.errors import PermissionDenied, UsageError
from nagaya.store import Principal, authorize
from nagaya.store.service import SiteService, forget_manifest

if TYPE_CHECKING:
    from nagaya.server.base import Site


def delete_image(site: Site, principal: Principal, repository: str, digest: str) -> int:
    """Delete a manifest (every tag on it) from the registry; owners and maintainers only. Returns how many
    tags the index dropped at once (the registry's notification then writes the audit event)."""
    with site.db.session() as db:
        SiteService(db).tags(principal, repository)             # 404 for what the caller cannot list
        if "delete" not in authorize(db, principal, repository, ["delete"]):
            raise PermissionDenied(f"your role in this project does not allow deleting images in {repository}")
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise UsageError("bad digest")
    try:
        # a token for exactly what authz granted, issued to the caller: the registry's notification says who
        resp = site.registry(repository, principal.name, ["delete"]).delete_manifest(digest)
    except httpx.HTTPError as e:
        raise UsageError(f"the registry did not answer: {e}") from None
    if resp.status_code not in (202, 404):
        raise UsageError(f"the registry refused the delete ({resp.status_code})")
    with site.db.session() as db:
        return forget_manifest(SiteService(db), repository, digest)
