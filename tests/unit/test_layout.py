"""The package's layout rules (DESIGN.md, Layout): the CLI is a door, so no part imports nagaya.cli, and no
two modules import each other, directly or around a loop. Every import counts, those inside functions too
(a lazy import hides a cycle, it does not remove it); those under TYPE_CHECKING do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import nagaya

ROOT = Path(nagaya.__file__).resolve().parent
# Known and owned elsewhere: image/pull.py draws its progress bar with the CLI's helper (image/ is another
# session's work in phase 1). Remove the entry when it moves; the test then keeps it out.
CLI_IMPORT_ALLOWED = {"nagaya.image.pull"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit_else = child.orelse
                for n in visit_else:
                    visit(n, top)
                continue
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import) and (top or not top_level_only):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and (top or not top_level_only):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child, inner)

    visit(tree, True)
    return {m for m in found if m == "nagaya" or m.startswith("nagaya.")}


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in ROOT.rglob("*.py") if "migrations" not in p.parts}


def test_no_part_imports_the_cli() -> None:
    mods = _modules()
    offenders = {m: sorted(i for i in _imports(p, top_level_only=False) if i == "nagaya.cli" or
                           i.startswith("nagaya.cli."))
                 for m, p in mods.items() if not m.startswith("nagaya.cli.") and m not in CLI_IMPORT_ALLOWED}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_cycles() -> None:
    mods = _modules()
    graph = {m: {i for i in _imports(p, top_level_only=False) if i in mods and i != m} for m, p in mods.items()}
    # `from nagaya.x import y` names module nagaya.x (and nagaya.x.y if that is a module); a package's
    # __init__ importing its own submodules is how a package is built, not a cycle
    for m in graph:
        graph[m] = {i for i in graph[m] if not i.startswith(m + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n):], n])
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert cycles == []


def test_server_app_is_assembly_only() -> None:
    """server/app.py builds the application from the doors (api/, portal/, token service, notifications) and
    handles nothing itself: no route handler (no nested or decorated function), no route added by hand."""
    path = ROOT / "server" / "app.py"
    tree = ast.parse(path.read_text(), str(path))
    handlers = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
        if fn.decorator_list:
            handlers.append(f"{fn.name}: decorated")
        handlers += [f"{fn.name}.{n.name}: nested" for n in ast.walk(fn)
                     if n is not fn and isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    routes = {"add_api_route", "add_route", "add_websocket_route", "api_route", "route", "websocket", "get", "post",
              "put", "patch", "delete", "mount"}
    handlers += [f"line {n.lineno}: .{n.func.attr}(...)" for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in routes
                 and not (isinstance(n.func.value, ast.Attribute) and n.func.value.attr == "environ")]
    assert handlers == []
    # and it stays small: a door or a rule that grows here belongs in api/, portal/ or a part
    assert len(path.read_text().splitlines()) <= 80
