"""A small typed client for the server's JSON API (httpx). Errors come back as NagayaError subclasses
carrying the server's one-line message."""

from __future__ import annotations

import base64
import re
import sys
from typing import Any

import httpx

from nagaya.errors import AuthError, Conflict, NagayaError, NotFound, PermissionDenied, SiteError, UsageError

_WARNED: set[str] = set()
_ERRORS: dict[int, type[NagayaError]] = {400: UsageError, 401: AuthError, 403: PermissionDenied, 404: NotFound,
                                         409: Conflict, 422: UsageError}


def _detail(r: httpx.Response) -> str:
    try:
        d = r.json().get("detail")
    except (ValueError, AttributeError):
        return r.text.strip()[:200] or r.reason_phrase
    if isinstance(d, list):    # pydantic validation errors
        return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', [])[1:])}: {e.get('msg')}" for e in d)
    return str(d)


class Api:
    def __init__(self, server: str, username: str | None = None, secret: str | None = None,
                 timeout: float = 30) -> None:
        self.server = server.rstrip("/")
        headers = {}
        if username is not None and secret is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{username}:{secret}".encode()).decode()
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, follow_redirects=False)

    def request(self, method: str, url: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, url, **kw)
        except httpx.HTTPError as e:
            raise SiteError(f"cannot reach {self.server}: {e}") from None
        warning = r.headers.get("x-nagaya-warning")
        if warning and warning not in _WARNED:       # e.g. an account about to expire: once per command
            _WARNED.add(warning)
            sys.stderr.write(f"nagaya: warning: {warning}\n")
        if r.status_code >= 400:
            raise _ERRORS.get(r.status_code, SiteError)(_detail(r))
        return r.json() if r.content else None

    def get(self, url: str, **kw: Any) -> Any:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> Any:
        return self.request("POST", url, **kw)

    def delete(self, url: str, **kw: Any) -> Any:
        return self.request("DELETE", url, **kw)


def discover(target: str) -> tuple[str, str]:
    """`docker login`-style target -> (registry HOST:PORT, server URL).

    An `http(s)://` URL is the server (it says which registry it serves at /api/info); a bare HOST:PORT is
    the registry, whose 401 challenge names the token service (`realm`), i.e. the server."""
    if target.startswith(("http://", "https://")):
        info = Api(target).get("/api/info")
        return str(info["registry"]), target.rstrip("/")
    for scheme in ("https", "http"):
        try:
            r = httpx.get(f"{scheme}://{target}/v2/", timeout=10, verify=False)
        except httpx.HTTPError:
            continue
        m = re.search(r'realm="([^"]+)"', r.headers.get("www-authenticate", ""))
        if r.status_code == 401 and m:
            realm = m.group(1)
            server = realm.removesuffix("/token")
            return target, server
        raise SiteError(f"{target} is not a registry using token authentication")
    raise SiteError(f"cannot reach a registry at {target}")
