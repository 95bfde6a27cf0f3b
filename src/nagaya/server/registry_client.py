"""The server's one client of the site registry: one repository, tokens from the site's own issuer (the token
source) for exactly the actions asked, issued to a subject so the registry's notifications say who acted
(a user the server acts for, or the server itself: INTERNAL, maintenance's actor).

Every registry call of the server goes through here: index sizes, undoing a moved immutable tag, image
delete, the portal's manifest and download, maintenance's archive and retention."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from nagaya.store.service import MANIFEST_TYPES

if TYPE_CHECKING:
    from nagaya.server.tokens import TokenIssuer

MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES)


class SiteRegistry:
    def __init__(self, issuer: TokenIssuer, registry: str, repository: str, subject: str, actions: list[str],
                 timeout: float = 30, http: httpx.Client | None = None) -> None:
        self.issuer, self.repository, self.subject, self.actions = issuer, repository, subject, actions
        self.base = f"http://{registry}/v2/{repository}"
        self.timeout = timeout
        self.http = http

    def auth(self) -> dict[str, str]:
        """The token source: a fresh registry token for this repository and these actions."""
        tok = self.issuer.issue(self.subject, [{"type": "repository", "name": self.repository,
                                                "actions": self.actions}])
        return {"Authorization": f"Bearer {tok['token']}"}

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self.auth(), **kw.pop("headers", {})}
        send: Callable[..., httpx.Response] = self.http.request if self.http is not None else httpx.request
        return send(method, f"{self.base}/{path}", headers=headers, timeout=kw.pop("timeout", self.timeout), **kw)

    def get_manifest(self, reference: str, media_type: str = "") -> httpx.Response:
        return self.request("GET", f"manifests/{reference}", headers={"Accept": media_type or MANIFEST_ACCEPT})

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> httpx.Response:
        return self.request("PUT", f"manifests/{reference}", content=data, headers={"Content-Type": media_type})

    def delete_manifest(self, digest: str) -> httpx.Response:
        return self.request("DELETE", f"manifests/{digest}")
