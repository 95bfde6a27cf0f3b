"""Image operations the server does in the registry on a user's behalf: one implementation for the portal's
pages and the JSON API (and so the CLI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nagaya.errors import PermissionDenied, UsageError
from nagaya.server.registry_client import as_site_errors
from nagaya.sitedb import Principal, authorize
from nagaya.sitedb.service import SiteService

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
    # a token for exactly what authz granted, issued to the caller: the registry's notification says who
    with as_site_errors(f"{repository}@{digest}"), site.registry(repository, principal.name, ["delete"]) as reg:
        reg.delete_manifest(digest)                             # already gone (404) is fine: forget it too
    with site.db.session() as db:
        return SiteService(db).forget_manifest(repository, digest)
