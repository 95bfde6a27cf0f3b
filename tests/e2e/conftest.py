"""Portal end-to-end fixtures: a real site (`nagaya site up`: registry + server as the service account), Unix
test users with passwords, images pushed with skopeo, and headless Debian Chromium driven by Playwright
(never `playwright install`: the browser is the system's)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.site.conftest import (
    Site,
    SiteUser,
    ensure_group,
    ensure_user,
    push,
    require,
    run_root,
    site_down,
    site_up,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"


@pytest.fixture(scope="session")
def e2e_system() -> None:
    require(os.geteuid() == 0, "e2e tests run as root: they create Unix users and start the site")
    for exe in ("nagaya", "skopeo", "setpriv", "chpasswd", "docker-registry"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    require(Path(CHROMIUM).exists(), "Debian chromium is not installed (bash deploy/install.sh)")
    require(run_root(["id", "nagaya"]).returncode == 0, "service account nagaya missing (bash deploy/install.sh)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        require(False, "the playwright package is not installed (pip install playwright)")


@pytest.fixture(scope="session")
def e2e_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-e2e-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def portal(e2e_system: None, e2e_dir: Path) -> Iterator[Site]:
    s = site_up(e2e_dir / "state")
    yield s
    site_down(s.state_dir)


@pytest.fixture(scope="session")
def users(e2e_system: None) -> dict[str, SiteUser]:
    ensure_group("nagaya-admins")
    spec = {"alice": (), "bob": (), "admin": ("nagaya-admins",)}
    return {k: ensure_user(f"nye-{k}", f"pw-{k}-{os.getpid()}", g) for k, g in spec.items()}


@pytest.fixture(scope="session")
def archive(e2e_dir: Path) -> Path:
    from tests.helpers import images

    layer = images.tar_bytes([images.entry("bin/", "dir"),
                              images.entry("bin/busybox", "file", Path("/bin/busybox").read_bytes(), mode=0o755)])
    layout = images.oci_layout(e2e_dir / "bb-layout", [layer], {"Cmd": ["/bin/busybox", "true"]})
    out = images.oci_archive(layout, e2e_dir / "bb.tar")
    run_root(["chmod", "-R", "a+rX", str(e2e_dir / "bb-layout"), str(out)])
    return out


def api_login(site: Site, u: SiteUser) -> tuple[str, str]:
    """(user, personal access token) from the JSON API, as `nagaya login` gets them."""
    r = site.api("POST", "/api/login", auth=(u.name, u.password), json={"token_name": "e2e"})
    assert r.status_code == 200, r.text
    return u.name, r.json()["token"]


def wait_indexed(site: Site, creds: tuple[str, str], repository: str, timeout: float = 30) -> None:
    """The registry notifies the server asynchronously: wait until the index has the repository."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = site.api("GET", "/api/repositories", auth=creds)
        if r.status_code == 200 and any(x["name"] == repository for x in r.json()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{repository} never appeared in the index")


@pytest.fixture(scope="session")
def world(portal: Site, users: dict[str, SiteUser], archive: Path) -> dict[str, Any]:
    """Alice's personal image, a site-wide image from the admin, and Bob's private image."""
    creds = {k: api_login(portal, u) for k, u in users.items()}
    r = portal.api("POST", "/api/projects", auth=creds["admin"], json={"name": "e2e-shared", "kind": "site"})
    assert r.status_code == 201, r.text
    pushes = [("alice", "nye-alice/hello:1"), ("alice", "nye-alice/scratch:1"), ("admin", "e2e-shared/base:1"),
              ("bob", "nye-bob/secret:1")]
    for who, ref in pushes:
        r = push(users[who], archive, f"{portal.registry}/{ref}", creds[who])
        assert r.returncode == 0, r.stderr
        wait_indexed(portal, creds[who], ref.split(":")[0])
    return {"creds": creds}


@pytest.fixture(scope="session")
def browser(e2e_system: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Portal:
    """One browser context (its own cookies) for one user."""

    def __init__(self, browser: Any, site: Site) -> None:
        self.site = site
        self.ctx = browser.new_context(base_url=site.server, viewport={"width": 1280, "height": 860},
                                       accept_downloads=True)
        self.ctx.set_default_timeout(20000)
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        # Script and CSP errors; refused requests (a wrong password's 401) are expected, not errors.
        self.page.on("console", lambda m: self.errors.append(m.text)
                     if m.type == "error" and not m.text.startswith("Failed to load resource") else None)

    def login(self, u: SiteUser) -> None:
        self.page.goto("/login")
        self.page.fill("input[name=username]", u.name)
        self.page.fill("input[name=password]", u.password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url("**/dashboard")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def client(self) -> httpx.Client:
        """An HTTP client holding this browser's session cookie (for raw requests a page would not make)."""
        jar = {c["name"]: c["value"] for c in self.ctx.cookies()}
        return httpx.Client(base_url=self.site.server, cookies=jar, timeout=30, follow_redirects=False)

    def csrf(self) -> str:
        self.page.goto("/dashboard")
        return str(self.page.get_attribute("form[action='/logout'] input[name=csrf]", "value"))

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def as_user(browser: Any, portal: Site, world: dict[str, Any]) -> Iterator[Any]:
    opened: list[Portal] = []

    def make(u: SiteUser) -> Portal:
        p = Portal(browser, portal)
        p.login(u)
        opened.append(p)
        return p
    yield make
    for p in opened:
        p.close()


@pytest.fixture
def job_service(system: None, portal: Site) -> Iterator[Path]:
    """The root job dispatcher of this site (what runs jobs as each user), for one test: started here, stopped
    by its pid. `system` (tests/conftest.py): the jobs run containers, so the runtime must be there."""
    import subprocess
    import sys

    spool = portal.state_dir / "jobs-spool"
    try:
        os.kill(int((spool / "dispatcher.pid").read_text()), 0)
        yield spool                     # `nagaya site up` (as root) runs the site's own dispatcher
        return
    except (OSError, ValueError):
        pass
    p = subprocess.Popen([sys.executable, "-m", "nagaya.server.jobs", "dispatch", str(spool)],
                         stdout=subprocess.DEVNULL, stderr=open(portal.state_dir / "dispatcher.log", "ab"))
    deadline = time.monotonic() + 20
    while not (spool / "dispatcher.pid").exists():
        assert p.poll() is None and time.monotonic() < deadline, "the job dispatcher did not start"
        time.sleep(0.05)
    try:
        yield spool
    finally:
        p.terminate()
        p.wait(timeout=10)
