"""The registry client end to end: `nagaya push`, `nagaya pull`, `nagaya run REGISTRY/...` re-resolving tags,
`nagaya cache ls|gc`, against a real site (registry + token service) and against a tiny hostile registry on
loopback. Every user-facing command runs as an unprivileged test user."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import images
from tests.integration.site.conftest import Site, SiteUser, ensure_user

pytestmark = pytest.mark.integration

ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (/v2/\S*) HTTP/[\d.]+" (\d+) ')
BUSYBOX = Path("/bin/busybox")


# ---- images ----------------------------------------------------------------------------------------------

def busybox_layer() -> bytes:
    return images.tar_bytes([images.entry("bin/", "dir"),
                             images.entry("bin/busybox", "file", BUSYBOX.read_bytes(), mode=0o755)])


def msg_layer(msg: str) -> bytes:
    return images.tar_bytes([images.entry("msg", "file", msg.encode())])


def make_archive(dest: Path, msg: str) -> Path:
    """An OCI archive: busybox + a layer with /msg, readable by the test users."""
    layout = images.oci_layout(dest.with_suffix(".layout"), [busybox_layer(), msg_layer(msg)],
                               {"Cmd": ["/bin/busybox", "cat", "/msg"]})
    out = images.oci_archive(layout, dest)
    subprocess.run(["chmod", "-R", "a+rX", str(layout), str(out)], check=True)
    return out


@dataclass
class Blobs:
    """A hand-made image for the fake registry: manifest bytes and blobs by digest."""

    manifest: bytes
    blobs: dict[str, bytes]
    layer_digests: list[str]

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def _put(blobs: dict[str, bytes], data: bytes) -> dict:
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[d] = data
    return {"digest": d, "size": len(data)}


def hand_image(layers: list[bytes], arch: str = "amd64") -> Blobs:
    blobs: dict[str, bytes] = {}
    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_put(blobs, gzip.compress(x, mtime=0))}
             for x in layers]
    cfg = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/busybox", "true"]},
           "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]}}
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **_put(blobs, json.dumps(cfg).encode())}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config, "layers": descs}).encode()
    return Blobs(manifest, blobs, [d["digest"] for d in descs])


# ---- a fake registry on loopback ---------------------------------------------------------------------------

@dataclass
class FakeRegistry:
    """Anonymous distribution API serving fixed content, with knobs to misbehave."""

    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)   # tag or digest -> (bytes, type)
    blobs: dict[str, bytes] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)        # serve other bytes of the same size
    truncate: set[str] = field(default_factory=set)       # announce the full size, send half, hang up
    slow: float = 0.0                                     # seconds per 64 KiB chunk of blob data
    log: list[str] = field(default_factory=list)
    port: int = 0
    server: http.server.ThreadingHTTPServer | None = None

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def add(self, tag: str, img: Blobs, mt: str = "application/vnd.oci.image.manifest.v1+json") -> None:
        self.manifests[tag] = (img.manifest, mt)
        self.manifests[img.digest] = (img.manifest, mt)
        self.blobs.update(img.blobs)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    reg = FakeRegistry()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes = b"", ctype: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            reg.log.append(f"{self.command} {self.path}")
            m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", self.path)
            if self.path == "/v2/":
                return self._send(200, b"{}")
            if not m:
                return self._send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')
            kind, ref = m.group(2), m.group(3)
            if kind == "manifests":
                if ref not in reg.manifests:
                    return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                body, mt = reg.manifests[ref]
                return self._send(200, body, mt)
            if ref not in reg.blobs:
                return self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            data = reg.blobs[ref]
            if ref in reg.corrupt:
                data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return None
            if ref in reg.truncate:
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return None
            for i in range(0, len(data), 65536):
                if reg.slow:
                    time.sleep(reg.slow)
                try:
                    self.wfile.write(data[i:i + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    return None
            return None

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    reg.port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    reg.server = srv
    yield reg
    reg.stop()


# ---- users and helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def owner(site: Site) -> SiteUser:
    u = ensure_user("nyr-owner", f"pw-nyr-{os.getpid()}")
    u.login(site.server)
    return u


@pytest.fixture(scope="module")
def outsider(site: Site) -> SiteUser:
    u = ensure_user("nyr-out", f"pw-nyo-{os.getpid()}")
    u.login(site.server)
    return u


@pytest.fixture(scope="module")
def archives(base_dir: Path) -> dict[str, Path]:
    d = base_dir / "reg-archives"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    return {m: make_archive(d / f"{m}.tar", m) for m in ("one", "two")}


def fresh_cache(u: SiteUser) -> dict[str, str]:
    c = u.u.mkdir(u.u.home / f"cache-{uuid.uuid4().hex[:8]}")
    return {"XDG_CACHE_HOME": str(c)}


def cache_root(env: dict[str, str]) -> Path:
    return Path(env["XDG_CACHE_HOME"]) / "nagaya"


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-2000:]}\n{r.stdout[-1000:]}"
    return r


def pushed(u: SiteUser, archive: Path, ref: str) -> str:
    """Import an archive as a local image and push it; returns the manifest digest."""
    local = f"local-{uuid.uuid4().hex[:8]}:1"
    ok(u.nagaya("image", "import", str(archive), "--name", local))
    return json.loads(ok(u.nagaya("push", local, ref, "--json")).stdout)["digest"]


class AccessLog:
    """Requests the registry served (its access log), from a point in time on."""

    def __init__(self, site: Site) -> None:
        self.path = site.state_dir / "logs" / "registry.log"
        self.offset = self.path.stat().st_size

    def requests(self, repo: str) -> list[tuple[str, str, int]]:
        time.sleep(0.3)                                  # the registry writes its log asynchronously
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        return [(m.group(1), m.group(2), int(m.group(3))) for m in ACCESS.finditer(text)
                if m.group(2).startswith(f"/v2/{repo}/")]


def nothing_cached(root: Path) -> None:
    assert not list((root / "images").glob("*.json")), "an image was committed"
    assert not list((root / "images").glob("*.sqfs")), "a squashfs was left"
    assert not [p for p in (root / "refs").rglob("*") if p.is_file()], "a tag was written"
    assert not [p for p in (root / "tmp").iterdir()], "temp files were left behind"


# ---- against the real site ---------------------------------------------------------------------------------

def test_push_then_pull_on_clean_cache_then_run(site: Site, owner: SiteUser, archives: dict[str, Path]) -> None:
    ref = f"{site.registry}/{owner.name}/hello:1"
    digest = pushed(owner, archives["one"], ref)
    env = fresh_cache(owner)
    res = json.loads(ok(owner.nagaya("pull", ref, "--json", env=env)).stdout)
    assert res["digest"] == digest and not res["cached"] and res["layers_fetched"] == 2
    r = ok(owner.nagaya("run", ref, env=env))
    assert r.stdout == "one"
    again = json.loads(ok(owner.nagaya("pull", ref, "--json", env=env)).stdout)
    assert again["cached"] and again["bytes_fetched"] == 0
    ls = json.loads(ok(owner.nagaya("cache", "ls", "--json", env=env)).stdout)
    assert [i["tags"] for i in ls["images"]] == [[ref]]
    # A second push of the same image sends no blob
    local = f"again-{uuid.uuid4().hex[:6]}:1"
    ok(owner.nagaya("image", "import", str(archives["one"]), "--name", local))
    p = json.loads(ok(owner.nagaya("push", local, ref, "--json")).stdout)
    assert p["blobs_uploaded"] == 0 and p["blobs_skipped"] == 3
    # A pulled image pushed to another repository of the same registry: blobs are mounted, not sent
    other = f"{site.registry}/{owner.name}/hello-copy:1"
    p = json.loads(ok(owner.nagaya("push", ref, other, "--json", env=env)).stdout)
    assert p["blobs_mounted"] == 3 and p["bytes_uploaded"] == 0, p
    assert ok(owner.nagaya("run", other, env=fresh_cache(owner))).stdout == "one"


def test_run_without_pull_pulls_and_picks_up_moved_tag(site: Site, owner: SiteUser,
                                                       archives: dict[str, Path]) -> None:
    ref = f"{site.registry}/{owner.name}/moving:latest"
    d1 = pushed(owner, archives["one"], ref)
    env = fresh_cache(owner)
    assert ok(owner.nagaya("run", ref, env=env)).stdout == "one"
    d2 = pushed(owner, archives["two"], ref)
    assert d1 != d2
    assert ok(owner.nagaya("run", ref, env=env)).stdout == "two"           # the next run sees the new tag
    tagged = (cache_root(env) / "refs" / site.registry / owner.name / "moving" / "latest").read_text().strip()
    assert tagged == d2


def test_unchanged_tag_costs_one_manifest_request(site: Site, owner: SiteUser, archives: dict[str, Path]) -> None:
    repo = f"{owner.name}/steady"
    ref = f"{site.registry}/{repo}:1"
    pushed(owner, archives["one"], ref)
    env = fresh_cache(owner)
    ok(owner.nagaya("pull", ref, env=env))
    log = AccessLog(site)
    assert ok(owner.nagaya("run", ref, env=env)).stdout == "one"
    reqs = log.requests(repo)
    assert reqs == [("GET", f"/v2/{repo}/manifests/1", 200)], reqs
    log = AccessLog(site)
    res = json.loads(ok(owner.nagaya("pull", ref, "--json", env=env)).stdout)
    assert res["cached"] and res["registry_requests"] == 1
    assert [r for r in log.requests(repo) if "/blobs/" in r[1]] == []


def test_eight_concurrent_pulls_download_once(site: Site, owner: SiteUser, archives: dict[str, Path]) -> None:
    repo = f"{owner.name}/crowd"
    ref = f"{site.registry}/{repo}:1"
    digest = pushed(owner, archives["two"], ref)
    env = fresh_cache(owner)
    log = AccessLog(site)
    procs = [owner.u.popen(["nagaya", "pull", ref, "--json"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert {json.loads(o[0])["digest"] for o in outs} == {digest}
    blob_gets = [r for r in log.requests(repo) if r[0] == "GET" and "/blobs/" in r[1]]
    assert len(blob_gets) == len({r[1] for r in blob_gets}) == 3, blob_gets      # 2 layers + config, once each
    assert len(list((cache_root(env) / "images").glob("*.sqfs"))) == 1
    assert ok(owner.nagaya("run", ref, env=env)).stdout == "two"


def test_sigkill_at_any_point_then_repull(site: Site, owner: SiteUser, archives: dict[str, Path]) -> None:
    ref = f"{site.registry}/{owner.name}/killed:1"
    pushed(owner, archives["one"], ref)
    for delay in (0.05, 0.15, 0.25, 0.35, 0.45, 0.6):      # start-up, token, download, conversion, commit
        env = fresh_cache(owner)
        root = cache_root(env)
        p = owner.u.popen(["nagaya", "pull", ref], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)       # setpriv execs nagaya: this is the pulling process
        p.wait()
        for meta in (root / "images").glob("*.json") if (root / "images").is_dir() else []:
            assert (root / "images" / f"{meta.stem}.sqfs").stat().st_size > 0      # visible => complete
        for b in (root / "blobs" / "sha256").iterdir() if (root / "blobs" / "sha256").is_dir() else []:
            assert hashlib.sha256(b.read_bytes()).hexdigest() == b.name, "an unverified blob was stored"
        ok(owner.nagaya("pull", ref, env=env))
        assert ok(owner.nagaya("run", ref, env=env)).stdout == "one"


def test_non_member_cannot_pull_or_push(site: Site, owner: SiteUser, outsider: SiteUser,
                                        archives: dict[str, Path]) -> None:
    ref = f"{site.registry}/{owner.name}/private:1"
    pushed(owner, archives["one"], ref)
    env = fresh_cache(outsider)
    r = outsider.nagaya("pull", ref, env=env)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == f"nagaya: {ref}: not found or access denied"
    missing = outsider.nagaya("pull", f"{site.registry}/{owner.name}/no-such:1", env=env)
    assert missing.stderr.replace("no-such", "private") == r.stderr      # indistinguishable from missing
    r = outsider.nagaya("run", ref, "true", env=env)
    assert r.returncode == 3
    local = "mine:1"
    ok(outsider.nagaya("image", "import", str(archives["two"]), "--name", local, env=env))
    r = outsider.nagaya("push", local, f"{site.registry}/{owner.name}/private:1", env=env)
    assert r.returncode == 6 and "denied" in r.stderr, r.stderr
    nothing_cached_remote = ok(owner.nagaya("run", ref, env=fresh_cache(owner)))
    assert nothing_cached_remote.stdout == "one"              # the outsider's push changed nothing


def test_gc_honours_in_use_images(site: Site, owner: SiteUser, archives: dict[str, Path]) -> None:
    env = fresh_cache(owner)
    refs = {}
    for m in ("one", "two"):
        refs[m] = f"{site.registry}/{owner.name}/gc-{m}:1"
        pushed(owner, archives[m], refs[m])
        ok(owner.nagaya("pull", refs[m], env=env))
    runner = owner.u.popen(["nagaya", "run", refs["one"], "/bin/busybox", "sleep", "30"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        dry = json.loads(ok(owner.nagaya("cache", "gc", "--max-size", "0", "--dry-run", "--json", env=env)).stdout)
        assert len(dry["removed_images"]) == 1 and len(dry["kept_in_use"]) == 1
        assert len(json.loads(ok(owner.nagaya("cache", "ls", "--json", env=env)).stdout)["images"]) == 2
        rep = json.loads(ok(owner.nagaya("cache", "gc", "--max-size", "0", "--json", env=env)).stdout)
        assert [i["tags"] for i in rep["removed_images"]] == [[refs["two"]]]
        ls = json.loads(ok(owner.nagaya("cache", "ls", "--json", env=env)).stdout)["images"]
        assert [i["tags"] for i in ls] == [[refs["one"]]] and ls[0]["in_use"]
    finally:
        runner.terminate()                  # nagaya relays it to the container and releases the use-lock
        runner.wait(timeout=30)
    rep = json.loads(ok(owner.nagaya("cache", "gc", "--older-than", "0s", "--json", env=env)).stdout)
    assert len(rep["removed_images"]) == 1 and rep["removed_blobs"] >= 3
    assert json.loads(ok(owner.nagaya("cache", "ls", "--json", env=env)).stdout)["images"] == []
    assert not list((cache_root(env) / "blobs" / "sha256").iterdir())
    # and it all comes back
    assert ok(owner.nagaya("run", refs["two"], env=env)).stdout == "two"


def test_stale_tmp_entries_are_collected(owner: SiteUser) -> None:
    env = fresh_cache(owner)
    ok(owner.nagaya("cache", "ls", env=env))
    root = cache_root(env)
    for d in ("", "tmp", "blobs", "blobs/sha256"):      # each level the owner's: a cache root made by root is refused
        owner.u.mkdir(root / d)
    old, new = root / "tmp" / "blob-old", root / "tmp" / "blob-new"
    for p in (old, new):
        p.write_bytes(b"x")
        os.chown(p, owner.u.uid, owner.u.gid)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    rep = json.loads(ok(owner.nagaya("cache", "gc", "--json", env=env)).stdout)
    assert rep["removed_tmp"] == 1 and not old.exists() and new.exists()


# ---- against a misbehaving registry ------------------------------------------------------------------------

def _pull_fails(u: SiteUser, ref: str, pattern: str) -> dict[str, str]:
    env = fresh_cache(u)
    r = u.nagaya("pull", ref, env=env)
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr
    nothing_cached(cache_root(env))
    return env


def test_blob_digest_mismatch(owner: SiteUser, fake: FakeRegistry) -> None:
    img = hand_image([busybox_layer(), msg_layer("x")])
    fake.add("1", img)
    fake.corrupt.add(img.layer_digests[1])
    env = _pull_fails(owner, f"{fake.host}/lab/bad:1", r"digest mismatch.*nothing was cached")
    assert not (cache_root(env) / "blobs" / "sha256" / img.layer_digests[1][7:]).exists()


def test_truncated_download(owner: SiteUser, fake: FakeRegistry) -> None:
    img = hand_image([busybox_layer()])
    fake.add("1", img)
    fake.truncate.add(img.layer_digests[0])
    _pull_fails(owner, f"{fake.host}/lab/short:1", r"truncated|interrupted")


def _partial_blob(root: Path) -> bool:
    tmp = root / "tmp"
    return tmp.is_dir() and any(f.stat().st_size > 0 for f in tmp.glob("blob-*"))


def test_killed_mid_download_then_repull(owner: SiteUser, fake: FakeRegistry) -> None:
    img = hand_image([busybox_layer(), msg_layer("slow")])
    fake.add("1", img)
    fake.slow = 0.05
    ref = f"{fake.host}/lab/slow:1"
    env = fresh_cache(owner)
    root = cache_root(env)
    p = owner.u.popen(["nagaya", "pull", ref], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _partial_blob(root):
        time.sleep(0.05)
    assert _partial_blob(root), "the pull never started downloading"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not list((root / "images").glob("*.json"))
    assert not (root / "blobs" / "sha256" / img.layer_digests[0][7:]).exists()
    fake.slow = 0
    ok(owner.nagaya("pull", ref, env=env))
    assert ok(owner.nagaya("run", ref, "/bin/busybox", "cat", "/msg", env=env)).stdout == "slow"


def test_manifest_for_another_platform_only(owner: SiteUser, fake: FakeRegistry) -> None:
    arm = hand_image([busybox_layer()], arch="s390x")
    fake.add(arm.digest, arm)
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm.digest, "size": len(arm.manifest),
         "platform": {"os": "linux", "architecture": "s390x"}}]}).encode()
    fake.manifests["multi"] = (index, "application/vnd.oci.image.index.v1+json")
    _pull_fails(owner, f"{fake.host}/lab/plat:multi", r"no image for linux/\w+ \(found: linux/s390x\)")
    fake.add("single", arm)
    _pull_fails(owner, f"{fake.host}/lab/plat:single", r"image is for linux/s390x")


def test_huge_and_deeply_nested_manifests(owner: SiteUser, fake: FakeRegistry) -> None:
    img = hand_image([busybox_layer()])
    fake.add("ok", img)
    huge = json.loads(img.manifest)
    huge["annotations"] = {"pad": "x" * (5 << 20)}
    fake.manifests["huge"] = (json.dumps(huge).encode(), "application/vnd.oci.image.manifest.v1+json")
    _pull_fails(owner, f"{fake.host}/lab/h:huge", r"too large")
    fake.manifests["deep"] = (b'{"a":' * 200000 + b"1" + b"}" * 200000, "application/vnd.oci.image.manifest.v1+json")
    _pull_fails(owner, f"{fake.host}/lab/h:deep", r"not valid JSON|too large")
    layers = json.loads(img.manifest)
    layers["layers"] = layers["layers"] * 600
    fake.manifests["many"] = (json.dumps(layers).encode(), "application/vnd.oci.image.manifest.v1+json")
    _pull_fails(owner, f"{fake.host}/lab/h:many", r"layers is more than")
    # indexes pointing at indexes, deeper than allowed
    child = (img.manifest, "application/vnd.oci.image.manifest.v1+json")
    digest, body = img.digest, child
    for _ in range(6):
        idx = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            {"mediaType": body[1], "digest": digest, "size": len(body[0])}]}).encode()
        digest = "sha256:" + hashlib.sha256(idx).hexdigest()
        body = (idx, "application/vnd.oci.image.index.v1+json")
        fake.manifests[digest] = body
    fake.manifests["nested"] = body
    _pull_fails(owner, f"{fake.host}/lab/h:nested", r"nested more than")
    # a manifest whose bytes do not match the digest asked for
    fake.manifests[hand_image([msg_layer("z")]).digest] = child
    _pull_fails(owner, f"{fake.host}/lab/h@{hand_image([msg_layer('z')]).digest}", r"digest mismatch")


@pytest.mark.parametrize("bad", ["", "UPPER/case:1", "127.0.0.1:5000/a//b:1", "127.0.0.1:5000/a/b:bad tag",
                                 "127.0.0.1:5000/a/b@sha256:1234", "127.0.0.1:99999999/a/b:1", "a/b:" + "t" * 200,
                                 "127.0.0.1:5000/" + "a" * 300])
def test_malformed_references(owner: SiteUser, bad: str) -> None:
    r = owner.nagaya("pull", bad)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("nagaya: invalid image reference") and len(r.stderr.strip().splitlines()) == 1


def test_reference_without_registry_is_refused(owner: SiteUser) -> None:
    r = owner.nagaya("pull", "lab/name:1")
    assert r.returncode == 2 and "names no registry" in r.stderr


def test_run_re_resolves_and_falls_back_only_when_unreachable(owner: SiteUser, fake: FakeRegistry) -> None:
    img = hand_image([busybox_layer(), msg_layer("cached")])
    fake.add("1", img)
    ref = f"{fake.host}/lab/gone:1"
    env = fresh_cache(owner)
    ok(owner.nagaya("pull", ref, env=env))
    fake.log.clear()
    assert ok(owner.nagaya("run", ref, "/bin/busybox", "cat", "/msg", env=env)).stdout == "cached"
    assert fake.log == ["GET /v2/lab/gone/manifests/1"]              # one request, no blobs
    fake.manifests.pop("1")
    r = owner.nagaya("run", ref, "/bin/busybox", "cat", "/msg", env=env)
    assert r.returncode == 3 and "not found" in r.stderr            # tag deleted: no stale fallback
    fake.manifests["1"] = (img.manifest, "application/vnd.oci.image.manifest.v1+json")
    fake.stop()
    r = ok(owner.nagaya("run", ref, "/bin/busybox", "cat", "/msg", env=env))
    assert r.stdout == "cached" and "warning" in r.stderr and "may be stale" in r.stderr
    r = owner.nagaya("run", "127.0.0.1:1/lab/never:1", "true", env=env)
    assert r.returncode == 9 and "cannot reach registry" in r.stderr


def test_client_chunked_upload_head_and_tag_list(site: Site, owner: SiteUser, archives: dict[str, Path]) -> None:
    """Library level: chunked (PATCH) uploads, blob HEAD, manifest HEAD and tag listing through token auth."""
    from nagaya.image import oci
    from nagaya.image.registry import Registry

    ref = f"{site.registry}/{owner.name}/listed:1"
    digest = pushed(owner, archives["one"], ref)
    data = os.urandom(3 * 1024 * 1024 + 17)
    blob = owner.u.home / "chunk.bin"
    blob.write_bytes(data)
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    with Registry(site.registry, f"{owner.name}/listed", ("pull", "push"), auth_file=owner.auth_file) as reg:
        assert not reg.has_blob(d)
        reg.upload_blob(blob, d, len(data), chunk_size=1 << 20)
        assert reg.has_blob(d)
        import io

        buf = io.BytesIO()
        reg.fetch_blob(oci.Descriptor("application/octet-stream", d, len(data)), buf, "blob")
        assert buf.getvalue() == data
        assert reg.head_manifest("1") == digest and reg.head_manifest("nope") is None
        # the push also published the lazy-start squashfs artifact beside the image (nagaya.image.lazy)
        assert sorted(reg.tags()) == ["1", f"sha256-{digest[7:]}.sqfs"]


@pytest.fixture(scope="module")
def team(site: Site, owner: SiteUser, outsider: SiteUser, archives: dict[str, Path]) -> dict[str, SiteUser]:
    """Project nyr-team: owner, a developer, a guest; the outsider is no member."""
    people = {"owner": owner, "outsider": outsider}
    for role in ("developer", "guest"):
        people[role] = ensure_user(f"nyr-{role[:5]}", f"pw-nyr-{role}-{os.getpid()}")
        people[role].login(site.server)
    ok(owner.nagaya("project", "create", "nyr-team"))
    for role in ("developer", "guest"):
        ok(owner.nagaya("project", "member", "add", "nyr-team", people[role].name, "--role", role))
    pushed(owner, archives["one"], f"{site.registry}/nyr-team/app:1")
    return people


@pytest.mark.parametrize(("who", "can_pull", "can_push"), [
    ("owner", True, True), ("developer", True, True), ("guest", True, False), ("outsider", False, False),
    ("anonymous", False, False)])
def test_roles_through_nagaya_pull_and_push(site: Site, team: dict[str, SiteUser], archives: dict[str, Path],
                                            who: str, can_pull: bool, can_push: bool) -> None:
    u = team["outsider" if who == "anonymous" else who]
    env = fresh_cache(u)
    if who == "anonymous":                     # no auth.json at all
        env["XDG_CONFIG_HOME"] = str(u.u.mkdir(u.u.home / f"noconf-{uuid.uuid4().hex[:6]}"))
    r = u.nagaya("pull", f"{site.registry}/nyr-team/app:1", env=env)
    assert (r.returncode == 0) == can_pull, r.stderr
    if not can_pull:
        assert r.returncode == 3 and "not found or access denied" in r.stderr
    local = f"mine-{uuid.uuid4().hex[:6]}:1"
    ok(u.nagaya("image", "import", str(archives["two"]), "--name", local, env=env))
    r = u.nagaya("push", local, f"{site.registry}/nyr-team/by-{who}:1", env=env)
    assert (r.returncode == 0) == can_push, r.stderr
    if not can_push:
        assert r.returncode == 6 and "denied" in r.stderr, r.stderr
