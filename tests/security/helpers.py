"""What the security tests share: the portal as a browser uses it, the job spool as the server writes it,
and commands as the `nagaya` service account."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.integration.site.conftest import Site

SERVICE = "nagaya"
PY = "/opt/nagaya/bin/python"


def as_service(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Python code run as the service account (what a compromised server could do)."""
    return subprocess.run(["setpriv", f"--reuid={SERVICE}", f"--regid={SERVICE}", "--init-groups", "--", PY, "-I",
                           "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/"})


def portal(site: Site, user: str, password: str, client: httpx.Client | None = None,
           timeout: float = 30) -> tuple[httpx.Client, httpx.Response]:
    """A browser's password login on the portal (form, login CSRF). Keeps the cookies it gets."""
    c = client or httpx.Client(base_url=site.server, timeout=timeout)
    tok = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
    assert tok, "no login form"
    r = c.post("/login", data={"username": user, "password": password, "csrf": tok.group(1)})
    return c, r


def csrf(c: httpx.Client, path: str = "/projects") -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', c.get(path).text)
    assert m, f"no CSRF token on {path}"
    return m.group(1)


def spool(site: Site) -> Path:
    return site.state_dir / "jobs-spool"


def request_as_server(site: Site, user: str, op: str, args: dict[str, Any] | None = None,
                      rid: str | None = None) -> str:
    """Write a job request exactly as the server does (as the service account, temp + rename)."""
    rid = rid or secrets.token_hex(16)
    body = json.dumps({"id": rid, "user": user, "op": op, "args": args or {}})
    r = as_service("import os,sys; d=sys.argv[1]; t=f'{d}/.{sys.argv[2]}.tmp'; open(t,'w').write(sys.argv[3]); "
                   "os.replace(t, f'{d}/{sys.argv[2]}.json')", str(spool(site) / "requests"), rid, body)
    assert r.returncode == 0, r.stderr
    return rid


def wait_reply(site: Site, rid: str, timeout: float = 25) -> dict[str, Any] | None:
    """The dispatcher's reply: a regular single-link file (a planted link does not count), or None."""
    path = spool(site) / "replies" / f"{rid}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = path.lstat()
            if path.is_file() and not path.is_symlink() and st.st_nlink == 1 and st.st_uid == 0:
                data: dict[str, Any] = json.loads(path.read_text())
                path.unlink()
                return data
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def audit(site: Site, admin: tuple[str, str], **params: Any) -> list[dict[str, Any]]:
    r = site.api("GET", "/api/admin/audit", auth=admin, params={"limit": 10000, **params})
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()
    return rows
