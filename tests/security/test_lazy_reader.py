"""The boundary between a user's lazy FUSE reader and a registry (docs/THREAT_MODEL.md, "Lazy image reader"):
a hostile or broken registry (or anything between it and the node) must not get unverified bytes to the
container, must not get the user's token sent elsewhere, and must not make a run hang. The victim is an
unprivileged user running `nagaya run --pull lazy` against a hostile registry on loopback."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.site.conftest import SiteUser, ensure_user
from tests.integration.test_lazy_pull import big_archive, no_leftovers
from tests.integration.test_registry_client import fresh_cache, ok

CHUNK = 1 << 20
REPO = "evil/app"


@dataclass
class Image:
    digest: str
    manifest: bytes
    blobs: dict[str, bytes]
    squashfs: bytes


@dataclass
class Hostile:
    """Serves one image and its squashfs artifact; `mode` picks the misbehaviour."""

    img: Image
    mode: str = ""
    port: int = 0
    log: list[tuple[str, str, str]] = field(default_factory=list)     # (method, path, authorization)
    manifests: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    servers: list[http.server.ThreadingHTTPServer] = field(default_factory=list)
    elsewhere: int = 0                                                # the port of a second server (redirects)

    def publish(self, subject: str | None = None, sums: list[str] | None = None) -> None:
        sq = self.img.squashfs
        sq_d = "sha256:" + hashlib.sha256(sq).hexdigest()
        real = [hashlib.sha256(sq[i:i + CHUNK]).hexdigest() for i in range(0, len(sq), CHUNK)]
        chunks = json.dumps({"chunk": CHUNK, "size": len(sq), "squashfs": sq_d, "sha256": sums or real}).encode()
        c_d = "sha256:" + hashlib.sha256(chunks).hexdigest()
        cfg = b"{}"
        cfg_d = "sha256:" + hashlib.sha256(cfg).hexdigest()
        art = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "artifactType": "application/vnd.nagaya.squashfs.v1",
               "config": {"mediaType": "application/vnd.nagaya.squashfs.config.v1+json", "size": 2, "digest": cfg_d},
               "layers": [{"mediaType": "application/vnd.nagaya.squashfs.chunks.v1+json", "size": len(chunks),
                           "digest": c_d},
                          {"mediaType": "application/vnd.nagaya.squashfs.v1", "size": len(sq), "digest": sq_d}],
               "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "size": len(self.img.manifest), "digest": subject or self.img.digest}}
        self.manifests = {"1": self.img.manifest, self.img.digest: self.img.manifest,
                          self.img.digest.replace(":", "-") + ".sqfs": json.dumps(art).encode()}
        self.blobs = {**self.img.blobs, sq_d: sq, c_d: chunks, cfg_d: cfg}


def _server(handler: type, port: int = 0) -> http.server.ThreadingHTTPServer:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def hostile(image: Image) -> Iterator[Hostile]:
    h = Hostile(image)
    h.publish()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            h.log.append((self.command, self.path, auth))
            port = self.server.server_address[1]
            if self.path.startswith("/token"):
                return self.reply(200, json.dumps({"token": "secret-token-of-the-victim"}).encode())
            if port == h.elsewhere:
                return self.reply(200, b"x")
            if auth != "Bearer secret-token-of-the-victim":
                return self.reply(401, b"{}", {"WWW-Authenticate":
                                               f'Bearer realm="http://127.0.0.1:{port}/token",service="evil"'})
            kind, _s, ref = self.path.removeprefix(f"/v2/{REPO}/").partition("/")
            if kind == "manifests" and ref in h.manifests:
                return self.reply(200, h.manifests[ref], {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
            if kind != "blobs" or ref not in h.blobs:
                return self.reply(404, b'{"errors":[{"code":"NOT_FOUND"}]}')
            data = h.blobs[ref]
            rng = self.headers.get("Range")
            if not rng or data is not h.img.squashfs or h.mode == "no-ranges":
                return self.reply(200, data)
            if h.mode == "redirect":
                return self.reply(307, b"", {"Location": f"http://127.0.0.1:{h.elsewhere}/blob"})
            lo, hi = (int(x) for x in rng.removeprefix("bytes=").split("-"))
            body = data[lo:hi + 1]
            if h.mode == "swap" and lo > 0:
                body = data[0:len(body)]                      # a valid block of the image, at the wrong place
            if h.mode == "short":
                body = body[:len(body) // 2]
            return self.reply(206, body, {"Content-Range": f"bytes {lo}-{lo + len(body) - 1}/{len(data)}"})

    main = _server(Handler)
    other = _server(Handler)
    h.port, h.elsewhere = main.server_address[1], other.server_address[1]
    h.servers = [main, other]
    yield h
    for s in h.servers:
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def victim() -> SiteUser:
    return ensure_user("nyl-victim", f"pw-nylv-{os.getpid()}")


@pytest.fixture(scope="module")
def image(victim: SiteUser, base_dir: Path) -> Image:
    d = base_dir / "lazy-hostile"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    env = fresh_cache(victim)
    ok(victim.nagaya("image", "import", str(big_archive(d / "img.tar", "hostile")), "--name", "src:1", env=env))
    root = Path(env["XDG_CACHE_HOME"]) / "nagaya"
    [meta_file] = (root / "images").glob("*.json")
    meta = json.loads(meta_file.read_text())
    digest = meta["digest"]
    blobs = {"sha256:" + p.name: p.read_bytes() for p in (root / "blobs" / "sha256").iterdir()}
    return Image(digest, blobs[digest], blobs, (root / "images" / f"{digest[7:]}.sqfs").read_bytes())


def run_lazy(victim: SiteUser, h: Hostile, *cmd: str):  # -> (CompletedProcess, env)
    env = fresh_cache(victim)
    r = victim.nagaya("run", "--pull", "lazy", f"127.0.0.1:{h.port}/{REPO}:1", *cmd, env=env, timeout=120)
    no_leftovers(victim, env)
    return r, env


def test_artifact_of_another_image_is_refused(victim: SiteUser, hostile: Hostile) -> None:
    hostile.publish(subject="sha256:" + "ab" * 32)
    r, _env = run_lazy(victim, hostile)
    assert r.returncode != 0 and "hostile" not in r.stdout
    assert r.stderr.strip().endswith("the artifact is for another image (sha256:abababababab)"), r.stderr
    assert not [p for m, p, _a in hostile.log if m == "GET" and "/blobs/" in p and
                hostile.blobs.get(p.rsplit("/", 1)[1]) is hostile.img.squashfs], "squashfs bytes were read"


def test_valid_blocks_at_the_wrong_offset_are_refused(victim: SiteUser, hostile: Hostile) -> None:
    hostile.mode = "swap"
    r, env = run_lazy(victim, hostile)
    assert r.returncode != 0 and "hostile" not in r.stdout
    assert "failed verification" in r.stderr, r.stderr
    [d] = [p for p in (Path(env["XDG_CACHE_HOME"]) / "nagaya" / "lazy").iterdir() if p.name != "mnt"]
    assert (d / "have").read_bytes().count(b"\x01") == 1        # only block 0, the one served right


def test_forged_chunk_list_is_refused_before_any_block(victim: SiteUser, hostile: Hostile) -> None:
    sq = hostile.img.squashfs
    n = -(-len(sq) // CHUNK)
    hostile.publish(sums=["00" * 32] * n)                       # a list that does not match the blocks
    r, _env = run_lazy(victim, hostile)
    assert r.returncode != 0 and "failed verification" in r.stderr, r.stderr


def test_short_ranges_fail_in_one_line(victim: SiteUser, hostile: Hostile) -> None:
    hostile.mode = "short"
    r, _env = run_lazy(victim, hostile)
    assert r.returncode != 0 and "short range" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_redirect_never_carries_the_token(victim: SiteUser, hostile: Hostile) -> None:
    hostile.mode = "redirect"
    r, _env = run_lazy(victim, hostile)
    assert "does not serve byte ranges" in r.stderr, r.stderr    # the storage answered 200: a full pull
    seen = [a for m, p, a in hostile.log if p == "/blob"]
    assert seen and all(a == "" for a in seen), hostile.log


def test_no_ranges_falls_back_to_a_verified_full_pull(victim: SiteUser, hostile: Hostile) -> None:
    hostile.mode = "no-ranges"
    r, env = run_lazy(victim, hostile)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hostile"
    assert "does not serve byte ranges" in r.stderr and "pulling" in r.stderr, r.stderr
    assert list((Path(env["XDG_CACHE_HOME"]) / "nagaya" / "images").glob("*.sqfs"))


