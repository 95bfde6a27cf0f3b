"""safefs: the rules every privilege crossing uses (the adversarial suite attacks them through real
commands; these pin the primitives down one by one)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from nagaya import safefs

OTHER = 65534          # nobody: an account that is neither root nor trusted


def test_open_dir_walks_without_following_untrusted_links(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    os.close(safefs.open_dir(real))
    # the last component is never a link, whoever owns it
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(safefs.UnsafePath, match="symbolic link"):
        safefs.open_dir(tmp_path / "link")
    # a link on the way is followed only if a trusted account owns it
    (tmp_path / "via").symlink_to(tmp_path)
    os.close(safefs.open_dir(tmp_path / "via" / "real"))
    os.lchown(tmp_path / "via", OTHER, OTHER)
    with pytest.raises(safefs.UnsafePath):
        safefs.open_dir(tmp_path / "via" / "real")
    # relative targets with .. resolve against the link's own directory
    (real / "up").symlink_to("..")
    os.close(safefs.open_dir(real / "up" / "real"))


def test_open_dir_checks_owner_and_mode(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.chown(d, OTHER, OTHER)
    with pytest.raises(safefs.UnsafePath, match="belongs to nobody"):
        safefs.open_dir(d)
    os.close(safefs.open_dir(d, (OTHER,)))
    os.chown(d, 0, 0)
    os.chmod(d, 0o777)
    with pytest.raises(safefs.UnsafePath, match="writable by other accounts"):
        safefs.open_dir(d)
    os.chmod(d, 0o1777)                 # a sticky spool is fine as the last component only when asked for
    with pytest.raises(safefs.UnsafePath):
        safefs.open_dir(d)
    os.close(safefs.open_dir(d, last_shared=True))
    # below a sticky directory, a child of a trusted owner stays put; a stranger's child does not count
    (d / "mine").mkdir(mode=0o700)
    os.close(safefs.open_dir(d / "mine"))
    os.chown(d / "mine", OTHER, OTHER)
    with pytest.raises(safefs.UnsafePath):
        safefs.open_dir(d / "mine")


def test_open_at_refuses_links_fifos_and_hard_links(tmp_path: Path) -> None:
    dfd = safefs.open_dir(tmp_path)
    try:
        (tmp_path / "target").write_text("secret")
        (tmp_path / "sym").symlink_to(tmp_path / "target")
        with pytest.raises(OSError):
            safefs.open_at(dfd, "sym")
        os.link(tmp_path / "target", tmp_path / "hard")
        with pytest.raises(safefs.UnsafePath, match="2 links"):
            safefs.open_at(dfd, "hard", os.O_WRONLY)
        os.mkfifo(tmp_path / "fifo")
        done = threading.Event()

        def opener() -> None:
            with pytest.raises(safefs.UnsafePath, match="not a regular file"):
                safefs.open_at(dfd, "fifo")
            done.set()
        t = threading.Thread(target=opener)
        t.start()
        t.join(5)
        assert done.is_set(), "open_at blocked on a FIFO"
        with pytest.raises(ValueError):
            safefs.open_at(dfd, "target", os.O_WRONLY | os.O_TRUNC)
        os.unlink(tmp_path / "hard")
        with pytest.raises(safefs.UnsafePath, match="belongs to"):
            safefs.open_at(dfd, "target", owners=(OTHER,))
        assert safefs.read_at(dfd, "target") == b"secret"
        with pytest.raises(safefs.UnsafePath, match="larger"):
            safefs.read_at(dfd, "target", max_size=3)
    finally:
        os.close(dfd)


def test_write_at_replaces_a_planted_link_and_create_at_is_exclusive(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    d = tmp_path / "state"
    d.mkdir()
    (d / "site.json").symlink_to(victim)
    dfd = safefs.open_dir(d)
    try:
        safefs.write_at(dfd, "site.json", b"{}", 0o640)
        assert victim.read_text() == "keep" and not (d / "site.json").is_symlink()
        assert (d / "site.json").read_text() == "{}" and (d / "site.json").stat().st_mode & 0o777 == 0o640
        assert sorted(os.listdir(d)) == ["site.json"]                      # no temp file left
        (d / "lock").symlink_to(victim)
        assert safefs.create_at(dfd, "lock") is None                        # never opens the existing name
        assert safefs.remove_at(dfd, "lock") and victim.exists()
        fd = safefs.mkdir_at(dfd, "sub", 0o750)
        os.close(fd)
        os.chown(d / "sub", OTHER, OTHER)
        with pytest.raises(safefs.UnsafePath):
            safefs.mkdir_at(dfd, "sub", 0o750)                              # someone else's: not adopted
    finally:
        os.close(dfd)


def test_append_own_skips_names_others_took(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chmod(spool, 0o1777)
    taken = spool / "me.jsonl"
    taken.write_text("")
    os.chown(taken, OTHER, OTHER)
    target = tmp_path / "elsewhere"
    target.write_text("")
    (spool / "me.1.jsonl").symlink_to(target)
    name = safefs.append_own(str(spool), ["me.jsonl", "me.1.jsonl"], b"rec\n")
    assert name is not None and name not in ("me.jsonl", "me.1.jsonl") and name.endswith(".jsonl")
    assert (spool / name).read_bytes() == b"rec\n" and taken.read_text() == "" and target.read_text() == ""
    (spool / "me.1.jsonl").unlink()
    assert safefs.append_own(str(spool), ["me.jsonl", "me.1.jsonl"], b"two\n") == "me.1.jsonl"
