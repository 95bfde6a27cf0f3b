"""nagaya-squashfs, nagaya's own FUSE server for its images, as an unprivileged user: it shows an image exactly as
squashfuse_ll does and as the tree it was made from (modes, owners, times, links, devices, sparse and large files,
xattrs), serves many readers at once with correct data, refuses a corrupt image with one line before mounting
anything, exits when unmounted, and `nagaya run` works on it."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NAGAYA_SQUASHFS, require
from tests.helpers.users import User

pytestmark = pytest.mark.integration
SERVER = NAGAYA_SQUASHFS
SQUASHFUSE = "/usr/bin/squashfuse_ll"
PY = "/opt/nagaya/bin/python3"
BIG = (4 << 30) + 12345             # > 4 GiB, sparse: an extended inode with 64-bit sizes

# Walks a tree and prints, per path: type and mode, owner, size, mtime, nlink, rdev, link target, a hash of the
# contents (of a sample of ranges for huge files), xattrs, and an inode group so hard links can be compared.
WALK = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out, inos = {}, {}
for d, dirs, files in os.walk(root):
    for n in [""] + sorted(dirs + files):
        p = os.path.join(d, n) if n else d
        if n == "" and d != root:
            continue
        st = os.lstat(p)
        rel = os.path.relpath(p, root)
        rec = [st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns // 10**9, st.st_rdev]
        if not stat.S_ISDIR(st.st_mode):
            rec += [st.st_size, st.st_nlink, inos.setdefault(st.st_ino, rel)]
        else:
            rec += [st.st_nlink]
        if stat.S_ISLNK(st.st_mode):
            rec.append(os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                if st.st_size > 1 << 26:
                    for off in (0, 1 << 20, 1 << 32, st.st_size - 70000):
                        h.update(os.pread(f.fileno(), 200000, off))
                else:
                    h.update(f.read())
            rec.append(h.hexdigest())
        try:
            rec.append(sorted((k, os.getxattr(p, k, follow_symlinks=False).hex())
                              for k in os.listxattr(p, follow_symlinks=False)))
        except OSError as e:
            rec.append(e.errno)
        out[rel] = rec
json.dump(out, sys.stdout)
"""

# Many threads read random ranges of every file and compare them with the sha256 of each range as read whole.
READERS = r"""
import hashlib, os, random, sys, threading
root, n = sys.argv[1], int(sys.argv[2])
files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
         if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
         and os.path.getsize(os.path.join(d, f)) < 1 << 26]
whole = {}
for p in files:
    with open(p, "rb") as f:
        whole[p] = f.read()
# drop the page cache's copy is not possible unprivileged: a second mount (argv[3]) is read cold instead
other = sys.argv[3]
bad = []
def work(seed):
    r = random.Random(seed)
    for _ in range(300):
        p = r.choice(files)
        data = whole[p]
        off = r.randrange(0, max(1, len(data)))
        ln = r.randrange(0, 1 << 18)
        q = os.path.join(other, os.path.relpath(p, root))
        with open(q, "rb") as f:
            got = os.pread(f.fileno(), ln, off)
        if got != data[off:off + ln]:
            bad.append((q, off, ln))
ts = [threading.Thread(target=work, args=(i,)) for i in range(n)]
[t.start() for t in ts]
[t.join() for t in ts]
print("bad", len(bad), bad[:3])
"""


def _tree(src: Path) -> None:
    """A tree with what images hold: every file type, odd sizes, hard links, deep and wide directories."""
    src.mkdir()
    (src / "empty").write_bytes(b"")
    (src / "small.txt").write_bytes(b"hello\n")
    rnd = hashlib.sha256(b"seed").digest() * 40000           # 1.28 MB, little compressible
    for name, size in (("block", 131072), ("block+1", 131073), ("block-1", 131071), ("big.bin", len(rnd)),
                       ("three-blocks", 3 * 131072)):
        (src / name).write_bytes((rnd * 2)[:size])
    (src / "text.txt").write_bytes(b"line of text\n" * 50000)
    (src / "mode-0600").write_bytes(b"secret\n")
    (src / "mode-0600").chmod(0o600)
    (src / "setuid").write_bytes(b"#!/bin/sh\n")
    (src / "setuid").chmod(0o4755)
    (src / "owned").write_bytes(b"x")
    os.chown(src / "owned", 1234, 5678)
    os.link(src / "small.txt", src / "hardlink")
    os.symlink("small.txt", src / "symlink")
    os.symlink("/nonexistent/" + "x" * 200, src / "dangling")
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "blk", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    os.mkfifo(src / "fifo")
    with open(src / "sparse", "wb") as f:                    # holes between data blocks
        f.seek(5 << 20)
        f.write(b"middle")
        f.seek(9 << 20)
        f.write(b"end")
    with open(src / "huge", "wb") as f:
        f.truncate(BIG)
        f.seek(1 << 32)
        f.write(b"past 4 GiB")
    deep = src
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"deep\n")
    wide = src / "wide"
    wide.mkdir()
    for i in range(3000):                                    # several directory headers and index entries
        (wide / f"entry-{i:05d}-{'n' * (i % 90)}").write_bytes(str(i).encode())
    os.mkdir(src / "emptydir")
    os.mkdir(src / "mode-0700dir", 0o700)
    for p in [src, *src.rglob("*")]:
        os.utime(p, (1700000000, 1700000000 + len(p.name)), follow_symlinks=False)


def _write_tar(src: Path):  # -> Callable[[IO[bytes]], None]
    def write(stream) -> None:
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as t:
            for n in sorted(os.listdir(src)):
                t.add(src / n, arcname=n)
            for name, xattrs in (("xattr-file", {"user.note": "a note", "user.other": "x" * 300}),
                                 ("xattr-empty", {"user.empty": "", "user.note": "n"})):
                info = tarfile.TarInfo(name)            # xattrs: only the servers are compared on these
                info.mode, info.mtime, info.size = 0o644, 1700000000, 3
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
                t.addfile(info, io.BytesIO(b"xa\n"))
    return write


@pytest.fixture(scope="module")
def server(system: None) -> str:
    require(os.access(SERVER, os.X_OK), f"{SERVER} is not installed (bash deploy/install.sh)")
    return SERVER


@pytest.fixture(scope="module")
def image(server: str, shared_tmp: Path) -> tuple[Path, Path]:
    from nagaya.image import squash

    src = shared_tmp / "sqfs-src"
    _tree(src)
    out = shared_tmp / "sqfs-test.sqfs"
    squash.build(_write_tar(src), out)
    out.chmod(0o644)
    return src, out


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _mount(user: User, exe: str, image: Path, mnt: Path, *opts: str) -> subprocess.Popen:
    user.mkdir(mnt)
    p = user.popen([exe, "-f", *opts, str(image), str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(200):
        if _mounted(mnt):
            return p
        if p.poll() is not None:
            raise AssertionError(f"{exe} exited {p.returncode}: {p.stderr.read() if p.stderr else ''}")
        time.sleep(0.05)
    p.kill()
    raise AssertionError(f"{exe} did not mount {mnt}")


def _held_elsewhere(mnt: Path) -> bool:
    """Whether another mount namespace holds a copy of the mount (a container started meanwhile on this shared
    machine copies every mount when it unshares): the FUSE session then outlives our unmount."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                if any(line.split()[4] == str(mnt) for line in f):
                    return True
        except (OSError, IndexError):
            continue
    return False


def _unmount(user: User, p: subprocess.Popen, mnt: Path) -> int:
    r = user.run(["fusermount3", "-u", str(mnt)])
    assert not _mounted(mnt), r.stderr
    try:
        return p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        held = _held_elsewhere(mnt)
        p.terminate()
        p.wait(timeout=10)
        assert held, "the server did not exit when unmounted"
        return 0


@pytest.fixture
def both(alice: User, server: str, image: tuple[Path, Path], workdir: Path) -> Iterator[tuple[Path, Path]]:
    """The test image mounted by alice with nagaya-squashfs and with squashfuse_ll."""
    ours, theirs = workdir / "ours", workdir / "theirs"
    p1 = _mount(alice, server, image[1], ours)
    p2 = _mount(alice, SQUASHFUSE, image[1], theirs)
    try:
        yield ours, theirs
    finally:
        _unmount(alice, p1, ours)
        _unmount(alice, p2, theirs)


def _walk(user: User, root: Path) -> dict[str, list]:
    r = user.run([PY, "-c", WALK, str(root)], timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_same_as_squashfuse_and_the_source(alice: User, both: tuple[Path, Path], image: tuple[Path, Path]) -> None:
    ours, theirs = both
    a, b = _walk(alice, ours), _walk(alice, theirs)
    assert len(a) > 3000 and a.keys() == b.keys()
    # squashfuse_ll 0.1.105 answers ENODATA for an xattr whose value is empty: ours gives the value
    assert b.pop("xattr-empty")[-1] == 61
    assert a.pop("xattr-empty")[-1] == [["user.empty", ""], ["user.note", b"n".hex()]]
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert not diff, list(diff.items())[:5]
    assert a["xattr-file"][-1] == [["user.note", b"a note".hex()], ["user.other", (b"x" * 300).hex()]]
    # The source tree, walked as root (its 0600 files); xattrs, the root directory's entry and a directory's
    # link count (tar2sqfs counts every entry, the source's file system only subdirectories) aside.
    src = json.loads(subprocess.run([PY, "-c", WALK, str(image[0])], capture_output=True, text=True,
                                    check=True).stdout)

    def comparable(v: list) -> list:
        return v[:5] if stat.S_ISDIR(v[0]) else v[:-1]

    mine = {k: comparable(v) for k, v in a.items() if k not in ("xattr-file", ".")}
    want = {k: comparable(v) for k, v in src.items() if k != "."}
    diff = {k: (mine.get(k), want.get(k)) for k in mine.keys() | want.keys() if mine.get(k) != want.get(k)}
    assert not diff, sorted(diff.items())[:5]
    # statfs: a read-only image
    r = alice.run(["stat", "-f", "-c", "%s %b", str(ours)])
    assert r.returncode == 0 and int(r.stdout.split()[0]) == 131072


def test_many_readers(alice: User, both: tuple[Path, Path]) -> None:
    ours, theirs = both
    # 16 threads read ranges of our mount (cold) and compare with squashfuse_ll's reading of each whole file.
    r = alice.run([PY, "-c", READERS, str(theirs), "16", str(ours)], timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bad 0 "), r.stdout


def test_exits_when_unmounted(alice: User, server: str, image: tuple[Path, Path], workdir: Path) -> None:
    """Mounted in a mount namespace of alice's own (as nagaya mounts it), so that no other process can hold a copy
    of the mount: unmounting it ends the session, and the server exits 0."""
    mnt = alice.mkdir(workdir / "m")
    script = (f"{server} -f {image[1]} {mnt} & pid=$!; "
              f"for i in $(seq 100); do mountpoint -q {mnt} && break; sleep 0.05; done; "
              f"cat {mnt}/small.txt; umount {mnt}; wait $pid; echo exit=$?")
    r = alice.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], timeout=60)
    assert r.stdout == "hello\nexit=0\n", r.stdout + r.stderr
    assert not [x for x in alice.processes() if "nagaya-squashfs" in x]


def test_read_only(alice: User, both: tuple[Path, Path]) -> None:
    """Files are opened by the kernel without asking the server (no_open): the mount itself refuses writes, also
    after a file was opened for reading."""
    ours, _ = both
    r = alice.run([PY, "-c", "import os, sys\n"
                   "for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):\n"
                   "    try:\n"
                   "        os.close(os.open(sys.argv[1], flags)); print('opened')\n"
                   "    except OSError as e:\n"
                   "        print(e.errno)\n"
                   "try:\n"
                   "    os.close(os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o644)); print('created')\n"
                   "except OSError as e:\n"
                   "    print(e.errno)\n", str(ours / "hardlink"), str(ours / "new-file")])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["opened", *[str(errno.EROFS)] * 4], r.stdout


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad-table", "missing"])
def test_corrupt_image_refused(alice: User, server: str, image: tuple[Path, Path], workdir: Path,
                               damage: str) -> None:
    data = image[1].read_bytes()
    bad = workdir / "bad.sqfs"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(200000))
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "bad-table":            # the superblock intact, the tables after it overwritten
        bad.write_bytes(data[:96] + bytes(len(data) - 96))
    if damage != "missing":
        os.chown(bad, alice.uid, alice.gid)
    mnt = alice.mkdir(workdir / "m")
    r = alice.run([server, "-f", str(bad), str(mnt)], timeout=30)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nagaya-squashfs: {bad}: "), r.stderr
    assert not _mounted(mnt)
    assert not [x for x in alice.processes() if "nagaya-squashfs" in x]


def test_offset(alice: User, server: str, image: tuple[Path, Path], workdir: Path) -> None:
    """-o offset=N (single-file images): the squashfs after a header."""
    f = workdir / "with-header"
    f.write_bytes(b"#!/bin/sh\n".ljust(8192, b"\0") + image[1].read_bytes())
    os.chown(f, alice.uid, alice.gid)
    mnt = workdir / "m"
    p = _mount(alice, server, f, mnt, "-o", "offset=8192")
    try:
        assert alice.run(["cat", str(mnt / "hardlink")]).stdout == "hello\n"
    finally:
        _unmount(alice, p, mnt)


def test_nagaya_run(alice: User, server: str, session_images: None) -> None:
    """A run with the FUSE server beside the app, one served by the user's keeper, an exec, and runs that
    read much of the image."""
    env = {"NAGAYA_RUNTIME_SQUASHFUSE": server, "NAGAYA_RUNTIME_KEEP_MOUNTED": "0"}
    r = alice.nagaya("run", "bb", "sh", "-c", "cat /proc/*/comm | sort -u | grep -c nagaya-squashfs; "
                     "ls /bin | wc -l", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "1" and int(lines[1]) > 100      # the server runs beside the app, in its pid namespace
    env = {"NAGAYA_RUNTIME_SQUASHFUSE": server}
    r = alice.nagaya("run", "bb", "sh", "-c", "grep -c ' - fuse.squashfuse ' /proc/self/mountinfo; ls /bin | wc -l",
                     env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert int(lines[0]) >= 1 and int(lines[1]) > 100   # the keeper's mount of it
    kept = [int(x.split()[0]) for x in alice.processes(keepers=True) if "nagaya-squashfs" in x]
    assert any(os.path.realpath(f"/proc/{p}/exe") == os.path.realpath(server) for p in kept)
    r = alice.nagaya("exec", "app:1", "cat", "/app/data.txt", env=env)
    assert r.returncode == 0 and r.stdout == "upper data\n", r.stderr


def test_image_without_xattrs(alice: User, server: str, workdir: Path) -> None:
    """No xattrs in the image: getxattr is answered by the kernel (EOPNOTSUPP, no round trip per lookup that
    overlayfs makes); listxattr is an empty list, as squashfuse_ll gives it."""
    from nagaya.image import squash
    from tests.helpers import images

    tar = images.tar_bytes([images.entry("f", "file", b"data\n"), images.entry("d/", "dir")])
    img = workdir / "plain.sqfs"
    squash.build(lambda s: s.write(tar), img)
    os.chown(img, alice.uid, alice.gid)
    mnt = workdir / "m"
    p = _mount(alice, server, img, mnt)
    try:
        code = ("import os, sys\n"
                "print(os.listxattr(sys.argv[1]))\n"
                "try:\n    os.getxattr(sys.argv[1], 'user.x')\nexcept OSError as e:\n    print(e.errno)\n")
        r = alice.run([PY, "-c", code, str(mnt / "f")])
        assert r.stdout.split("\n")[:2] == ["[]", str(errno.EOPNOTSUPP)], r.stdout + r.stderr
        assert alice.run(["cat", str(mnt / "f")]).stdout == "data\n"
    finally:
        _unmount(alice, p, mnt)


@pytest.mark.parametrize("compression", ["lz4", "gzip", "xz", "lzo", "zstd:15"])
def test_every_compressor(alice: User, server: str, workdir: Path, compression: str) -> None:
    """`[image] compression` may pick any of tar2sqfs's compressors: the server reads each as squashfuse_ll does
    (its tables too: owners of several ids, whose table is compressed when that pays). lzo, which libsquashfs
    lacks, is handed to squashfuse_ll (exec, same arguments)."""
    from nagaya.image import squash
    from tests.helpers import images

    rnd = hashlib.sha256(compression.encode()).digest() * 20000
    tar = images.tar_bytes([
        images.entry("text", "file", b"compressible line\n" * 40000),
        images.entry("random", "file", rnd + rnd[:1000]),
        images.entry("small", "file", b"tail\n"),
        images.entry("link", "symlink", link="text"),
        *(images.entry(f"u{i}", "file", str(i).encode(), uid=1000 + i) for i in range(300)),
    ])
    img = workdir / "c.sqfs"
    squash.build(lambda s: s.write(tar), img, compression=compression)
    os.chown(img, alice.uid, alice.gid)
    ours, theirs = workdir / "ours", workdir / "theirs"
    p1 = _mount(alice, server, img, ours)
    p2 = _mount(alice, SQUASHFUSE, img, theirs)
    try:
        a, b = _walk(alice, ours), _walk(alice, theirs)
        assert len(a) == 305 and a == b
    finally:
        _unmount(alice, p1, ours)
        _unmount(alice, p2, theirs)
