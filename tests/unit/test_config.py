import pytest

from nagaya import config
from nagaya.errors import UsageError


def test_site_user_env_and_locks(tmp_path, monkeypatch):
    site = tmp_path / "site.toml"
    site.write_text('locked = ["runtime.backend"]\n[runtime]\nbackend = "bwrap"\n[image]\ncompression = "lz4"\n')
    user_dir = tmp_path / "conf" / "nagaya"
    user_dir.mkdir(parents=True)
    (user_dir / "nagaya.toml").write_text('[runtime]\nbackend = "runc"\n[image]\ncompression = "xz"\n')
    monkeypatch.setattr(config, "SITE_CONFIG", site)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "conf"))
    monkeypatch.setenv("NAGAYA_IMAGE_JOBS", "3")
    monkeypatch.setenv("NAGAYA_GPU_LIB_DIRS", "/a:/b")
    cfg = config.load()
    assert cfg.runtime.backend == "bwrap"            # locked by the site
    assert cfg.image.compression == "xz" and cfg.image.jobs == 3 and cfg.gpu.lib_dirs == ["/a", "/b"]


def test_unknown_keys_are_errors(tmp_path, monkeypatch):
    site = tmp_path / "site.toml"
    site.write_text("[runtime]\nbakend = 1\n")
    monkeypatch.setattr(config, "SITE_CONFIG", site)
    with pytest.raises(UsageError, match=r"runtime\.bakend"):
        config.load()


def test_cache_dir_expands_user_uid_and_node(tmp_path, monkeypatch):
    import os
    import pwd

    monkeypatch.setattr(config, "SITE_CONFIG", tmp_path / "none.toml", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    monkeypatch.setenv("USER", "somebody-else")     # the process's own identity counts, not $USER
    monkeypatch.setenv("NAGAYA_IMAGE_CACHE_DIR", "/var/tmp/nagaya-${USER}/$NODE-${UID}")
    me = pwd.getpwuid(os.getuid()).pw_name
    assert config.load().cache_root == f"/var/tmp/nagaya-{me}/n7-{os.getuid()}"
    monkeypatch.setenv("NAGAYA_IMAGE_CACHE_DIR", "/var/tmp/${HOSTNAME}")
    with pytest.raises(UsageError, match="only"):
        _ = config.load().cache_root


def test_a_cache_someone_else_made_is_refused(tmp_path):
    import os

    from nagaya.errors import ImageError
    from nagaya.image.store import ImageStore

    mine = tmp_path / "mine"
    ImageStore(mine).ensure_dirs()
    assert (mine / "images").is_dir() and mine.stat().st_mode & 0o777 == 0o700
    trap = tmp_path / "trap"
    trap.mkdir(mode=0o777)
    os.chmod(trap, 0o777)
    with pytest.raises(ImageError, match="owned by you"):
        ImageStore(trap).ensure_dirs()
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(ImageError):
        ImageStore(link).ensure_dirs()


def test_squashfuse_default_is_nagaya_squashfs_where_installed(tmp_path, monkeypatch):
    exe = tmp_path / "nagaya-squashfs"
    monkeypatch.setattr(config, "NAGAYA_SQUASHFS", str(exe))
    assert config._default_squashfuse() == "/usr/bin/squashfuse_ll"      # not installed
    exe.write_text("#!/bin/sh\n")
    assert config._default_squashfuse() == "/usr/bin/squashfuse_ll"      # not executable
    exe.chmod(0o755)
    assert config._default_squashfuse() == str(exe)
    assert "nagaya-squashfs".startswith(config.FUSE_SERVER_COMMS) and len("nagaya-squashfs") == 15
