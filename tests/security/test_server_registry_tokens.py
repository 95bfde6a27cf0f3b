"""The server's registry client (nagaya.server.registry_client.SiteRegistry: image/registry.Registry with the
server's own token source) against a site registry that points elsewhere: a blob redirect, a tag list's
next page and a token realm on another host. The tokens the server signs (for a user it acts for, or for
itself) go to the site registry only, never to where a Location, Link or WWW-Authenticate header points;
a rejected token is replaced by a fresh one from the server's issuer, not from a realm; no user's login
file is read."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nagaya.image import oci
from nagaya.image.registry import Registry
from nagaya.server.pki import ensure_signing_files
from nagaya.server.registry_client import SiteRegistry
from nagaya.server.tokens import TokenIssuer

REPO = "lab/app"
BLOB = b"layer bytes " * 100
BLOB_D = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@dataclass
class Registries:
    """`site`: the site registry (or something posing as it); `other`: another host it points at."""

    site: int = 0
    other: int = 0
    log: list[tuple[int, str, str]] = field(default_factory=list)      # (port, path, Authorization)
    refuse_first: bool = False                                         # answer the first token with 401
    seen: set[str] = field(default_factory=set)


def _claims(auth: str) -> dict[str, Any]:
    payload = auth.removeprefix("Bearer ").split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@pytest.fixture
def regs() -> Iterator[Registries]:
    r = Registries()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            port = self.server.server_address[1]
            auth = self.headers.get("Authorization", "")
            r.log.append((port, self.path, auth))
            if port == r.other:
                if self.path.startswith("/blob"):
                    return self.reply(200, BLOB)
                if "/tags/list" in self.path:
                    return self.reply(200, json.dumps({"tags": ["2"]}).encode())
                return self.reply(200, json.dumps({"token": "from-a-stranger"}).encode())
            if not auth.startswith("Bearer ") or (r.refuse_first and not r.seen):
                r.seen.add(auth)
                return self.reply(401, b"{}", {"WWW-Authenticate":
                                               f'Bearer realm="http://127.0.0.1:{r.other}/token",service="x"'})
            if self.path == f"/v2/{REPO}/blobs/{BLOB_D}":
                return self.reply(307, headers={"Location": f"http://127.0.0.1:{r.other}/blob"})
            if self.path.startswith(f"/v2/{REPO}/tags/list"):
                return self.reply(200, json.dumps({"tags": ["1"]}).encode(), {
                    "Link": f'<http://127.0.0.1:{r.other}/v2/{REPO}/tags/list?last=1>; rel="next"'})
            return self.reply(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')

    servers = []
    for _ in range(2):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    r.site, r.other = (s.server_address[1] for s in servers)
    yield r
    for s in servers:
        s.shutdown()


@pytest.fixture
def issuer(tmp_path: Path) -> TokenIssuer:
    f = ensure_signing_files(tmp_path / "certs")
    return TokenIssuer(f.key, f.cert, f.ca_cert, "nagaya", "nagaya-registry", 300)


def test_tokens_stay_with_the_site_registry(regs: Registries, issuer: TokenIssuer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # a login file of the service account's must not be read, let alone sent
    monkeypatch.setenv("NAGAYA_AUTH_FILE", str(tmp_path / "auth.json"))
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {f"127.0.0.1:{regs.site}": {
        "auth": base64.b64encode(b"svc:hunter2").decode()}}}))
    with Registry(f"127.0.0.1:{regs.site}", REPO) as cli_client:
        assert cli_client.creds == ("svc", "hunter2")                   # the CLI's client would use it
    with SiteRegistry(issuer, f"127.0.0.1:{regs.site}", REPO, "alice", ["pull"]) as reg:
        assert reg.creds is None
        assert reg.get_blob_bytes(oci.Descriptor("application/octet-stream", BLOB_D, len(BLOB)), "blob") == BLOB
        assert reg.tags() == ["1", "2"]
    site = [a for p, _path, a in regs.log if p == regs.site]
    assert site and all(a.startswith("Bearer ") for a in site)
    claims = _claims(site[0])
    assert claims["sub"] == "alice" and claims["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]
    assert [(path, a) for p, path, a in regs.log if p == regs.other] == \
        [("/blob", ""), (f"/v2/{REPO}/tags/list?last=1", "")]
    assert not any("hunter2" in a or "Basic" in a for _p, _path, a in regs.log)


def test_a_refused_token_is_renewed_by_the_issuer_not_the_realm(regs: Registries, issuer: TokenIssuer) -> None:
    regs.refuse_first = True
    with SiteRegistry(issuer, f"127.0.0.1:{regs.site}", REPO, "$nagaya", ["pull", "push"]) as reg:
        assert reg.tags() == ["1", "2"]
    tokens = [a for p, path, a in regs.log if p == regs.site and "/tags/list" in path]
    assert len(tokens) == 2 and tokens[0] != tokens[1]                   # the second is a fresh one
    assert _claims(tokens[1])["access"][0]["actions"] == ["pull", "push"]
    assert not any(path.startswith("/token") for p, path, _a in regs.log if p == regs.other)
