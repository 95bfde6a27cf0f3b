"""Lazy start (`nagaya run --pull lazy`) against a real site (registry + token service): the pusher publishes
the image's squashfs as an artifact, a fresh node reads only the blocks the run needs, every block verified.
Every user-facing command runs as an unprivileged test user."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import images
from tests.integration.site.conftest import Site, SiteUser, ensure_user
from tests.integration.test_registry_client import busybox_layer, cache_root, fresh_cache, ok, pushed

pytestmark = pytest.mark.integration
BIG = 8 << 20


@pytest.fixture(scope="module")
def owner(site: Site) -> SiteUser:
    u = ensure_user("nyl-owner", f"pw-nyl-{os.getpid()}")
    u.login(site.server)
    return u


@pytest.fixture(scope="module")
def outsider(site: Site) -> SiteUser:
    u = ensure_user("nyl-out", f"pw-nylo-{os.getpid()}")
    u.login(site.server)
    return u


def big_archive(dest: Path, msg: str) -> Path:
    """busybox, /msg, and /big: 8 MiB of random bytes a short run never reads."""
    layers = [busybox_layer(), images.tar_bytes([images.entry("msg", "file", msg.encode()),
                                                 images.entry("big", "file", os.urandom(BIG))])]
    layout = images.oci_layout(dest.with_suffix(".layout"), layers, {"Cmd": ["/bin/busybox", "cat", "/msg"]})
    out = images.oci_archive(layout, dest)
    subprocess.run(["chmod", "-R", "a+rX", str(layout), str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def archive(base_dir: Path) -> Path:
    d = base_dir / "lazy-archives"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    return big_archive(d / "big.tar", "lazy")


def lazy_dirs(env: dict[str, str]) -> list[Path]:
    root = cache_root(env) / "lazy"
    return [p for p in root.iterdir() if p.name != "mnt"] if root.is_dir() else []


def no_leftovers(u: SiteUser, env: dict[str, str]) -> None:
    mnt = cache_root(env) / "lazy" / "mnt"
    with open("/proc/self/mountinfo") as f:
        assert str(mnt) not in f.read(), "a lazy mount was left"
    assert not (mnt.is_dir() and list(mnt.iterdir())), "a mount point was left"
    assert not [p for p in u.u.processes() if "nagaya.image.lazy.serve" in p], "a reader process was left"


def blob_file(site: Site, digest: str) -> Path:
    return site.state_dir / "registry" / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"


def artifact_squashfs(site: Site, u: SiteUser, repo: str, digest: str) -> tuple[str, int]:
    """The squashfs digest and size the artifact of `digest` names (read with the owner's token)."""
    tok = site.token(f"repository:{repo}:pull", u.creds(site.registry)).json()["token"]
    import httpx

    r = httpx.get(f"http://{site.registry}/v2/{repo}/manifests/{digest.replace(':', '-')}.sqfs",
                  headers={"Authorization": f"Bearer {tok}",
                           "Accept": "application/vnd.oci.image.manifest.v1+json"}, timeout=30)
    assert r.status_code == 200, r.text
    layer = r.json()["layers"][1]
    return layer["digest"], layer["size"]


def test_lazy_run_reads_less_than_the_image(site: Site, owner: SiteUser, archive: Path) -> None:
    repo = f"{owner.name}/lazy-{uuid.uuid4().hex[:6]}"
    ref = f"{site.registry}/{repo}:1"
    digest = pushed(owner, archive, ref)
    _sq, size = artifact_squashfs(site, owner, repo, digest)
    env = fresh_cache(owner)
    r = ok(owner.nagaya("run", "--pull", "lazy", ref, env=env))
    assert r.stdout == "lazy"
    assert not list((cache_root(env) / "images").glob("*.sqfs")), "lazy run pulled the image in full"
    [d] = lazy_dirs(env)
    stats = json.loads((d / "last-run.json").read_text())
    assert 0 < stats["fetched"] < size // 2, (stats, size)
    assert (d / "profile").read_text().split(), "no access profile was recorded"
    no_leftovers(owner, env)
    # a later run: the profile is prefetched, everything it needs is cached, same answer
    r = ok(owner.nagaya("run", "--pull", "lazy", ref, "/bin/busybox", "md5sum", "/big", env=env))
    whole = ok(owner.nagaya("run", "--pull", "full", ref, "/bin/busybox", "md5sum", "/big", env=fresh_cache(owner)))
    assert r.stdout == whole.stdout and len(r.stdout.split()[0]) == 32
    no_leftovers(owner, env)


def test_lazy_falls_back_to_full_without_an_artifact(site: Site, owner: SiteUser, archive: Path) -> None:
    ref = f"{site.registry}/{owner.name}/nolazy-{uuid.uuid4().hex[:6]}:1"
    local = f"local-{uuid.uuid4().hex[:8]}:1"
    ok(owner.nagaya("image", "import", str(archive), "--name", local))
    ok(owner.nagaya("push", local, ref, env={"NAGAYA_IMAGE_LAZY_PUBLISH": "false"}))
    env = fresh_cache(owner)
    r = ok(owner.nagaya("run", "--pull", "lazy", ref, env=env))
    assert r.stdout == "lazy"
    assert "no squashfs artifact" in r.stderr and "pulling in full" in r.stderr, r.stderr
    assert list((cache_root(env) / "images").glob("*.sqfs")), "the fallback did not pull"


def test_corrupted_blocks_are_refused(site: Site, owner: SiteUser, archive: Path) -> None:
    repo = f"{owner.name}/lazybad-{uuid.uuid4().hex[:6]}"
    ref = f"{site.registry}/{repo}:1"
    digest = pushed(owner, archive, ref)
    sq, size = artifact_squashfs(site, owner, repo, digest)
    blob = blob_file(site, sq)
    data = bytearray(blob.read_bytes())
    assert hashlib.sha256(data).hexdigest() == sq[7:]
    at = size - 100                              # the squashfs's tables live at its end: every run reads them
    data[at] ^= 0xFF
    blob.write_bytes(bytes(data))                # the registry now serves one flipped byte
    env = fresh_cache(owner)
    try:
        r = owner.nagaya("run", "--pull", "lazy", ref, env=env, timeout=120)
    finally:                                     # blobs are shared by digest: other tests push the same image
        data[at] ^= 0xFF
        blob.write_bytes(bytes(data))
    assert r.returncode != 0
    assert "lazy" not in r.stdout
    assert "failed verification" in r.stderr and "refused" in r.stderr, r.stderr
    for d in lazy_dirs(env):                     # the bad block never reached the cache
        have = (d / "have").read_bytes()
        assert have[at // (1 << 20)] == 0
    no_leftovers(owner, env)


class Relay:
    """A TCP relay to the registry that the test can take away."""

    def __init__(self, target: str, host: str = "127.0.0.1") -> None:
        thost, port = target.rsplit(":", 1)
        self.target = (thost, int(port))
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.up:
            try:
                c, _a = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(self.target)
            self.conns += [c, s]
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.up = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)        # wakes the accept() (close alone would not)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


def test_registry_gone_cached_blocks_work_others_fail_cleanly(site: Site, owner: SiteUser, archive: Path) -> None:
    repo = f"{owner.name}/lazygone-{uuid.uuid4().hex[:6]}"
    pushed(owner, archive, f"{site.registry}/{repo}:1")
    relay = Relay(site.registry)
    ref = f"127.0.0.1:{relay.port}/{repo}:1"
    env = fresh_cache(owner)
    auth = json.loads(owner.auth_file.read_text())         # the same login, for the relay's address
    auth["auths"][f"127.0.0.1:{relay.port}"] = auth["auths"][site.registry]
    st = owner.auth_file.stat()
    owner.auth_file.write_text(json.dumps(auth))
    os.chown(owner.auth_file, st.st_uid, st.st_gid)
    script = ("cat /msg; echo; read x; cat /msg; echo; "
              "if cat /big >/dev/null; then echo big-ok; else echo big-failed; fi")
    p = owner.u.popen(["nagaya", "run", "--pull", "lazy", ref, "/bin/busybox", "sh", "-c", script],
                      env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        first = p.stdout.readline()
        if first.strip() != "lazy":
            p.kill()
            raise AssertionError((first, p.communicate()))
        relay.stop()                                    # the registry goes away mid-run
        time.sleep(0.5)
        out, err = p.communicate("go\n", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        relay.stop()
    lines = out.split()
    assert lines == ["lazy", "big-failed"], (out, err)
    assert "lazy image read failed" in err and "cannot reach registry" in err, err
    assert len([x for x in err.splitlines() if "lazy image read failed" in x]) == 1, err
    no_leftovers(owner, env)


def test_another_users_private_image_gives_no_bytes(site: Site, owner: SiteUser, outsider: SiteUser,
                                                     archive: Path) -> None:
    ref = f"{site.registry}/{owner.name}/lazypriv-{uuid.uuid4().hex[:6]}:1"
    pushed(owner, archive, ref)
    env = fresh_cache(outsider)
    r = outsider.nagaya("run", "--pull", "lazy", ref, env=env)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == f"nagaya: {ref}: not found or access denied"
    assert not lazy_dirs(env)


def test_nodes_sharing_a_lazy_cache_fetch_each_block_once(site: Site, owner: SiteUser, archive: Path) -> None:
    """Three runs at once, each with a node-local cache of its own, sharing image.lazy_cache_dir (the shared
    file system of a job's nodes): the registry serves each block of the squashfs exactly once."""
    from tests.integration.test_registry_client import AccessLog

    repo = f"{owner.name}/lazyjob-{uuid.uuid4().hex[:6]}"
    ref = f"{site.registry}/{repo}:1"
    digest = pushed(owner, archive, ref)
    sq, size = artifact_squashfs(site, owner, repo, digest)
    shared = owner.u.mkdir(owner.u.home / f"shared-{uuid.uuid4().hex[:8]}")
    shared.chmod(0o700)
    log = AccessLog(site)
    envs = [{**fresh_cache(owner), "NAGAYA_IMAGE_LAZY_CACHE_DIR": str(shared / "lazy")} for _ in range(3)]
    procs = [owner.u.popen(["nagaya", "run", "--pull", "lazy", ref, "/bin/busybox", "md5sum", "/big"], env=e,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in envs]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o for o, _e in outs}) == 1 and len(outs[0][0].split()[0]) == 32
    ranges = [r for r in log.requests(repo) if r[0] == "GET" and r[1].endswith(f"/blobs/{sq}")]
    assert all(code == 206 for _m, _p, code in ranges), ranges
    assert len(ranges) == -(-size // (1 << 20)), (len(ranges), size)     # every block, each once
    for e in envs:
        assert not (cache_root(e) / "lazy").exists() or lazy_dirs(e) == []
        no_leftovers(owner, e)


def test_cache_cap_drops_lazy_blocks_but_not_under_a_run(site: Site, owner: SiteUser, archive: Path) -> None:
    ref = f"{site.registry}/{owner.name}/lazycap-{uuid.uuid4().hex[:6]}:1"
    pushed(owner, archive, ref)
    env = fresh_cache(owner)
    p = owner.u.popen(["nagaya", "run", "--pull", "lazy", ref, "/bin/busybox", "sh", "-c", "cat /msg; echo; read x"],
                      env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "lazy"
        [d] = lazy_dirs(env)
        gc = json.loads(ok(owner.nagaya("cache", "gc", "--max-size", "1K", "--json", env=env)).stdout)
        assert d.is_dir() and gc["size_before"] > 0, gc          # counted, but in use: kept
        p.communicate("go\n", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0
    gc = json.loads(ok(owner.nagaya("cache", "gc", "--max-size", "1K", "--json", env=env)).stdout)
    assert not d.exists() and gc["freed"] > 0, gc
    no_leftovers(owner, env)


def test_lazy_publish_for_an_image_pushed_without_it(site: Site, owner: SiteUser, outsider: SiteUser,
                                                     archive: Path) -> None:
    ref = f"{site.registry}/{owner.name}/latepub-{uuid.uuid4().hex[:6]}:1"
    local = f"local-{uuid.uuid4().hex[:8]}:1"
    ok(owner.nagaya("image", "import", str(archive), "--name", local))
    ok(owner.nagaya("push", local, ref, env={"NAGAYA_IMAGE_LAZY_PUBLISH": "false"}))
    r = outsider.nagaya("image", "lazy-publish", ref, env=fresh_cache(outsider))
    assert r.returncode != 0 and "not found or access denied" in r.stderr, r.stderr
    out = json.loads(ok(owner.nagaya("image", "lazy-publish", ref, "--json", env=fresh_cache(owner))).stdout)
    assert out["published"] is True and out["tag"].endswith(".sqfs")
    again = json.loads(ok(owner.nagaya("image", "lazy-publish", ref, "--json")).stdout)
    assert again["published"] is False
    env = fresh_cache(owner)
    r = ok(owner.nagaya("run", "--pull", "lazy", ref, env=env))
    assert r.stdout == "lazy" and "pulling in full" not in r.stderr, r.stderr
    assert lazy_dirs(env) and not list((cache_root(env) / "images").glob("*.sqfs"))
