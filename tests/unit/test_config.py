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
