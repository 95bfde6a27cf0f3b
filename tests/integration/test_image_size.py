"""`nagaya image inspect --size` as an unprivileged user, on an image built to bloat in every known way: each
figure of the report is checked against what the layers hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import images
from tests.helpers.users import User

pytestmark = pytest.mark.integration
KB = 1024


def _bloated(dest: Path) -> Path:
    big = b"B" * (300 * KB)
    lib = b"L" * (120 * KB)
    base = images.tar_bytes([
        images.entry("usr/", "dir"), images.entry("usr/lib/", "dir"),
        images.entry("usr/lib/libbig.so", "file", lib),
        images.entry("opt/", "dir"),
        images.entry("opt/big.bin", "file", big),                        # deleted by layer 3
        images.entry("etc/", "dir"), images.entry("etc/conf", "file", b"v1" * 5 * KB),   # replaced by layer 2
        images.entry("data/", "dir"), images.entry("data/a", "file", b"a" * 8 * KB),
        images.entry("data/b", "file", b"b" * 8 * KB),                  # under an opaque dir in layer 2
    ])
    upper = images.tar_bytes([
        images.entry("etc/conf", "file", b"v2" * 6 * KB),
        images.entry("data/", "dir"), images.entry("data/.wh..wh..opq", "file", b""),
        images.entry("data/new", "file", b"n" * KB),
        images.entry("app/", "dir"), images.entry("app/libcopy.so", "file", lib),      # duplicate of layer 1
        images.entry("var/lib/apt/lists/", "dir"),
        images.entry("var/lib/apt/lists/deb.debian.org_dists_main", "file", b"P" * 50 * KB),
        images.entry("var/lib/apt/lists/lock", "file", b""),
        images.entry("root/.cache/pip/http/ab", "file", b"W" * 20 * KB),
        images.entry("app/pkg/__pycache__/m.cpython-311.pyc", "file", b"C" * 3 * KB),
    ])
    top = images.tar_bytes([images.entry("opt/.wh.big.bin", "file", b"")])
    return images.oci_layout(dest, [base, upper, top], {"Cmd": ["/bin/sh"]})


def test_size_report(alice: User, workdir: Path, fresh_cache: dict[str, str]) -> None:
    layout = _bloated(workdir / "bloated")
    alice.chown_tree(layout)
    assert alice.nagaya("image", "import", str(layout), "--name", "bloat:1", env=fresh_cache).returncode == 0
    r = alice.nagaya("image", "inspect", "--size", "bloat:1", "--json", env=fresh_cache)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [x["index"] for x in rep["layers"]] == [1, 2, 3]
    shipped = (300 + 120 + 10 + 16) * KB + (12 + 1 + 120 + 50 + 20 + 3) * KB
    assert rep["shipped_bytes"] == shipped
    hidden = {h["path"]: h for h in rep["hidden"]["largest"]}
    assert hidden["/opt/big.bin"]["how"] == "deleted" and hidden["/opt/big.bin"]["by_layer"] == 3
    assert hidden["/etc/conf"]["how"] == "replaced" and hidden["/etc/conf"]["size"] == 10 * KB
    assert {"/data/a", "/data/b"} <= set(hidden)
    assert rep["hidden"]["bytes"] == (300 + 10 + 16) * KB and rep["hidden"]["files"] == 4
    assert rep["visible_bytes"] == shipped - rep["hidden"]["bytes"]
    assert rep["largest_files"][0] == {"path": "/usr/lib/libbig.so", "size": 120 * KB, "layer": 1}
    assert rep["largest_dirs"][0]["path"] in ("/usr", "/usr/lib", "/app")
    dup = rep["duplicates"]["largest"][0]
    assert dup["copies"] == 2 and dup["size"] == 120 * KB and rep["duplicates"]["bytes"] == 120 * KB
    assert {p["path"] for p in dup["paths"]} == {"/usr/lib/libbig.so", "/app/libcopy.so"}
    kinds = {c["kind"]: c for c in rep["caches"]["kinds"]}
    assert kinds["apt lists"]["bytes"] == 50 * KB and kinds["apt lists"]["files"] == 1      # not the lock
    assert kinds["pip cache"]["bytes"] == 20 * KB and kinds["__pycache__"]["bytes"] == 3 * KB
    assert rep["caches"]["bytes"] == 73 * KB
    assert rep["rebuild_saves"] == rep["hidden"]["bytes"] + 120 * KB + 73 * KB
    # The summary names the same figures.
    t = alice.nagaya("image", "inspect", "--size", "bloat:1", env=fresh_cache)
    assert t.returncode == 0, t.stderr
    assert "a rebuild would save" in t.stdout and "/opt/big.bin" in t.stdout and "apt lists" in t.stdout
    # Plain inspect stays JSON by default.
    assert json.loads(alice.nagaya("image", "inspect", "bloat:1", env=fresh_cache).stdout)["layers"]


def test_size_report_needs_layers(alice: User, app_layout: Path, workdir: Path, fresh_cache: dict[str, str]) -> None:
    """An image that came as a single file has no layers to read: one line saying so."""
    assert alice.nagaya("image", "import", str(app_layout), "--name", "app:1", env=fresh_cache).returncode == 0
    nsq = workdir / "app.nsq"
    assert alice.nagaya("image", "export", "--sqsh", "-o", str(nsq), "app:1", env=fresh_cache).returncode == 0
    other = {"XDG_CACHE_HOME": str(alice.mkdir(workdir / "c2"))}
    assert alice.nagaya("image", "import", str(nsq), env=other).returncode == 0
    r = alice.nagaya("image", "inspect", "--size", "app", env=other)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "layers are not in the cache" in r.stderr
