"""Account expiry with the clock moved forward, not slept through: a second server on the site's database
runs with NAGAYA_CLOCK_OFFSET (the site's own server never sees that variable: `site up` starts it with a
clean environment). Warnings at login, on CLI output and on the portal's first page; at expiry the token
cut-off and the frozen project; the real-clock server meanwhile still treats the account as current."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.helpers.ports import free_port
from tests.integration.site.conftest import Site, SiteUser, ensure_group, ensure_user

pytestmark = pytest.mark.integration
PYTHON = "/opt/nagaya/bin/python"


@contextmanager
def clock_moved(site: Site, offset: str) -> Iterator[str]:
    """The site's server, once more, on another port with its clock moved by `offset`; yields its URL."""
    settings = json.loads((site.state_dir / "server.json").read_text())
    settings["port"] = free_port()
    d = Path(tempfile.mkdtemp(prefix="nagaya-clock-"))
    path = d / "server.json"
    path.write_text(json.dumps(settings))
    shutil.chown(d, "nagaya", "nagaya")
    shutil.chown(path, "nagaya", "nagaya")
    path.chmod(0o600)
    log = open(d / "server.log", "wb")
    p = subprocess.Popen(["setpriv", "--reuid=nagaya", "--regid=nagaya", "--init-groups", PYTHON, "-m",
                          "nagaya.server", str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=d,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(d), "NAGAYA_CLOCK_OFFSET": offset})
    url = f"http://127.0.0.1:{settings['port']}"
    try:
        end = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None and time.monotonic() < end, (d / "server.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        p.terminate()
        p.wait(timeout=30)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def use_server(user: SiteUser, registry: str, server: str) -> None:
    """Point the user's stored login at `server` (another process of the same site: same tokens)."""
    data = json.loads(user.auth_file.read_text())
    data["nagaya"][registry]["server"] = server
    user.auth_file.write_text(json.dumps(data))


def granted(server: str, repository: str, actions: str, creds: tuple[str, str]) -> set[str] | int:
    r = httpx.get(f"{server}/token", params={"service": "nagaya-registry",
                                              "scope": f"repository:{repository}:{actions}"}, auth=creds, timeout=30)
    if r.status_code != 200:
        return r.status_code
    payload = r.json()["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return {a for e in claims["access"] if e["name"] == repository for a in e["actions"]}


def portal_login(server: str, user: SiteUser) -> tuple[int, str]:
    """Log in through the portal's form; (status of the last page, its text)."""
    with httpx.Client(base_url=server, timeout=30, follow_redirects=True) as c:
        form = c.get("/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf, form[:2000]
        r = c.post("/login", data={"username": user.name, "password": user.password, "csrf": csrf.group(1)})
        return r.status_code, html.unescape(r.text)


def test_expiry_with_the_clock_moved_forward(site: Site, site_system: None) -> None:
    ensure_group("nagaya-admins")
    admin = ensure_user("nys-clk-admin", f"pw-clk-admin-{os.getpid()}", ("nagaya-admins",))
    u = ensure_user("nys-clk-user", f"pw-clk-user-{os.getpid()}")
    admin.login(site.server)
    u.login(site.server)
    expires = (datetime.now(UTC) + timedelta(days=20)).replace(microsecond=0)
    r = admin.nagaya("admin", "user", "set", u.name, "--expires", expires.isoformat())
    assert r.returncode == 0, r.stderr
    warning = f"warning: your account {u.name} expires on {expires:%Y-%m-%d}"

    # now: 20 days left, more than the 14 days of warning
    r = u.nagaya("project", "ls")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "warning" not in u.login(site.server).stderr

    # ten days later: warned at login, on every site command, and on the portal's first page
    with clock_moved(site, "+10d") as later:
        r = u.login(later)
        assert warning in r.stderr and "(in 9 days)" in r.stderr, r.stderr
        r = u.nagaya("project", "ls")
        assert r.returncode == 0 and warning in r.stderr, r.stderr
        status, page = portal_login(later, u)
        assert status == 200 and f"your account {u.name} expires on {expires:%Y-%m-%d}" in page
        assert granted(later, f"{u.name}/x", "pull,push", u.creds(site.registry)) == {"pull", "push"}

    # a day after expiry: the token is cut off, the portal refuses, the personal project is frozen
    with clock_moved(site, "+21d") as after:
        creds = u.creds(site.registry)
        use_server(u, site.registry, after)
        r = u.nagaya("project", "ls")
        assert r.returncode != 0 and "expired" in r.stderr, r.stderr
        assert granted(after, f"{u.name}/x", "pull", creds) == 401
        assert granted(after, f"{u.name}/x", "pull,push", admin.creds(site.registry)) == 403
        status, page = portal_login(after, u)
        assert status == 401 and "expired" in page
        # the site's own server runs on the real clock: the same token still works there
        assert granted(site.server, f"{u.name}/x", "pull,push", creds) == {"pull", "push"}
    r = admin.nagaya("admin", "user", "set", u.name, "--expires", "never")
    assert r.returncode == 0, r.stderr
    u.login(site.server)
