"""Attacks on builds from the browser (THREAT_MODEL B23): hostile archives against the job's unpacking, git URLs
that reach past the site's list, requests that try to steer the dispatcher's build operation, and a compromised
server planting what the user's side reads. The cross-user and end-to-end parts: tests/integration/site/
test_builds.py (another user's build is a 404 on every door; hostile archives fail the job as the user)."""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from nagaya.build.remote import check_git_url, check_relative, safe_extract
from nagaya.errors import PermissionDenied, UsageError
from nagaya.server import jobs as jobs_mod
from nagaya.server.build_launch import check_build_args, uploads_root
from tests.integration.site.conftest import Site, SiteUser
from tests.security.helpers import as_service, request_as_server, wait_reply


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.linkname, t.mode = kind, link, mode
    return t


def _zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, mode in entries:
            zi = zipfile.ZipInfo(name)
            zi.external_attr = mode << 16
            z.writestr(zi, data)
    return buf.getvalue()


HOSTILE: dict[str, tuple[str, bytes]] = {
    "parent path": ("c.tar", _tar((_info("../outside"), b"x"))),
    "deep parent path": ("c.tar", _tar((_info("a/../../outside"), b"x"))),
    "absolute path": ("c.tar", _tar((_info("/tmp/abs-nagaya-test"), b"x"))),
    "symlink out": ("c.tar", _tar((_info("ln", tarfile.SYMTYPE, "/etc"), b""))),
    "symlink then write through it": ("c.tar", _tar((_info("d", tarfile.SYMTYPE, ".."), b""),
                                                    (_info("d/outside"), b"x"))),
    "hard link": ("c.tar", _tar((_info("h", tarfile.LNKTYPE, "/etc/shadow"), b""))),
    "device": ("c.tar", _tar((_info("null", tarfile.CHRTYPE), b""))),
    "fifo": ("c.tar", _tar((_info("p", tarfile.FIFOTYPE), b""))),
    "file then directory of the same name": ("c.tar", _tar((_info("x"), b"1"), (_info("x/y"), b"2"))),
    "twice the same file": ("c.tar", _tar((_info("x"), b"1"), (_info("x"), b"2"))),
    "zip parent path": ("c.zip", _zip([("../outside", b"x", stat.S_IFREG | 0o644)])),
    "zip symlink": ("c.zip", _zip([("ln", b"/etc/shadow", stat.S_IFLNK | 0o777)])),
    "zip absolute": ("c.zip", _zip([("/tmp/abs-nagaya-test", b"x", stat.S_IFREG | 0o644)])),
    "not an archive": ("c.tar", b"this is not a tar file at all" * 40),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_write_nothing_outside(case: str, tmp_path: Path) -> None:
    name, data = HOSTILE[case]
    arc = tmp_path / name
    arc.write_bytes(data)
    dest = tmp_path / "in" / "work"
    dest.parent.mkdir()
    with pytest.raises(UsageError):
        safe_extract(arc, dest, 1 << 20)
    assert not (tmp_path / "in" / "outside").exists() and not (tmp_path / "outside").exists()
    assert not Path("/tmp/abs-nagaya-test").exists()
    for root, dirs, files in os.walk(dest):
        for n in dirs + files:
            st = os.lstat(os.path.join(root, n))
            assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), n       # never a link or a device


def test_bombs_stop_at_the_limit_and_setuid_bits_go(tmp_path: Path) -> None:
    arc = tmp_path / "bomb.tar.gz"
    with tarfile.open(arc, "w:gz") as t:                     # 8 MiB of zeros: a few KiB compressed
        info = _info("zeros")
        info.size = 8 << 20
        t.addfile(info, io.BytesIO(b"\0" * (8 << 20)))
    with pytest.raises(UsageError, match="larger than this site allows"):
        safe_extract(arc, tmp_path / "w1", 1 << 20)
    ok = tmp_path / "ok.tar"
    ok.write_bytes(_tar((_info("bin/tool", mode=0o4755), b"#!/bin/sh\n"), (_info("sub/", tarfile.DIRTYPE), b"")))
    assert safe_extract(ok, tmp_path / "w2", 1 << 20) == 1
    assert stat.S_IMODE((tmp_path / "w2" / "bin" / "tool").stat().st_mode) == 0o755


def test_git_urls_outside_the_sites_list_are_refused() -> None:
    hosts, schemes = ["git.example.org", "10.1.2.3:8080"], ["https"]
    assert check_git_url("https://git.example.org/g/r.git", hosts, schemes)
    assert check_git_url("https://10.1.2.3:8080/r.git", hosts, schemes)
    for url in ("file:///etc/passwd", "ssh://git.example.org/r.git", "git@git.example.org:g/r.git",
                "http://git.example.org/r.git", "https://git.example.org.evil.net/r.git", "https://10.1.2.3/r.git",
                "https://10.1.2.3:8081/r.git", "https://user:pw@git.example.org/r.git", "https://x@git.example.org/r",
                "ext::sh -c id", "-uhttps://git.example.org/r.git", "https://git.example.org/r.git\n--upload-pack=x",
                "https://git.example.org /r.git", "", "fd::3"):
        with pytest.raises(UsageError):
            check_git_url(url, hosts, schemes)
    with pytest.raises(UsageError):                          # a site that lists no hosts builds from none
        check_git_url("https://git.example.org/g/r.git", [], schemes)
    for bad in ("../x", "/etc/passwd", "a/../../b", "", "a\0b", "x\ny"):
        with pytest.raises(UsageError):
            check_relative(bad)


def _good_args() -> dict[str, Any]:
    recipe = {"id": "a" * 32, "tag": "reg:5000/alice/x:1", "source": "upload", "sha256": "b" * 64,
              "archive": "context.tar"}
    return {"recipe": recipe, "upload": "c" * 32 + ".ctx",
            "login": {"registry": "reg:5000", "server": "http://s", "username": "alice", "secret": "nyu_x"},
            "spec": {"image": "(build) reg:5000/alice/x:1", "name": "build-x", "cpus": 1, "time_limit": 60}}


def test_the_dispatcher_refuses_build_requests_that_steer_it(people: dict[str, SiteUser]) -> None:
    good = _good_args()
    check_build_args(good)
    r = good["recipe"]
    for bad in ({**good, "upload": "../../etc/shadow"}, {**good, "upload": "c" * 32 + ".ctx/../x"},
                {**good, "rebuild_of": "d" * 32},                                     # both: which one?
                {**good, "upload": "", "rebuild_of": "../" + "d" * 29},
                {**good, "recipe": {**r, "id": "../../.ssh"}}, {**good, "recipe": {**r, "sha256": "x"}},
                {**good, "recipe": {**r, "archive": "../auth.json"}}, {**good, "recipe": {**r, "file": "../../x"}},
                {**good, "recipe": {**r, "source": "git", "git_url": "file:///etc", "git_schemes": ["https"]}},
                {**good, "recipe": {**r, "source": "shell"}}, {**good, "login": "root"},
                {**good, "recipe": {**r, "build_args": ["=x"]}}):
        with pytest.raises(UsageError):
            check_build_args(bad)
    victim = people["owner"].name
    req = {"id": "0" * 32, "user": victim, "op": "build_submit", "args": good}
    jobs_mod._check(req, "nagaya")
    with pytest.raises(PermissionDenied):
        jobs_mod._check({**req, "user": "root"}, "nagaya")
    with pytest.raises(PermissionDenied):
        jobs_mod._check({**req, "user": "nagaya"}, "nagaya")


def test_a_planted_upload_is_never_read(site: Site, people: dict[str, SiteUser]) -> None:
    """A compromised server plants links in its upload directory: the user's side never follows them; other
    users can neither list the directory nor write into it."""
    victim, other = people["owner"], people["outsider"]
    up = uploads_root(site.state_dir)
    st = up.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o771)
    assert other.run(["ls", str(up)]).returncode != 0                                   # not listable
    assert other.run(["touch", str(up / ("e" * 32 + ".ctx"))]).returncode != 0         # not writable
    for target in ("/etc/shadow", str(victim.u.home / ".bashrc")):
        name = secrets.token_hex(16) + ".ctx"
        r = as_service("import os,sys; os.symlink(sys.argv[1], sys.argv[2])", target, str(up / name))
        assert r.returncode == 0, r.stderr
        args = _good_args()
        args["upload"] = name
        args["recipe"] = {**args["recipe"], "id": secrets.token_hex(16), "tag": f"{site.registry}/{victim.name}/x:1"}
        reply = wait_reply(site, request_as_server(site, victim.name, "build_submit", args))
        assert reply is not None and "error" in reply, reply
        builds = victim.u.home / ".local" / "share" / "nagaya" / "builds"
        assert not (builds / args["recipe"]["id"]).exists()                              # nothing half-written
        subprocess.run(["rm", "-f", str(up / name)], check=True)
    # The same request with the real bytes (what the server writes) goes through: the victim's build is queued.
    data = _tar((_info("Dockerfile"), b"FROM scratch\n"))
    name = secrets.token_hex(16) + ".ctx"
    import hashlib

    r = as_service("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_EXCL, 0o644); "
                   "os.fchmod(fd, 0o644); os.write(fd, bytes.fromhex(sys.argv[2])); os.close(fd)",
                   str(up / name), data.hex())
    assert r.returncode == 0, r.stderr
    args = _good_args()
    args["upload"], bid = name, secrets.token_hex(16)
    args["recipe"] = {**args["recipe"], "id": bid, "sha256": hashlib.sha256(data).hexdigest(),
                      "tag": f"{site.registry}/{victim.name}/x:1"}
    reply = wait_reply(site, request_as_server(site, victim.name, "build_submit", args))
    assert reply is not None and "result" in reply, reply
    kept = victim.u.home / ".local" / "share" / "nagaya" / "builds" / bid
    assert (kept / "context.tar").read_bytes() == data and kept.stat().st_uid == victim.u.uid
    assert stat.S_IMODE((kept / "auth.json").stat().st_mode) == 0o600
    assert json.loads((kept / "recipe.json").read_text())["sha256"] == hashlib.sha256(data).hexdigest()
    victim.nagaya("job", "cancel", str(reply["result"]["id"]))
    subprocess.run(["rm", "-f", str(up / name)], check=True)
