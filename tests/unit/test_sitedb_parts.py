"""The site database has one door: `SiteService` is its parts and nothing else, each operation is written in
exactly one part, and no function elsewhere in sitedb takes the service as a second way in."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import nagaya.sitedb
from nagaya.sitedb.part import Part
from nagaya.sitedb.service import SiteService

SITEDB = Path(nagaya.sitedb.__file__).resolve().parent


def test_the_service_is_its_parts_only() -> None:
    own = {k for k in vars(SiteService) if not k.startswith("__")}
    assert own == set()
    parts = SiteService.__mro__[1:-2]
    assert SiteService.__mro__[-2] is Part and all(issubclass(p, Part) for p in parts)
    # each part in its own module, named after its concern
    assert len({p.__module__ for p in parts}) == len(parts)


def test_no_operation_is_written_in_two_parts() -> None:
    seen: dict[str, str] = {}
    twice = []
    for part in SiteService.__mro__[1:-1]:
        for name, value in vars(part).items():
            if name.startswith("__") or not (inspect.isfunction(value) or isinstance(value, staticmethod)):
                continue
            if name in seen:
                twice.append(f"{name}: {seen[name]} and {part.__name__}")
            seen[name] = part.__name__
    assert twice == []


def test_no_second_door_of_free_functions_over_the_service() -> None:
    """The old style, `rotate_robot(svc, ...)` beside `svc.create_robot(...)`, does not come back."""
    offenders = []
    for path in sorted(SITEDB.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                for a in node.args.args:
                    ann = ast.unparse(a.annotation) if a.annotation else ""
                    if a.arg == "svc" or "SiteService" in ann or ann.endswith(("Users", "Projects", "Tokens")):
                        offenders.append(f"{path.name}:{node.lineno} {node.name}")
    assert offenders == []
