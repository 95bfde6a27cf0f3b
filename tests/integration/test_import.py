"""`nagaya image import/images/inspect/rm` as an unprivileged user, on every source kind, and on
hostile or broken input (a one-line error, a non-zero exit, and nothing left in the cache)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import zstandard

from tests.helpers import images
from tests.helpers.users import User

pytestmark = pytest.mark.integration


def _cache_state(cache: Path) -> tuple[set[str], set[str], list[str]]:
    n = cache / "nagaya"
    imgs = {p.name for p in (n / "images").glob("*")} if (n / "images").exists() else set()
    blobs = {p.name for p in (n / "blobs" / "sha256").glob("*")} if (n / "blobs").exists() else set()
    tmp = sorted(os.listdir(n / "tmp")) if (n / "tmp").exists() else []
    return imgs, blobs, tmp


def _give(user: User, path: Path) -> Path:
    user.chown_tree(path) if path.is_dir() else os.chown(path, user.uid, user.gid)
    return path


def test_import_every_source_kind_and_dedupe(alice: User, rootfs: Path, app_layout: Path, workdir: Path,
                                            fresh_cache: dict[str, str]) -> None:
    tar = workdir / "rootfs.tar"
    tar.write_bytes(images.dir_tar(rootfs))
    (workdir / "rootfs.tar.gz").write_bytes(gzip.compress(tar.read_bytes(), mtime=0))
    (workdir / "rootfs.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(tar.read_bytes()))
    archive = images.oci_archive(app_layout, workdir / "app.oci.tar")
    for p in workdir.iterdir():
        _give(alice, p)
    sources = {"dir": rootfs, "tar": tar, "targz": workdir / "rootfs.tar.gz", "tarzst": workdir / "rootfs.tar.zst",
               "layout": app_layout, "archive": archive}
    digests = {}
    for name, src in sources.items():
        r = alice.nagaya("image", "import", str(src), "--name", f"k/{name}:v1", "--json", env=fresh_cache)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        out = json.loads(r.stdout)
        digests[name] = out["digest"]
        run = alice.nagaya("run", f"k/{name}:v1", "cat", "/app/data.txt", env=fresh_cache)
        assert run.returncode == 0, run.stderr
    # The OCI archive is the layout in a tar: the same manifest, so the same image.
    assert digests["layout"] == digests["archive"]
    # The same tar bytes give the same image; importing twice stores it once.
    r = alice.nagaya("image", "import", str(tar), "--name", "again:v2", "--json", env=fresh_cache)
    assert json.loads(r.stdout)["digest"] == digests["tar"]
    listing = json.loads(alice.nagaya("images", "--json", env=fresh_cache).stdout)
    assert {(x["name"], x["tag"]) for x in listing} >= {("k/dir", "v1"), ("again", "v2"), ("k/layout", "v1")}
    for x in listing:
        assert x["digest"].startswith("sha256:") and x["size"] > 0 and x["created"]
    sqfs = list((Path(fresh_cache["XDG_CACHE_HOME"]) / "nagaya" / "images").glob("*.sqfs"))
    assert len(sqfs) == len(set(digests.values()))


def test_inspect_and_rm(alice: User, app_layout: Path, fresh_cache: dict[str, str]) -> None:
    assert alice.nagaya("image", "import", str(app_layout), "--name", "app:1", env=fresh_cache).returncode == 0
    assert alice.nagaya("image", "tag", "app:1", "app:alias", env=fresh_cache).returncode == 0
    info = json.loads(alice.nagaya("image", "inspect", "app:1", env=fresh_cache).stdout)
    assert info["entrypoint"] == ["/app/ep.sh"] and info["cmd"] == ["default"]
    assert info["workdir"] == "/app" and info["labels"] == {"org.example.team": "hpc"}
    assert "FROM_IMAGE=image" in info["env"] and len(info["layers"]) == 2
    assert sorted(info["tags"]) == ["app:1", "app:alias"]
    # By digest prefix too.
    assert json.loads(alice.nagaya("image", "inspect", info["digest"][7:19], env=fresh_cache).stdout)["digest"] \
        == info["digest"]
    # Removing one tag keeps the image; removing the last deletes it.
    r = alice.nagaya("image", "rm", "app:alias", env=fresh_cache)
    assert r.returncode == 0 and "untagged" in r.stdout and "deleted" not in r.stdout
    r = alice.nagaya("image", "rm", "app:1", env=fresh_cache)
    assert r.returncode == 0 and "deleted" in r.stdout
    imgs, _blobs, _tmp = _cache_state(Path(fresh_cache["XDG_CACHE_HOME"]))
    assert not [x for x in imgs if x.endswith((".sqfs", ".json"))]
    r = alice.nagaya("image", "inspect", "app:1", env=fresh_cache)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "not found" in r.stderr


HOSTILE = {
    "dotdot": ([images.entry("../escaped", data=b"x")], "outside the image root"),
    "deep-dotdot": ([images.entry("a/../../escaped", data=b"x")], "outside the image root"),
    "symlink-out": ([images.entry("etc", "symlink", link="/tmp/nagaya-outside"),
                     images.entry("etc/passwd", data=b"pwned")], "through the symlink"),
    "relative-symlink-out": ([images.entry("lnk", "symlink", link="../../../tmp/nagaya-outside"),
                              images.entry("lnk/f", data=b"x")], "through the symlink"),
    "device": ([images.entry("bin", "dir"), images.entry("bin/sda", "blk")], "device node"),
    "hardlink-out": ([images.entry("x", "hardlink", link="../../etc/shadow")], "outside the image root"),
    "hardlink-missing": ([images.entry("x", "hardlink", link="etc/shadow")], "not a file of the image"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tarball_is_refused(alice: User, workdir: Path, fresh_cache: dict[str, str], case: str) -> None:
    members, message = HOSTILE[case]
    tar = workdir / f"{case}.tar"
    tar.write_bytes(images.tar_bytes([images.entry("ok.txt", data=b"fine"), *members]))
    _give(alice, tar)
    cache = Path(fresh_cache["XDG_CACHE_HOME"])
    r = alice.nagaya("image", "import", str(tar), "--name", "evil", env=fresh_cache)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr and "Traceback" not in r.stderr
    imgs, blobs, tmp = _cache_state(cache)
    assert not imgs and not blobs and not tmp, (imgs, blobs, tmp)
    assert not os.path.lexists("/tmp/nagaya-outside") and not (workdir.parent / "escaped").exists()
    assert alice.nagaya("images", "--json", env=fresh_cache).stdout.strip() == "[]"


def test_devices_under_dev_are_dropped_and_whiteouts_applied(alice: User, rootfs: Path, workdir: Path,
                                                             fresh_cache: dict[str, str]) -> None:
    base = images.dir_tar(rootfs)
    upper = images.tar_bytes([
        images.entry("dev/", "dir"), images.entry("dev/null", "chr"),
        images.entry("app/", "dir"), images.entry("app/.wh.data.txt", data=b""),
        images.entry("etc/", "dir"), images.entry("etc/.wh..wh..opq", data=b""),
        images.entry("etc/only-upper", data=b"u"),
    ])
    layout = images.oci_layout(workdir / "wh", [base, upper], {"Env": ["PATH=/bin"]})
    _give(alice, layout)
    r = alice.nagaya("image", "import", str(layout), "--name", "wh", env=fresh_cache)
    assert r.returncode == 0, r.stderr
    r = alice.nagaya("run", "wh", "sh", "-c", "ls /etc; test -e /app/data.txt && echo present; ls /app; "
                     "grep -c ^root: /etc/passwd; ls -l /dev/null", env=fresh_cache)
    assert r.returncode == 0, r.stderr
    # The opaque /etc hides the base's passwd (so the generated one has no root entry) but not the upper file.
    assert "only-upper" in r.stdout.split() and r.stdout.split().count("0") >= 1
    assert "present" not in r.stdout and "trap.sh" in r.stdout


@pytest.mark.parametrize("case", ["truncated", "not-a-tar", "corrupt-layer", "other-arch", "missing-dir"])
def test_broken_sources(alice: User, rootfs: Path, workdir: Path, fresh_cache: dict[str, str], case: str) -> None:
    if case == "truncated":
        src = workdir / "t.tar.gz"
        data = gzip.compress(images.dir_tar(rootfs), mtime=0)
        src.write_bytes(data[: len(data) // 2])
    elif case == "not-a-tar":
        src = workdir / "junk.bin"
        src.write_bytes(os.urandom(10000))
    elif case == "corrupt-layer":
        src = images.oci_layout(workdir / "bad", [images.dir_tar(rootfs)], {}, corrupt_layer=True)
    elif case == "other-arch":
        src = images.oci_layout(workdir / "arm", [images.dir_tar(rootfs)], {}, arch="s390x")
    else:
        src = workdir / "nope"
    if src.exists():
        _give(alice, src)
    r = alice.nagaya("image", "import", str(src), "--name", "broken", env=fresh_cache)
    assert r.returncode != 0 and r.stderr.startswith("nagaya: ") and r.stderr.strip().count("\n") == 0, r.stderr
    imgs, blobs, tmp = _cache_state(Path(fresh_cache["XDG_CACHE_HOME"]))
    assert not imgs and not blobs and not tmp
