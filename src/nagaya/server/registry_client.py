"""The server's client of the site registry: nagaya.image.registry.Registry (the CLI's client) with a token
source of the server's own. Tokens come from the site's issuer for exactly the actions asked, issued to a
subject so the registry's notifications say who acted (a user the server acts for, or the server itself:
INTERNAL, maintenance's actor). No user's token is ever sent: the server signs its own, and sends them to
the site registry only (Registry._may_authorize; blob redirects go without one).

Every registry call of the server goes through here: index sizes, undoing a moved immutable tag, image
delete, the portal's manifest, download and size picture, signature checks, scan on push and its SBOM,
maintenance's archive and retention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from nagaya.errors import ImageError, ImageNotFound, NotFound, RegistryError, UsageError
from nagaya.image.registry import Registry

if TYPE_CHECKING:
    from nagaya.server.tokens import TokenIssuer


class IssuerTokens:
    """A token source: registry scopes -> a token the site's issuer signs for `subject`."""

    def __init__(self, issuer: TokenIssuer, subject: str) -> None:
        self.issuer, self.subject = issuer, subject

    def __call__(self, scopes: tuple[str, ...]) -> str:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        return str(self.issuer.issue(self.subject, access)["token"])


class SiteRegistry(Registry):
    """One repository of the site registry, as `subject` with `actions`. The site registry is spoken to
    over plain HTTP on its own address, as the server has always done."""

    def __init__(self, issuer: TokenIssuer, registry: str, repository: str, subject: str, actions: list[str],
                 timeout: float = 30) -> None:
        self.subject = subject
        super().__init__(registry, repository, tuple(actions), insecure=[registry], timeout=timeout,
                         token_source=IssuerTokens(issuer, subject))
        # The registry's access log then tells the server's own reads (scan on push, size pictures,
        # maintenance) from what users' nagaya clients fetched.
        self.http.headers["User-Agent"] = "nagaya-server"


@contextlib.contextmanager
def as_site_errors(what: str) -> Iterator[None]:
    """The registry client's errors as the doors' errors: a missing image is a 404 (NotFound), anything
    else the registry did wrong a 400 with its one-line reason."""
    try:
        yield
    except ImageNotFound:
        raise NotFound(f"{what} not found") from None
    except RegistryError as e:
        raise UsageError(f"the registry did not answer as expected: {e.message}") from None
    except ImageError as e:
        raise UsageError(e.message) from None
