"""Apptainer/Singularity definition file -> Recipe (-> Containerfile), like spython's SingularityParser.

Supported: headers Bootstrap (docker, localimage, oci, oci-archive, docker-archive), From, Stage; sections
%files [from STAGE], %post [-c SHELL], %environment, %runscript, %labels, %help, %test. Apptainer's own
layout is kept where it matters: the runscript is /.singularity.d/runscript and becomes the ENTRYPOINT
(so `nagaya run IMAGE ARGS` runs it with ARGS, and `nagaya exec` bypasses it, as in Apptainer), %help is
/.singularity.d/runscript.help and %environment is /.singularity.d/env/90-environment.sh as well as ENV.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from nagaya.build.recipe import (
    BuildFileError,
    From,
    Instruction,
    Loc,
    Recipe,
    Stage,
    exec_form,
    quote_value,
    sh_quote,
    write_file_step,
)

SECTIONS = ("files", "post", "environment", "runscript", "labels", "help", "test")
UNSUPPORTED = {"setup": "runs on the host as root, which rootless builds never do; use %files",
               "startscript": "instances are not supported", "arguments": "use --build-arg with a Dockerfile",
               "apprun": "SCIF apps are not supported", "appinstall": "SCIF apps are not supported",
               "appenv": "SCIF apps are not supported", "applabels": "SCIF apps are not supported",
               "appfiles": "SCIF apps are not supported", "apphelp": "SCIF apps are not supported",
               "apptest": "SCIF apps are not supported"}
AGENTS = ("docker", "localimage", "oci", "oci-archive", "docker-archive")
HEADER_KEYS = ("bootstrap", "from", "stage", "includecmd", "registry", "namespace")
_HEADER = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)\s*:\s*(.*)$")
_ENVNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RUNSCRIPT = "/.singularity.d/runscript"


@dataclass
class ScriptRun(Instruction):
    """A RUN made from a script section: `script` keeps (line, text) so a failure can name its line."""

    script: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Section:
    name: str
    args: str
    line: int
    body: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class DefStage:
    header: dict[str, tuple[int, str]] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)


def is_definition(text: str) -> bool:
    """A definition file starts (after comments and blank lines) with a `Bootstrap:` header."""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        return s.lower().startswith("bootstrap:")
    return False


def _split(text: str, file: str) -> list[DefStage]:
    stages: list[DefStage] = []
    current: Section | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        # A section starts with % in the first column (an indented % line inside a script is the script's).
        if s.startswith("%") and (not raw[:1].isspace() or current is None):
            name, _, args = s[1:].partition(" ")
            name = name.lower()
            if name in UNSUPPORTED:
                raise BuildFileError(file, n, f"%{name} is not supported: {UNSUPPORTED[name]}")
            if name not in SECTIONS:
                raise BuildFileError(file, n, f"unknown section %{name} (known: "
                                     + ", ".join(f"%{x}" for x in SECTIONS) + ")")
            if not stages:
                raise BuildFileError(file, n, "a definition file starts with a `Bootstrap:` header")
            if any(x.name == name for x in stages[-1].sections):
                raise BuildFileError(file, n, f"%{name} appears twice in this stage")
            current = Section(name, args.strip(), n)
            stages[-1].sections.append(current)
            continue
        m = _HEADER.match(s)
        if m and m.group(1).lower() == "bootstrap":
            stages.append(DefStage())
            current = None
        if current is not None:
            current.body.append((n, raw))
            continue
        if not s or s.startswith("#"):
            continue
        if not m:
            raise BuildFileError(file, n, f"expected a `Key: value` header or a %section, got {s!r}")
        key = m.group(1).lower()
        if key not in HEADER_KEYS:
            raise BuildFileError(file, n, f"unknown header {m.group(1)!r}")
        if not stages:
            raise BuildFileError(file, n, "the first header must be `Bootstrap:`")
        if key in stages[-1].header:
            raise BuildFileError(file, n, f"header {m.group(1)} appears twice")
        stages[-1].header[key] = (n, m.group(2).strip())
    if not stages:
        raise BuildFileError(file, 1, "no `Bootstrap:` header: not a definition file")
    return stages


def _body(sec: Section) -> list[tuple[int, str]]:
    """The section's lines with common indentation removed and trailing blank lines dropped."""
    lines = list(sec.body)
    while lines and not lines[-1][1].strip():
        lines.pop()
    indents = [len(t) - len(t.lstrip()) for _n, t in lines if t.strip()]
    cut = min(indents) if indents else 0
    return [(n, t[cut:] if t.strip() else "") for n, t in lines]


def _base(st: DefStage, file: str, first_line: int) -> tuple[str, int]:
    line, agent = st.header.get("bootstrap", (first_line, ""))
    agent = agent.lower()
    if agent not in AGENTS:
        raise BuildFileError(file, line, f"Bootstrap: {agent!r} is not supported (use one of {', '.join(AGENTS)})")
    if "from" not in st.header:
        raise BuildFileError(file, line, "missing `From:` header")
    fline, src = st.header["from"]
    if not src:
        raise BuildFileError(file, fline, "From: needs an image")
    if agent == "docker":
        return src.removeprefix("docker://"), fline
    path = Path(src).expanduser()
    if agent == "localimage":
        if not path.exists():               # not a path: a name in the user's nagaya images
            return src, fline
        if path.is_dir():
            if not (path / "oci-layout").exists():
                raise BuildFileError(file, fline, f"From: {src} is a directory but not an OCI layout")
            return f"oci:{path.resolve()}", fline
        with open(path, "rb") as f:
            magic = f.read(64)
        if b"SIF_MAGIC" in magic or magic.startswith(b"#!/usr/bin/env run-singularity"):
            raise BuildFileError(file, fline, f"From: {src} is a SIF file; use an OCI archive "
                                 "(`nagaya image export`, `skopeo copy`) instead")
        return f"oci-archive:{path.resolve()}", fline
    if not path.exists():
        raise BuildFileError(file, fline, f"From: {src}: no such file or directory")
    return f"{agent}:{path.resolve()}", fline


def _env_pairs(sec: Section, file: str) -> list[tuple[int, str, str]]:
    out = []
    for n, t in _body(sec):
        s = t.strip()
        if not s or s.startswith("#"):
            continue
        try:
            words = shlex.split(s, comments=True)
        except ValueError as e:
            raise BuildFileError(file, n, f"%environment: {e}") from None
        if words and words[0] == "export":
            words = words[1:]
        for w in words:
            k, eq, v = w.partition("=")
            if not _ENVNAME.match(k):
                raise BuildFileError(file, n, f"%environment: only `[export] NAME=value` lines are supported, "
                                     f"got {s!r}")
            if eq:
                out.append((n, k, v))
    return out


def _script_run(sec: Section, file: str, default_shell: str = "/bin/sh") -> ScriptRun:
    body = _body(sec)
    shell = default_shell
    if sec.args:
        a = sec.args.split()
        if len(a) == 2 and a[0] == "-c":
            shell = a[1]
        else:
            raise BuildFileError(file, sec.line, f"%{sec.name}: only `-c SHELL` may follow the section name")
    text = "\n".join(t for _n, t in body)
    path = f"/.nagaya-{sec.name}.sh"
    # -e: stop at the first failing command (Apptainer's %post does); -x: show each command, which also
    # tells nagaya which line failed.
    cmd = (f"printf '%s\\n' {' '.join(sh_quote(x) for x in text.split(chr(10)))} > {path} && "
           f"{{ {shell} -e -x {path}; rc=$?; rm -f {path}; exit $rc; }}")
    return ScriptRun("RUN", cmd, Loc(file, sec.line), f"%{sec.name}", script=[(n, t) for n, t in body if t.strip()])


def parse(text: str, file: str, context: Path | None = None) -> Recipe:
    recipe = Recipe(file=file, kind="definition")
    stages = _split(text, file)
    names: list[str] = []
    for i, st in enumerate(stages):
        first = min([ln for ln, _v in st.header.values()] or [1])
        image, fline = _base(st, file, first)
        alias = st.header.get("stage", (0, ""))[1]
        if len(stages) > 1 and not alias and i < len(stages) - 1:
            alias = f"stage{i}"
        names.append(alias)
        stage = Stage(From("FROM", image, Loc(file, fline), image=image, alias=alias))
        recipe.stages.append(stage)
        secs = {s.name: s for s in st.sections}
        if "files" in secs:
            stage.steps += _files(secs["files"], file, context, names[:i])
        if "post" in secs and any(t.strip() for _n, t in _body(secs["post"])):
            stage.steps.append(_script_run(secs["post"], file))
        if "environment" in secs:
            sec = secs["environment"]
            body = "\n".join(t for _n, t in _body(sec))
            stage.steps.append(write_file_step("/.singularity.d/env/90-environment.sh", "#!/bin/sh\n" + body,
                                               "0755", Loc(file, sec.line), "%environment"))
            for n, k, v in _env_pairs(sec, file):
                stage.steps.append(Instruction("ENV", f"{k}={quote_value(v)}", Loc(file, n), f"%environment {k}"))
        if "runscript" in secs:
            sec = secs["runscript"]
            body = "\n".join(t for _n, t in _body(sec))
            if not body.startswith("#!"):
                body = "#!/bin/sh\n" + body
            loc = Loc(file, sec.line)
            stage.steps.append(write_file_step(RUNSCRIPT, body, "0755", loc, "%runscript"))
            stage.steps.append(Instruction("ENTRYPOINT", exec_form([RUNSCRIPT]), loc, "%runscript"))
            stage.steps.append(Instruction("CMD", "[]", loc, "%runscript"))
        if "labels" in secs:
            for n, t in _body(secs["labels"]):
                s = t.strip()
                if not s or s.startswith("#"):
                    continue
                k, _, v = s.partition(" ")
                if not k or not re.match(r"^[A-Za-z0-9_.\-/]+$", k):
                    raise BuildFileError(file, n, f"%labels: expected `KEY value`, got {s!r}")
                stage.steps.append(Instruction("LABEL", f"{quote_value(k)}={quote_value(v.strip())}",
                                               Loc(file, n), f"%labels {k}"))
        if "help" in secs:
            sec = secs["help"]
            stage.steps.append(write_file_step("/.singularity.d/runscript.help",
                                               "\n".join(t for _n, t in _body(sec)), "0644",
                                               Loc(file, sec.line), "%help"))
        if "test" in secs and any(t.strip() for _n, t in _body(secs["test"])):
            stage.steps.append(_script_run(secs["test"], file))
    return recipe


def _files(sec: Section, file: str, context: Path | None, earlier: list[str]) -> list[Instruction]:
    out: list[Instruction] = []
    from_stage = ""
    if sec.args:
        a = sec.args.split()
        if len(a) != 2 or a[0] != "from":
            raise BuildFileError(file, sec.line, "%files: expected `%files` or `%files from STAGE`")
        if a[1] not in earlier:
            raise BuildFileError(file, sec.line, f"%files from {a[1]}: no earlier stage is called {a[1]!r}")
        from_stage = a[1]
    for n, t in _body(sec):
        s = t.strip()
        if not s or s.startswith("#"):
            continue
        try:
            words = shlex.split(s)
        except ValueError as e:
            raise BuildFileError(file, n, f"%files: {e}") from None
        if len(words) not in (1, 2):
            raise BuildFileError(file, n, f"%files: expected `SOURCE [DESTINATION]`, got {s!r}")
        src = words[0]
        dest = words[1] if len(words) == 2 else (src if src.startswith("/") else "/" + src)
        if not from_stage and src.startswith("/"):
            # buildah reads sources from the build context only; accept absolute paths that lie inside it.
            if context is None or not os.path.abspath(src).startswith(str(context.resolve()) + os.sep):
                raise BuildFileError(file, n, f"%files: {src} is outside the build context "
                                     f"({context}); copy it there or build from a directory that holds it")
            src = os.path.relpath(src, context.resolve())
        flags = [f"--from={from_stage}"] if from_stage else []
        out.append(Instruction("COPY", " ".join([*flags, exec_form([src, dest])]), Loc(file, n), f"%files {s}"))
    return out
