"""The intermediate recipe both build-file formats parse into (spython's idea), and its Containerfile writer.

A recipe is a list of stages, each a list of small typed instructions that remember where they came from
(file and line), so that buildah's "STEP n/m" of a failed build can be named as `FILE:LINE: COMMAND`.
Instructions parsed from a Dockerfile keep their argument text exactly as written (buildah is the one
that interprets it); instructions made from a definition file render their text from typed fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nagaya.errors import NagayaError


class BuildFileError(NagayaError):
    """A malformed Dockerfile or definition file; the message starts with FILE:LINE."""

    exit_code = 2

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line


class BuildFailed(NagayaError):
    """A build step failed (its message names the file, line and command) or buildah itself failed."""

    exit_code = 1


@dataclass(frozen=True)
class Loc:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Instruction:
    """One Containerfile instruction. `text` is everything after the keyword, as buildah will see it."""

    keyword: str
    text: str
    loc: Loc
    shown: str = ""             # what to call it in errors (a def file's section); default: KEYWORD text

    def render(self) -> str:
        return f"{self.keyword} {self.text}".rstrip()

    def describe(self) -> str:
        return self.shown or self.render()


@dataclass
class From(Instruction):
    image: str = ""             # as written (ARGs unexpanded)
    alias: str = ""
    flags: tuple[str, ...] = ()

    def render_with(self, image: str) -> str:
        parts = ["FROM", *self.flags, image]
        if self.alias:
            parts += ["AS", self.alias]
        return " ".join(parts)


@dataclass
class Stage:
    base: From
    steps: list[Instruction] = field(default_factory=list)


@dataclass
class Recipe:
    file: str                                       # the user's file name, for messages
    global_args: list[Instruction] = field(default_factory=list)   # ARGs before the first FROM
    stages: list[Stage] = field(default_factory=list)
    kind: str = "dockerfile"                        # dockerfile | definition

    def step(self, stage: int, number: int) -> Instruction | None:
        """buildah's STEP `number` (1-based; 1 is FROM) of stage `stage` (0-based)."""
        if not 0 <= stage < len(self.stages):
            return None
        s = self.stages[stage]
        items: list[Instruction] = [s.base, *s.steps]
        return items[number - 1] if 1 <= number <= len(items) else None

    def write(self, bases: dict[int, str] | None = None) -> str:
        """The Containerfile buildah builds. `bases` replaces stage i's FROM image (a local image's id).

        Each instruction is written on its own source line (blank lines pad the gaps), so a line number in
        anything buildah prints is the line in the user's file."""
        bases = bases or {}
        lines: list[str] = []

        def put(loc: Loc, text: str) -> None:
            if self.kind == "dockerfile":
                while len(lines) < loc.line - 1:
                    lines.append("")
            lines.append(text)

        for a in self.global_args:
            put(a.loc, a.render())
        for i, st in enumerate(self.stages):
            put(st.base.loc, st.base.render_with(bases.get(i, st.base.image)))
            for ins in st.steps:
                put(ins.loc, ins.render())
        return "\n".join(lines) + "\n"


def exec_form(argv: list[str]) -> str:
    """A JSON (exec-form) argument list, as CMD/ENTRYPOINT/RUN take it."""
    return json.dumps(argv)


def quote_value(value: str) -> str:
    """A value for ENV/LABEL K=V: double-quoted, with the characters Dockerfile words treat specially escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def write_file_step(path: str, body: str, mode: str, loc: Loc, shown: str) -> Instruction:
    """A RUN that writes `body` to `path` using only shell builtins plus mkdir/chmod (any base with /bin/sh).

    buildah 1.28 has no heredocs and a definition file has no build context of its own, so the file is
    carried inside the instruction: one printf argument per line, on one Containerfile line."""
    parent = path.rsplit("/", 1)[0] or "/"
    lines = body.split("\n")
    args = " ".join(sh_quote(x) for x in lines)
    cmd = f"mkdir -p {sh_quote(parent)} && printf '%s\\n' {args} > {sh_quote(path)} && chmod {mode} {sh_quote(path)}"
    return Instruction("RUN", cmd, loc, shown)
