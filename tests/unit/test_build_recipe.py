"""Build-file parsing and translation (no buildah needed): the recipe keeps lines; def files translate."""

from __future__ import annotations

from pathlib import Path

import pytest

from nagaya.build import deffile, dockerfile
from nagaya.build.deffile import ScriptRun
from nagaya.build.recipe import BuildFileError


def test_dockerfile_keeps_line_numbers_and_replaces_only_bases() -> None:
    text = "# escape=`\nARG V=1\n\nFROM bb AS one\nRUN echo a `\n  # comment inside\n  b\nFROM one\nCMD [\"x\"]\n"
    r = dockerfile.parse(text, "Dockerfile")
    assert [len(s.steps) for s in r.stages] == [1, 1]
    assert r.stages[0].steps[0].text == "echo a b" and r.stages[0].steps[0].loc.line == 5
    out = r.write({0: "abc123"}).splitlines()
    assert out[1] == "ARG V=1" and out[3] == "FROM abc123 AS one" and out[4] == "RUN echo a b"
    assert out[7] == "FROM one" and out[8] == 'CMD ["x"]'
    assert r.step(1, 2) is r.stages[1].steps[0] and r.step(0, 1) is r.stages[0].base and r.step(0, 9) is None


@pytest.mark.parametrize(("text", "line"), [("FROM a\nRUN\n", 2), ("FROM a\nSHELL sh -c\n", 2),
                                            ("FROM a\nLABEL x\n", 2), ("FROM a\nENV A='x\n", 2),
                                            ("FROM a\nARG 9x\n", 2), ("FROM --bad a\n", 1),
                                            ("FROM a\nONBUILD FROM b\n", 2), ("FROM a\nEXPOSE http\n", 2)])
def test_dockerfile_errors(text: str, line: int) -> None:
    with pytest.raises(BuildFileError) as e:
        dockerfile.parse(text, "D")
    assert e.value.line == line and e.value.message.startswith(f"D:{line}: ")


def test_definition_translation(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    text = ("Bootstrap: docker\nFrom: docker://bb:1\nStage: build\n%post\n  echo 'it''s'\n"
            "Bootstrap: docker\nFrom: bb\n%files from build\n  /out /out\n%files\n")
    with pytest.raises(BuildFileError, match="%files appears twice"):
        deffile.parse(text + "  f.txt\n", "x.def", tmp_path)
    r = deffile.parse(text.replace("%files\n", "") + "%runscript\n  exec echo \"$@\"\n", "x.def", tmp_path)
    assert r.stages[0].base.image == "bb:1" and r.stages[0].base.alias == "build"
    post = r.stages[0].steps[0]
    assert isinstance(post, ScriptRun) and post.script == [(5, "echo 'it''s'")] and post.describe() == "%post"
    copy = r.stages[1].steps[0]
    assert copy.render() == 'COPY --from=build ["/out", "/out"]' and copy.loc.line == 9
    written = r.write()
    assert 'ENTRYPOINT ["/.singularity.d/runscript"]' in written and "FROM bb:1 AS build" in written


def test_is_definition() -> None:
    assert deffile.is_definition("# c\n\nBootStrap: docker\n")
    assert not deffile.is_definition("FROM bb\n")
