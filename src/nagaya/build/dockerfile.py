"""Dockerfile/Containerfile -> Recipe: what buildah needs, validated up front with line numbers.

Argument text is kept as written; the parser checks structure (known instructions, FROM first, argument
counts, JSON forms, quoting) so that mistakes are reported as FILE:LINE before anything runs.
"""

from __future__ import annotations

import json
import re
import shlex

from nagaya.build.recipe import BuildFileError, From, Instruction, Loc, Recipe, Stage

KEYWORDS = frozenset({"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                      "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"})
JSON_ONLY = frozenset({"SHELL"})
JSON_OR_SHELL = frozenset({"RUN", "CMD", "ENTRYPOINT"})
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(\S+)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _logical_lines(text: str, file: str) -> list[tuple[int, str]]:
    """(first line number, joined text) for each instruction: directives, comments and continuations handled."""
    escape = "\\"
    raw = text.splitlines()
    i = 0
    while i < len(raw):                          # parser directives: only at the very top
        m = _DIRECTIVE.match(raw[i].strip())
        if not m:
            break
        if m.group(1).lower() == "escape":
            if m.group(2) not in ("\\", "`"):
                raise BuildFileError(file, i + 1, f"invalid escape directive {m.group(2)!r} (use \\ or `)")
            escape = m.group(2)
        i += 1
    out: list[tuple[int, str]] = []
    start, parts = 0, []
    for n in range(i, len(raw)):
        line = raw[n]
        stripped = line.strip()
        if parts and (not stripped or stripped.startswith("#")):
            continue                             # comments and blank lines inside a continuation are skipped
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if not parts:
            start = n + 1
        body = line.rstrip()
        if body.endswith(escape):
            parts.append(body[:-1])
            continue
        parts.append(body)
        out.append((start, " ".join(p.strip() for p in parts if p.strip())))
        parts = []
    if parts:
        out.append((start, " ".join(p.strip() for p in parts if p.strip())))
    return out


def _words(text: str, file: str, line: int) -> list[str]:
    try:
        return shlex.split(text, comments=False, posix=True)
    except ValueError as e:
        raise BuildFileError(file, line, f"{e} in {text!r}") from None


def _json_list(text: str) -> list[str] | None:
    try:
        v = json.loads(text)
    except ValueError:
        return None
    return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def _check(keyword: str, args: str, file: str, line: int) -> None:
    def err(msg: str) -> BuildFileError:
        return BuildFileError(file, line, f"{keyword}: {msg}")

    if not args and keyword not in ("CMD", "ENTRYPOINT"):
        raise err("needs an argument")
    if keyword in JSON_ONLY and _json_list(args) is None:
        raise err('needs a JSON array of strings, e.g. ["/bin/sh", "-c"]')
    if keyword in JSON_OR_SHELL and args.startswith("[") and _json_list(args) is None:
        raise err(f'{args!r} starts like a JSON array but is not one (JSON needs "double quotes")')
    if keyword in ("CMD", "ENTRYPOINT") and not args:
        raise err("needs a command")
    if keyword in ("ENV", "LABEL"):
        words = _words(args, file, line)
        if keyword == "ENV" and len(words) >= 2 and "=" not in words[0]:
            return                               # legacy `ENV KEY value with spaces`
        for w in words:
            k, eq, _v = w.partition("=")
            if not eq or not k:
                raise err(f"expected KEY=VALUE, got {w!r}")
    elif keyword in ("COPY", "ADD"):
        if args.startswith("["):
            words = _json_list(args)
            if words is None:
                raise err("invalid JSON array")
        else:
            words = _words(args, file, line)
        plain = [w for w in words if not w.startswith("--")]
        if len(plain) < 2:
            raise err("needs at least one source and a destination")
    elif keyword in ("WORKDIR", "USER", "STOPSIGNAL"):
        if len(_words(args, file, line)) != 1:
            raise err("takes exactly one argument")
    elif keyword == "ARG":
        words = _words(args, file, line)
        for w in words:
            if not _NAME.match(w.partition("=")[0]):
                raise err(f"invalid argument name {w.partition('=')[0]!r}")
    elif keyword == "ONBUILD":
        inner, _, rest = args.partition(" ")
        inner = inner.upper()
        if inner not in KEYWORDS or inner in ("ONBUILD", "FROM", "MAINTAINER"):
            raise err(f"cannot trigger {inner!r}")
        _check(inner, rest.strip(), file, line)
    elif keyword == "HEALTHCHECK":
        words = _words(args, file, line)
        plain = [w for w in words if not w.startswith("--")]
        if not plain or plain[0].upper() not in ("NONE", "CMD"):
            raise err("expected NONE or [OPTIONS] CMD command")
    elif keyword == "EXPOSE":
        for w in _words(args, file, line):
            if not re.match(r"^(\$\{?\w+\}?|\d+(-\d+)?)(/(tcp|udp|sctp))?$", w, re.I):
                raise err(f"invalid port {w!r}")


def _from(args: str, file: str, line: int) -> tuple[str, str, tuple[str, ...]]:
    words = args.split()
    flags = tuple(w for w in words if w.startswith("--"))
    for f in flags:
        if not f.startswith("--platform="):
            raise BuildFileError(file, line, f"FROM: unknown option {f}")
    rest = [w for w in words if not w.startswith("--")]
    if len(rest) == 1:
        return rest[0], "", flags
    if len(rest) == 3 and rest[1].upper() == "AS" and _NAME.match(rest[2]):
        return rest[0], rest[2], flags
    raise BuildFileError(file, line, f"FROM: expected `FROM [--platform=...] IMAGE [AS NAME]`, got {args!r}")


def parse(text: str, file: str) -> Recipe:
    recipe = Recipe(file=file)
    for line, logical in _logical_lines(text, file):
        word, _, rest = logical.partition(" ")
        keyword = word.upper()
        args = rest.strip()
        loc = Loc(file, line)
        if keyword not in KEYWORDS:
            hint = " (a heredoc? buildah here does not support them)" if logical.lstrip().startswith(("<<", "EOF")) \
                else ""
            raise BuildFileError(file, line, f"unknown instruction {word!r}{hint}")
        _check(keyword, args, file, line)
        if keyword == "FROM":
            image, alias, flags = _from(args, file, line)
            recipe.stages.append(Stage(From("FROM", args, loc, image=image, alias=alias, flags=flags)))
        elif not recipe.stages:
            if keyword != "ARG":
                raise BuildFileError(file, line, f"{keyword} before the first FROM (only ARG may come first)")
            recipe.global_args.append(Instruction(keyword, args, loc))
        else:
            recipe.stages[-1].steps.append(Instruction(keyword, args, loc))
    if not recipe.stages:
        raise BuildFileError(file, 1, "no FROM instruction: a build file starts with FROM IMAGE")
    return recipe
