"""The server has one registry client (issue 13): image/registry.Registry, with the server's token source
(server/registry_client.py). No module under nagaya/server builds registry API requests of its own: none
spells a distribution API path, and the few that import httpx speak to other services (a session's unix
socket, slurmrestd), not to the registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nagaya
from nagaya.image.registry import Registry
from nagaya.server.registry_client import SiteRegistry

SERVER = Path(nagaya.__file__).resolve().parent / "server"
# httpx for things that are not the registry: app sessions' unix sockets, slurmrestd (moving to sched/)
HTTPX_ALLOWED = {"apps.py", "portal/apps.py", "slurmrest.py"}
# distribution API paths: /v2/<name>/..., manifests/, blobs/, tags/list, _catalog, referrers/
REGISTRY_PATH = re.compile(r"/v2/.|(^|/)(manifests|blobs)/|tags/list|_catalog|referrers/")
OCI_LAYOUT = re.compile(r"^blobs/(sha256/.*)?$")        # an OCI archive's entries (download, archive): not requests


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants (f-string pieces too), except route paths given to decorators (`/api/...`)."""
    routes = {id(n) for d in ast.walk(tree) if isinstance(d, ast.FunctionDef | ast.AsyncFunctionDef)
              for dec in d.decorator_list for n in ast.walk(dec)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in routes]


def test_no_hand_written_registry_client_in_server() -> None:
    offenders: list[str] = []
    for path in sorted(SERVER.rglob("*.py")):
        rel = path.relative_to(SERVER).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                  {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        if any(m == "httpx" or m.startswith("httpx.") for m in imports) and rel not in HTTPX_ALLOWED:
            offenders.append(f"{rel} imports httpx")
        for line, s in _strings(tree):
            if REGISTRY_PATH.search(s) and not s.startswith("/api/") and not OCI_LAYOUT.match(s):
                offenders.append(f"{rel}:{line} spells a registry API path: {s!r}")
    assert offenders == []


def test_the_server_client_is_the_cli_client() -> None:
    assert issubclass(SiteRegistry, Registry)
    # one implementation of each request: the server's class adds a token source, nothing of its own
    own = {k for k, v in vars(SiteRegistry).items() if callable(v) and not k.startswith("__")}
    assert own == set()
