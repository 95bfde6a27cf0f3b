"""Single-file images (`nagaya image export --sqsh`), as an unprivileged user: the file runs as a program and
through `nagaya run FILE`, imports elsewhere with its digest intact, and a tampered or damaged file is refused
with one line and nothing written to the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers.users import User

pytestmark = pytest.mark.integration
PASS = "correct horse battery staple"


def ok(r):  # -> CompletedProcess
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def exported(alice: User, app_layout: Path, workdir: Path, fresh_cache: dict[str, str]) -> tuple[Path, str]:
    r = ok(alice.nagaya("image", "import", str(app_layout), "--name", "app:1", "--json", env=fresh_cache))
    digest = json.loads(r.stdout)["digest"]
    out = workdir / "app.nsq"
    r = ok(alice.nagaya("image", "export", "--sqsh", "-o", str(out), "app:1", "--json", env=fresh_cache))
    info = json.loads(r.stdout)
    assert info["format"] == "nsq" and info["digest"] == digest and info["size"] == out.stat().st_size
    return out, digest


def _other_cache(alice: User, workdir: Path, name: str) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(alice.mkdir(workdir / name))}


def test_runs_as_program_and_via_nagaya_run(alice: User, exported: tuple[Path, str], workdir: Path) -> None:
    nsq, _digest = exported
    st = nsq.stat()
    assert st.st_uid == alice.uid and st.st_mode & 0o777 == 0o755       # the user's own file, executable
    head = nsq.read_bytes()[:4096]
    assert head.startswith(b"#!/bin/sh\n") and b'exec nagaya run "$0" "$@"' in head
    # A cache that never saw the image: the file alone is enough (the entrypoint and Cmd come with it).
    env = _other_cache(alice, workdir, "c2")
    r = ok(alice.run([str(nsq), "hello", "there"], env=env, cwd=workdir))
    assert "hello there" in r.stdout, r.stdout
    r = ok(alice.nagaya("run", "./app.nsq", "a", "b", env=env, cwd=workdir))
    assert r.stdout.startswith("ep a b\n")
    r = ok(alice.nagaya("exec", str(nsq), "sh", "-c", "cat /app/data.txt; echo $FROM_IMAGE", env=env, cwd=workdir))
    assert r.stdout.split() == ["upper", "data", "image"]
    # Running did not put the image into the cache (only the verdict of the digest check).
    assert not list((workdir / "c2" / "nagaya" / "images").glob("*.sqfs")) if (workdir / "c2" / "nagaya" /
                                                                               "images").exists() else True


def test_import_keeps_digest(alice: User, exported: tuple[Path, str], workdir: Path) -> None:
    nsq, digest = exported
    env = _other_cache(alice, workdir, "c3")
    r = ok(alice.nagaya("image", "import", str(nsq), "--json", env=env))
    out = json.loads(r.stdout)
    assert out["digest"] == digest and out["name"] == "app"
    info = json.loads(ok(alice.nagaya("image", "inspect", "app", env=env)).stdout)
    assert info["digest"] == digest and info["entrypoint"] == ["/app/ep.sh"]
    r = ok(alice.nagaya("exec", "app", "cat", "/app/data.txt", env=env))
    assert r.stdout == "upper data\n"
    # Importing twice is one image; a name can be given.
    r = ok(alice.nagaya("image", "import", str(nsq), "--name", "again:2", "--json", env=env))
    assert json.loads(r.stdout)["digest"] == digest
    assert len(list((workdir / "c3" / "nagaya" / "images").glob("*.sqfs"))) == 1


def _cache_files(cache: Path) -> set[str]:
    n = cache / "nagaya"
    out = set()
    for sub in ("images", "blobs/sha256", "refs"):
        if (n / sub).exists():
            out |= {str(p.relative_to(n)) for p in (n / sub).rglob("*")}
    return out


def test_tampered_file_refused(alice: User, exported: tuple[Path, str], workdir: Path) -> None:
    nsq, _digest = exported
    bad = workdir / "bad.nsq"
    data = bytearray(nsq.read_bytes())
    data[-100] ^= 0xFF                          # inside the squashfs (its tables lie at the end)
    bad.write_bytes(bytes(data))
    os.chown(bad, alice.uid, alice.gid)
    bad.chmod(0o755)
    env = _other_cache(alice, workdir, "c4")
    for args in (["run", str(bad), "true"], ["image", "import", str(bad), "--name", "bad:1"]):
        r = alice.nagaya(*args, env=env)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "does not match its recorded digest" in lines[0], r.stderr
    r = alice.run([str(bad), "true"], env=env, cwd=workdir)
    assert r.returncode != 0 and "does not match its recorded digest" in r.stderr
    assert _cache_files(workdir / "c4") == set()
    # A truncated file, and a file that is no image: one line each.
    short = workdir / "short.nsq"
    short.write_bytes(nsq.read_bytes()[:-4096])
    os.chown(short, alice.uid, alice.gid)
    r = alice.nagaya("image", "import", str(short), "--name", "s:1", env=env)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "truncated" in r.stderr
    assert _cache_files(workdir / "c4") == set()


def test_world_writable_file_refused(alice: User, exported: tuple[Path, str], workdir: Path) -> None:
    nsq, _digest = exported
    nsq.chmod(0o777)
    r = alice.nagaya("run", str(nsq), "true", env=_other_cache(alice, workdir, "c5"))
    assert r.returncode != 0 and "writable by other accounts" in r.stderr


def test_signed_export_verifies_on_import(alice: User, app_layout: Path, workdir: Path,
                                          fresh_cache: dict[str, str]) -> None:
    keyenv = {"XDG_CONFIG_HOME": str(alice.mkdir(workdir / "config")), "NAGAYA_KEY_PASSPHRASE": PASS}
    env = {**fresh_cache, **keyenv}
    for name in ("signer", "stranger"):
        ok(alice.nagaya("key", "create", "-o", name, "--json", env=env))
    ok(alice.nagaya("image", "import", str(app_layout), "--name", "app:1", env=env))
    signed = workdir / "signed.nsq"
    plain = workdir / "plain.nsq"
    ok(alice.nagaya("image", "export", "--sqsh", "--sign", "signer", "-o", str(signed), "app:1", env=env))
    ok(alice.nagaya("image", "export", "--sqsh", "-o", str(plain), "app:1", env=env))
    other = {**_other_cache(alice, workdir, "c6"), **keyenv}
    ok(alice.nagaya("image", "import", str(signed), "--key", "signer", env=other))
    for f, key in ((signed, "stranger"), (plain, "signer")):
        r = alice.nagaya("image", "import", str(f), "--name", "x:1", "--key", key, env=other)
        assert r.returncode != 0 and "not signed by any of the given keys" in r.stderr
    # A signature covers the metadata: changing the recorded squashfs digest breaks it.
    data = signed.read_bytes()
    meta_at = data.index(b'{"config"')
    at = data.index(b'"source": "', meta_at) + len(b'"source": "')
    forged = data[:at] + (b"X" if data[at:at + 1] != b"X" else b"Y") + data[at + 1:]     # same length
    assert forged != data
    f2 = workdir / "forged.nsq"
    f2.write_bytes(forged)
    os.chown(f2, alice.uid, alice.gid)
    r = alice.nagaya("image", "import", str(f2), "--name", "f:1", "--key", "signer", env=other)
    assert r.returncode != 0 and "not signed by any of the given keys" in r.stderr


def test_changed_after_a_good_run_is_refused(alice: User, exported: tuple[Path, str], workdir: Path,
                                             fresh_cache: dict[str, str]) -> None:
    """The first run's verdict is remembered for this inode, size and change time only: the file changed in
    place afterwards is checked again, and refused."""
    nsq, _digest = exported
    ok(alice.nagaya("run", str(nsq), "x", env=fresh_cache))
    memo = list((Path(fresh_cache["XDG_CACHE_HOME"]) / "nagaya" / "nsq").iterdir())
    assert len(memo) == 1 and memo[0].stat().st_uid == alice.uid
    ok(alice.nagaya("run", str(nsq), "x", env=fresh_cache))
    with open(nsq, "r+b") as f:                 # as root, in place: same inode, new ctime
        f.seek(-100, os.SEEK_END)
        b = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    r = alice.nagaya("run", str(nsq), "x", env=fresh_cache)
    assert r.returncode != 0 and "does not match its recorded digest" in r.stderr
