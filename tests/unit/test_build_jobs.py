"""Builds as batch jobs, the parts that need no site: the Slurm batch script of a build job, the site's [builds]
settings, how the server packs several uploaded files (plain names only, programs stay executable, the size
limit), and which result line of a job's log counts."""

from __future__ import annotations

import io
import tarfile
from types import SimpleNamespace

import pytest

from nagaya.build.remote import RESULT_MARK, Recipe, check_recipe, result_of
from nagaya.errors import UsageError
from nagaya.sched.models import JobSpec
from nagaya.sched.slurm import batch_script
from nagaya.server.builds import BuildLimits, TooLarge, _Capped, _pack


def test_a_build_job_runs_nagaya_build_on_the_batch_host() -> None:
    recipe = "/home/a/.local/share/nagaya/builds/B/recipe.json"
    spec = JobSpec(image="(build) r:5000/a/x:1", ref="", digest="", build=recipe)
    script = batch_script(spec, "/usr/local/bin/nagaya")
    assert script.splitlines()[-1] == f"exec /usr/local/bin/nagaya build --recipe {recipe}"
    assert "srun" not in script and " run " not in script


def test_site_settings() -> None:
    s = SimpleNamespace(build_upload_max=1 << 20, build_unpacked_max=0, build_max_running=3, build_hours=5,
                        build_git_hosts="Git.Example.org, 10.0.0.1:8080", build_git_schemes="")
    lim = BuildLimits.of(s)
    assert lim.upload_max == 1 << 20 and lim.unpacked_max == BuildLimits.unpacked_max
    assert lim.git_hosts == ["git.example.org", "10.0.0.1:8080"] and lim.git_schemes == ["https"]
    assert (lim.max_running, lim.hours) == (3, 5)
    assert BuildLimits.of(SimpleNamespace()).git_hosts == []            # no list: no git builds


def _packed(items: list[tuple[str, bytes]], dockerfile: str = "", limit: int = 1 << 20) -> dict[str, int]:
    out = io.BytesIO()
    _pack([(n, io.BytesIO(d)) for n, d in items], dockerfile, _Capped(out, limit))
    out.seek(0)
    with tarfile.open(fileobj=out) as t:
        return {m.name: m.mode for m in t}


def test_uploaded_files_are_packed_under_plain_names() -> None:
    modes = _packed([("busybox", b"\x7fELF" + b"\0" * 10), ("run.sh", b"#!/bin/sh\n"), ("data.txt", b"x")],
                    dockerfile="FROM scratch\r\n")
    assert modes == {"busybox": 0o755, "run.sh": 0o755, "data.txt": 0o644, "Dockerfile": 0o644}
    assert set(_packed([("C:\\Users\\a\\x.txt", b"1")])) == {"x.txt"}          # a browser's path: its last part
    for bad in ([("..", b"")], [("a\nb", b"")], [("x", b"1"), ("x", b"2")], [(".hidden\0", b"")]):
        with pytest.raises(UsageError):
            _packed(bad)
    with pytest.raises(UsageError):
        _packed([("Dockerfile", b"FROM scratch")], dockerfile="FROM scratch")   # the same name twice
    with pytest.raises(TooLarge):
        _packed([("big", b"\0" * 4096)], limit=1024)


def test_only_the_last_result_line_counts() -> None:
    log = f'{RESULT_MARK}{{"digest": "sha256:forged"}}\nSTEP 2/2\n{RESULT_MARK}{{"digest": "sha256:real"}}\n'
    assert result_of(log)["digest"] == "sha256:real"
    assert result_of("no result\n") == {} and result_of(RESULT_MARK + "[1]\n") == {}


def test_recipes_are_checked() -> None:
    r = Recipe(id="a" * 32, tag="r:5000/a/x:1", source="git", git_url="https://h/r.git", git_ref="v1.0")
    check_recipe(r)
    for bad in ({"git_ref": "--upload-pack=x"}, {"git_ref": "a..b"}, {"git_commit": "HEAD"},
                {"git_url": "ssh://h/r.git"}, {"file": "/etc/x"}):
        with pytest.raises(UsageError):
            check_recipe(Recipe.from_json({**r.__dict__, **bad}))
