"""A client for the OCI distribution API: bearer-token auth, manifests, blobs, uploads, tags.

One `Registry` talks to one repository of one registry with a fixed set of actions (pull, or pull+push).
The token flow follows the distribution token-auth spec: a 401 with `WWW-Authenticate: Bearer realm=..,
service=..` sends us to the realm with Basic credentials (from auth.json, or none: anonymous). The
challenge and the token are cached on disk (mode 0600) so that resolving an unchanged tag costs exactly
one request to the registry, the point of "resolve on every use".

The site server uses the same client with a token source of its own (`token_source`): its issuer signs a
token for exactly the scopes asked, so no auth.json, token cache or token realm is involved, and a 401 asks
the source again (a long download outlives one token).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urljoin

import httpx

from nagaya.client import authfile
from nagaya.errors import (
    AuthError,
    ImageError,
    ImageNotFound,
    NagayaError,
    PermissionDenied,
    RegistryError,
    RegistryUnreachable,
)
from nagaya.image import oci

MANIFEST_ACCEPT = ", ".join([oci.MT_OCI_MANIFEST, oci.MT_OCI_INDEX, oci.MT_DOCKER_MANIFEST, oci.MT_DOCKER_LIST])
CHUNK = 1 << 20
Progress = Callable[[int], None]
# scopes ("repository:NAME:pull,push", ...) -> a bearer token for them: the server's own credentials
TokenSource = Callable[[tuple[str, ...]], str]


def is_loopback(host: str) -> bool:
    h = host.rsplit(":", 1)[0] if not host.endswith("]") and host.count(":") == 1 else host
    h = h.strip("[]")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def scheme_for(registry: str, insecure: list[str]) -> str:
    """Plain HTTP for loopback and configured insecure registries; HTTPS for everything else."""
    return "http" if is_loopback(registry) or registry in insecure else "https"


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="..",service=".."` -> ("bearer", {...}). Values may contain commas inside quotes."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            end = rest.find('"', i + 1)
            end = n if end < 0 else end
            params[key] = rest[i + 1:end]
            i = end + 1
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return scheme.lower(), params


def _error_codes(r: httpx.Response) -> list[str]:
    with contextlib.suppress(Exception):
        return [str(e.get("code", "")) for e in r.json().get("errors", [])]
    return []


class TokenCache:
    """Challenges and bearer tokens per registry, in DIR/<host>.json (0600), shared by processes."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory
        self.lock = threading.Lock()

    def _path(self, registry: str) -> Path | None:
        return self.dir / (registry.replace(":", "_").replace("/", "_") + ".json") if self.dir else None

    def load(self, registry: str) -> dict[str, Any]:
        p = self._path(registry)
        if p is None:
            return {}
        try:
            data = json.loads(p.read_bytes())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def save(self, registry: str, data: dict[str, Any]) -> None:
        p = self._path(registry)
        if p is None:
            return
        with contextlib.suppress(OSError):
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, p)


class Registry:
    """One repository on one registry. Thread-safe: layer downloads share one client."""

    def __init__(self, registry: str, repository: str, actions: tuple[str, ...] = ("pull",), *,
                 insecure: list[str] | None = None, token_dir: Path | None = None,
                 extra_scopes: tuple[str, ...] = (), auth_file: Path | None = None,
                 timeout: float = 60.0, token_source: TokenSource | None = None) -> None:
        self.registry = registry
        self.repository = repository
        self.scopes = (f"repository:{repository}:{','.join(actions)}", *extra_scopes)
        self.base = f"{scheme_for(registry, insecure or [])}://{registry}"
        self.token_source = token_source
        # with a token source, no user's login is read: the server never sends anyone's credentials
        self.creds = None if token_source else authfile.credentials(registry, auth_file)
        # The cache key includes who we are, so a token of one login is never used for another.
        self.scope_key = f"{self.creds[0] if self.creds else ''} {' '.join(self.scopes)}"
        self.tokens = TokenCache(token_dir)
        self.http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), follow_redirects=False,
                                 limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
                                 headers={"User-Agent": "nagaya"})
        self.auth_header: str | None = None
        self.requests = 0                   # registry requests made (the bench reports it)
        if token_source is not None:
            return
        state = self.tokens.load(registry)
        tok = (state.get("tokens") or {}).get(self.scope_key)
        if isinstance(tok, list) and len(tok) == 2 and float(tok[1]) > time.time() + 10:
            self.auth_header = f"Bearer {tok[0]}"
        elif state.get("realm") or state.get("basic"):
            with contextlib.suppress(NagayaError):  # a stale challenge: the next 401 tells us anew
                self._authenticate(state)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def where(self) -> str:
        return f"{self.registry}/{self.repository}"

    # -- auth ----------------------------------------------------------------------------------------
    def _authenticate(self, challenge: dict[str, Any]) -> None:
        if challenge.get("basic"):
            if not self.creds:
                raise AuthError(f"{self.registry} requires a login; run `nagaya login {self.registry}`")
            import base64

            self.auth_header = "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
            return
        realm = str(challenge.get("realm") or "")
        if not realm.startswith(("http://", "https://")):
            raise RegistryError(f"{self.registry}: unusable token realm {realm!r}")
        params: list[tuple[str, str]] = [("scope", s) for s in self.scopes]
        if challenge.get("service"):
            params.insert(0, ("service", str(challenge["service"])))
        if self.creds:
            params.append(("account", self.creds[0]))
        try:
            r = self.http.get(realm, params=params, auth=httpx.BasicAuth(*self.creds) if self.creds else None)
        except httpx.TransportError as e:
            raise RegistryUnreachable(f"cannot reach the token service of {self.registry} ({realm}): "
                                      f"{type(e).__name__}") from None
        if r.status_code == 401:
            raise AuthError(f"{self.registry}: login refused (expired or revoked token?); "
                            f"run `nagaya login {self.registry}`")
        if r.status_code == 403:
            # the site refuses with a reason (e.g. a project over its storage quota): show it
            try:
                why = str(r.json().get("detail") or "")
            except (ValueError, AttributeError):
                why = ""
            raise PermissionDenied(f"{self.registry}: {why or 'the token service refused this request'}")
        if r.status_code != 200:
            raise RegistryError(f"{self.registry}: token service answered HTTP {r.status_code}")
        try:
            body = r.json()
            token = body.get("token") or body.get("access_token")
            ttl = int(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"{self.registry}: malformed answer from the token service") from None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.registry}: the token service returned no token")
        self.auth_header = f"Bearer {token}"
        with self.tokens.lock:
            state = self.tokens.load(self.registry)
            toks = {k: v for k, v in (state.get("tokens") or {}).items()
                    if isinstance(v, list) and len(v) == 2 and float(v[1]) > time.time()}
            toks[self.scope_key] = [token, time.time() + ttl]
            self.tokens.save(self.registry, {"realm": realm, "service": challenge.get("service", ""),
                                             "tokens": toks})

    def _may_authorize(self, url: str) -> bool:
        """The server's own tokens go to the site registry only, wherever a Location or Link header points."""
        if self.token_source is None or not url.startswith(("http://", "https://")):
            return True
        return url == self.base or url.startswith(self.base + "/")

    def _send(self, method: str, url: str, *, stream: bool = False, **kw: Any) -> httpx.Response:
        """One request with auth; on 401, run the challenge once and retry."""
        if self.token_source is not None and self.auth_header is None:
            self.auth_header = f"Bearer {self.token_source(self.scopes)}"
        for attempt in (0, 1):
            headers = dict(kw.pop("headers", None) or {})
            if self.auth_header and self._may_authorize(url):
                headers["Authorization"] = self.auth_header
            kw["headers"] = headers
            content = kw.get("content")
            try:
                req = self.http.build_request(method, url if url.startswith("http") else self.base + url, **kw)
                self.requests += 1
                r = self.http.send(req, stream=stream)
            except httpx.TransportError as e:
                hint = " (an HTTPS registry? add it to image.insecure_registries only if it is plain HTTP)" \
                    if isinstance(e, httpx.RemoteProtocolError) else ""
                raise RegistryUnreachable(f"cannot reach registry {self.registry}: {type(e).__name__}"
                                          f"{': ' + str(e) if str(e) else ''}{hint}") from None
            if r.status_code != 401 or attempt == 1:
                return r
            header = r.headers.get("www-authenticate", "")
            r.close()
            scheme, params = _parse_challenge(header)
            if self.token_source is not None:   # expired: a fresh one from the source, never from a realm
                self.auth_header = f"Bearer {self.token_source(self.scopes)}"
            elif scheme == "bearer":
                self._authenticate(params)
            elif scheme == "basic":
                self._authenticate({"basic": True})
            else:
                return r
            if content is not None and not isinstance(content, bytes | str):
                raise RegistryError(f"{self.registry}: authentication changed during an upload; retry")
        raise AssertionError("unreachable")

    def _fail(self, r: httpx.Response, what: str, push: bool = False) -> NagayaError:
        """A one-line error for an unexpected answer. For pulls, 401/403/404 read the same: the server
        does not let non-members learn whether a repository exists."""
        codes = _error_codes(r)
        if r.status_code in (401, 403) and push:
            return PermissionDenied(f"push to {self.where} denied (need developer role or a push token; "
                                    f"logged in? `nagaya login {self.registry}`)")
        if r.status_code in (401, 403):
            who = "" if self.creds or self.token_source else f"; not logged in: run `nagaya login {self.registry}`"
            return ImageNotFound(f"{what}: not found or access denied{who}")
        if r.status_code == 404 or "NAME_UNKNOWN" in codes or "MANIFEST_UNKNOWN" in codes:
            return ImageNotFound(f"{what}: not found")
        if r.status_code == 413:
            return RegistryError(f"{what}: too large for the registry")
        detail = f" ({', '.join(codes)})" if codes else ""
        return RegistryError(f"{what}: registry answered HTTP {r.status_code}{detail}")

    # -- manifests -----------------------------------------------------------------------------------
    def get_manifest(self, reference: str, expect_digest: str | None = None) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index, by tag or digest; size-bounded and verified."""
        what = f"{self.where}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        r = self._send("GET", f"/v2/{self.repository}/manifests/{reference}", stream=True,
                       headers={"Accept": MANIFEST_ACCEPT})
        try:
            if r.status_code != 200:
                r.read()
                raise self._fail(r, what)
            length = r.headers.get("content-length")
            if length and length.isdigit() and int(length) > oci.MAX_JSON_BYTES:
                raise ImageError(f"{what}: manifest is too large ({int(length)} bytes)")
            buf = bytearray()
            for chunk in r.iter_raw():
                buf += chunk
                if len(buf) > oci.MAX_JSON_BYTES:
                    raise ImageError(f"{what}: manifest is too large (over {oci.MAX_JSON_BYTES} bytes)")
        except httpx.TransportError as e:
            raise RegistryUnreachable(f"{what}: connection lost ({type(e).__name__})") from None
        finally:
            r.close()
        data = bytes(buf)
        digest = oci.sha256_digest(data)
        want = expect_digest or (reference if reference.startswith("sha256:") else None)
        if want and digest != want:
            raise ImageError(f"{what}: manifest digest mismatch (got {digest[:19]}); refusing it")
        header = r.headers.get("docker-content-digest")
        if header and header.startswith("sha256:") and header != digest:
            raise ImageError(f"{what}: manifest does not match the registry's Docker-Content-Digest")
        mt = r.headers.get("content-type", "").split(";")[0].strip()
        with contextlib.suppress(ImageError):
            mt = str(oci.load_json(data, what).get("mediaType") or mt)
        return data, mt, digest

    def head_manifest(self, reference: str) -> str | None:
        """The digest a tag points at, or None if it does not exist."""
        r = self._send("HEAD", f"/v2/{self.repository}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._fail(r, f"{self.where}:{reference}")
        return r.headers.get("docker-content-digest")

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        r = self._send("PUT", f"/v2/{self.repository}/manifests/{reference}", content=data,
                       headers={"Content-Type": media_type})
        if r.status_code not in (200, 201, 202):
            raise self._fail(r, f"{self.where}:{reference}", push=True)
        digest = oci.sha256_digest(data)
        got = r.headers.get("docker-content-digest")
        if got and got != digest:
            raise RegistryError(f"{self.where}:{reference}: registry stored digest {got[:19]}, expected {digest[:19]}")
        return digest

    def delete_manifest(self, digest: str) -> bool:
        """Delete a manifest (so every tag on it) by digest; False when it was already gone."""
        r = self._send("DELETE", f"/v2/{self.repository}/manifests/{digest}")
        if r.status_code == 404:
            return False
        if r.status_code not in (200, 202):
            detail = f" ({', '.join(_error_codes(r))})" if _error_codes(r) else ""
            raise RegistryError(f"{self.where}@{digest[:19]}: the registry refused the delete "
                                f"(HTTP {r.status_code}{detail})")
        return True

    def tags(self) -> list[str]:
        out: list[str] = []
        url: str | None = f"/v2/{self.repository}/tags/list?n=1000"
        for _page in range(1000):           # bounded: a hostile Link header cannot loop us forever
            if url is None:
                break
            r = self._send("GET", url)
            if r.status_code != 200:
                raise self._fail(r, self.where)
            tags = (r.json() or {}).get("tags") or []
            out.extend(str(t) for t in tags)
            link = r.headers.get("link", "")
            url = None
            if link.startswith("<") and 'rel="next"' in link:
                url = urljoin(self.base, link[1:link.index(">")])
        return out

    # -- blobs ---------------------------------------------------------------------------------------
    def has_blob(self, digest: str, push: bool = False) -> bool:
        r = self._send("HEAD", f"/v2/{self.repository}/blobs/{digest}")
        if r.status_code == 200:
            return True
        if r.status_code == 404:
            return False
        raise self._fail(r, f"{self.where}@{digest[:19]}", push=push)

    def get_blob_bytes(self, desc: oci.Descriptor, what: str) -> bytes:
        """A small blob (a config) into memory, verified."""
        if desc.size > oci.MAX_JSON_BYTES:
            raise ImageError(f"{what} is too large ({desc.size} bytes)")
        import io

        buf = io.BytesIO()
        self.fetch_blob(desc, buf, what)
        return buf.getvalue()

    def fetch_blob(self, desc: oci.Descriptor, out: IO[bytes], what: str, progress: Progress | None = None) -> None:
        """Stream a blob into `out`, never reading past its descriptor's size, and verify its digest."""
        with contextlib.closing(self.iter_blob(desc, what)) as chunks:    # a failed write closes the response
            for chunk in chunks:
                out.write(chunk)
                if progress:
                    progress(len(chunk))

    def iter_blob(self, desc: oci.Descriptor, what: str) -> Iterator[bytes]:
        """A blob's bytes as they arrive, never past its descriptor's size; the digest is checked at the end
        (a mismatch raises after the last chunk: a consumer that streams on must treat that as a failure)."""
        r = self._open_blob(desc, what)
        h = hashlib.sha256()
        n = 0
        try:
            for chunk in r.iter_raw():         # raw: the digest covers the bytes as stored
                n += len(chunk)
                if n > desc.size:
                    raise ImageError(f"{what} ({desc.digest[:19]}): registry sent more than the "
                                     f"{desc.size} bytes the manifest says")
                h.update(chunk)
                yield chunk
        except httpx.TransportError as e:
            raise RegistryError(f"{what} ({desc.digest[:19]}): download interrupted after {n} of "
                                f"{desc.size} bytes ({type(e).__name__})") from None
        finally:
            r.close()
        if n != desc.size:
            raise ImageError(f"{what} ({desc.digest[:19]}): truncated download ({n} of {desc.size} bytes)")
        if "sha256:" + h.hexdigest() != desc.digest:
            raise ImageError(f"{what}: digest mismatch (expected {desc.digest[:19]}, got "
                             f"sha256:{h.hexdigest()[:12]}); nothing was cached")

    def _open_blob(self, desc: oci.Descriptor, what: str) -> httpx.Response:
        url = f"/v2/{self.repository}/blobs/{desc.digest}"
        for _hop in range(5):               # storage back ends may redirect (S3, CDN); never send our token there
            r = self._send("GET", url, stream=True) if not url.startswith("http") else \
                self.http.send(self.http.build_request("GET", url), stream=True)
            if r.status_code in (301, 302, 303, 307, 308) and "location" in r.headers:
                url = urljoin(str(r.url), r.headers["location"])
                r.close()
                continue
            if r.status_code != 200:
                r.read()
                r.close()
                raise self._fail(r, f"{what} ({desc.digest[:19]})")
            return r
        raise RegistryError(f"{what}: too many redirects")

    def mount_blob(self, digest: str, source_repo: str) -> bool:
        """Cross-repository mount (no data sent); False when the registry wants an upload instead."""
        query = urlencode({"mount": digest, "from": source_repo})
        r = self._send("POST", f"/v2/{self.repository}/blobs/uploads/?{query}")
        if r.status_code == 201:
            return True
        if r.status_code == 202:            # not mountable: cancel the upload session it opened
            loc = r.headers.get("location")
            if loc:
                with contextlib.suppress(NagayaError):
                    self._send("DELETE", urljoin(self.base + "/", loc))
            return False
        raise self._fail(r, f"{self.where}@{digest[:19]}", push=True)

    def upload_bytes(self, data: bytes) -> str:
        """Small bytes (a config, a signature's payload, a chunk list) uploaded unless the repository has them
        already; their digest."""
        digest = oci.sha256_digest(data)
        if not self.has_blob(digest, push=True):
            self.upload_blob(data, digest, len(data))
        return digest

    def upload_blob(self, path: Path | bytes, digest: str, size: int, progress: Progress | None = None,
                    chunk_size: int = 0) -> None:
        """Upload a file (or bytes): POST for a session, then one streamed PUT (monolithic), or PATCH chunks + PUT."""
        what = f"{self.where}@{digest[:19]}"
        r = self._send("POST", f"/v2/{self.repository}/blobs/uploads/")
        if r.status_code != 202 or "location" not in r.headers:
            raise self._fail(r, what, push=True)
        loc = urljoin(self.base + "/", r.headers["location"])

        def body(f: IO[bytes], limit: int) -> Iterator[bytes]:
            left = limit
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                if progress:
                    progress(len(chunk))
                yield chunk

        with io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb") as f:
            if chunk_size and size > chunk_size:
                offset = 0
                while offset < size:
                    n = min(chunk_size, size - offset)
                    r = self._send("PATCH", loc, content=body(f, n), headers={
                        "Content-Type": "application/octet-stream", "Content-Length": str(n),
                        "Content-Range": f"{offset}-{offset + n - 1}"})
                    if r.status_code != 202 or "location" not in r.headers:
                        raise self._fail(r, what, push=True)
                    loc = urljoin(self.base + "/", r.headers["location"])
                    offset += n
                r = self._send("PUT", _with_query(loc, digest=digest), content=b"")
            else:
                r = self._send("PUT", _with_query(loc, digest=digest), content=body(f, size),
                               headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if r.status_code not in (201, 204):
            codes = _error_codes(r)
            if "DIGEST_INVALID" in codes or "BLOB_UPLOAD_INVALID" in codes:
                raise ImageError(f"{what}: the registry rejected the upload (digest mismatch: the local "
                                 "blob is corrupt?)")
            raise self._fail(r, what, push=True)


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)
