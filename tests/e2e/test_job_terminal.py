"""The portal's terminal into a running job, end to end in headless Chromium on the local backend: Alice opens
the Terminal of her running job, types into xterm.js, and her shell is in the job's own container (its pid
namespace: the job's `sleep` among a handful of processes, her own uid); Bob gets 404 for the page and a refused
websocket; a cross-site websocket with Alice's cookie is refused; closing the page leaves no process of the
terminal (a background job it started included) while the job itself runs on."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import api_login, wait_indexed
from tests.e2e.test_apps import processes_of as host_processes
from tests.integration.site.conftest import Site, SiteUser, push, run_root

APPLETS = ("sh", "sleep", "ps", "id", "cat", "echo")

READ_TERMINAL = """() => { const b = window.nagayaJobTerm.buffer.active; let s = "";
  for (let i = 0; i < b.length; i++) { s += b.getLine(i).translateToString(true) + "\\n"; } return s; }"""


@pytest.fixture(scope="module")
def shellbox(portal: Site, users: dict[str, SiteUser], world: dict[str, Any], e2e_dir: Path) -> str:
    """A tiny image with a shell: busybox and the applets the test types, as links."""
    from tests.helpers import images

    entries: list[Any] = [images.entry("bin/", "dir"),
                          images.entry("bin/busybox", "file", Path("/bin/busybox").read_bytes(), mode=0o755)]
    entries += [images.entry(f"bin/{a}", "symlink", link="busybox") for a in APPLETS]
    entries += [images.entry("proc/", "dir"), images.entry("tmp/", "dir", mode=0o1777)]
    layout = images.oci_layout(e2e_dir / "shellbox-layout", [images.tar_bytes(entries)], {"Cmd": ["/bin/sh"]})
    out = images.oci_archive(layout, e2e_dir / "shellbox.tar")
    run_root(["chmod", "-R", "a+rX", str(layout), str(out)])
    ref = f"{portal.registry}/nye-alice/shellbox:1"
    r = push(users["alice"], out, ref, world["creds"]["alice"])
    assert r.returncode == 0, r.stderr
    wait_indexed(portal, world["creds"]["alice"], "nye-alice/shellbox")
    return ref


def wait_for(what: str, cond: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_terminal_into_a_running_job(as_user: Any, portal: Site, users: dict[str, SiteUser], shellbox: str,
                                     job_service: Path) -> None:
    tok = api_login(portal, users["alice"])
    r = portal.api("POST", "/api/jobs", auth=tok, json={
        "image": shellbox, "command": ["/bin/sh", "-c", "echo job-ready; exec /bin/sleep 4321"],
        "name": "e2e-terminal", "time_limit": "10:00"})
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    try:
        wait_for("the job never ran", lambda: "job-ready" in portal.api(
            "GET", f"/api/jobs/{job}/log", auth=tok).json().get("log", ""), timeout=300)
        alice, bob = as_user(users["alice"]), as_user(users["bob"])

        # The job page offers a Terminal while the job runs; it opens xterm.js on the job's shell.
        alice.page.goto(f"/jobs/{job}")
        alice.page.wait_for_selector("a.job-terminal", timeout=30000)
        href = alice.page.get_attribute("a.job-terminal", "href")
        assert href == f"/jobs/{job}/terminal"
        alice.page.goto(href)
        alice.page.wait_for_selector(".xterm", state="attached", timeout=30000)
        alice.page.wait_for_selector("#job-terminal-state:has-text('Connected')", timeout=30000)
        alice.page.click("#job-terminal")
        alice.page.keyboard.type("echo me=$(id -u); ps -o pid,args; /bin/sleep 5555 & echo bg-started\n", delay=5)
        wait_for("no answer from the job's shell: " + alice.page.evaluate(READ_TERMINAL),
                 lambda: "bg-started" in alice.page.evaluate(READ_TERMINAL) and
                 "me=" in alice.page.evaluate(READ_TERMINAL), timeout=60)
        time.sleep(1)
        shown = alice.page.evaluate(READ_TERMINAL)
        alice.shot("job-terminal")
        assert not [e for e in alice.errors if "xterm" in e.lower() and "style" not in e.lower()], alice.errors
        assert f"me={users['alice'].u.uid}" in shown, shown               # as Alice, never the server or root
        # The job's own pid namespace: its sleep is there, with a small pid, and the host's processes are not.
        lines = [x.split(None, 1) for x in shown.splitlines() if x.strip()[:1].isdigit()]
        jobs_sleep = [int(p) for p, args in lines if "sleep 4321" in args]
        assert jobs_sleep and jobs_sleep[0] < 10, shown
        assert len(lines) < 12 and not any("python" in args or "setpriv" in args for _, args in lines), shown
        assert host_processes("sleep 5555"), "the shell's background job did not start"

        # Bob: the page is a 404, the websocket is refused, exactly like a job that does not exist.
        assert job not in {j["id"] for j in portal.api("GET", "/api/jobs", auth=api_login(portal, users["bob"])).json()}
        with bob.client() as c:
            assert c.get(f"/jobs/{job}/terminal").status_code == 404
            assert c.get("/jobs/999999/terminal").status_code == 404
        bob.page.goto("/jobs")
        got = bob.page.evaluate("""async ([u]) => await new Promise((resolve) => {
            const ws = new WebSocket("ws://" + location.host + u);
            ws.onopen = () => resolve("open"); ws.onclose = () => resolve("closed"); })""",
                                [f"/jobs/{job}/terminal/ws"])
        assert got == "closed"
        # A cross-site page cannot use Alice's login for a terminal (Origin checked before the upgrade), and no
        # login at all gets nothing.
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        cookie = "; ".join(f"{c['name']}={c['value']}" for c in alice.ctx.cookies())
        ws_url = portal.server.replace("http://", "ws://") + f"/jobs/{job}/terminal/ws"
        for headers in ({"Cookie": cookie, "Origin": "http://evil.example"}, {"Origin": portal.server}):
            with pytest.raises(InvalidStatus), connect(ws_url, additional_headers=headers, open_timeout=30):
                pass
        with httpx.Client(base_url=portal.server, follow_redirects=False) as anon:
            assert anon.get(f"/jobs/{job}/terminal").status_code in (303, 401, 404)

        # Closing the page ends the terminal: its shell and the background job are gone; the job runs on.
        alice.page.goto(f"/jobs/{job}")
        wait_for("processes of the terminal were left: " + "; ".join(host_processes("sleep 5555") +
                                                                      host_processes(f"job_terminal user {job}")),
                 lambda: not host_processes("sleep 5555") and not host_processes(f"job_terminal user {job}"),
                 timeout=60)
        assert host_processes("sleep 4321"), "closing the terminal ended the job itself"
        assert portal.api("GET", f"/api/jobs/{job}", auth=tok).json()["state"] == "RUNNING"
        assert not [x for x in os.listdir(portal.state_dir / "jobs-spool" / "terms")]
    finally:
        portal.api("DELETE", f"/api/jobs/{job}", auth=tok)
        wait_for("the job was not cancelled", lambda: not host_processes("sleep 4321"), timeout=60)


def test_sessions_page_shows_the_sites_limits(as_user: Any, portal: Site, users: dict[str, SiteUser]) -> None:
    """[apps] limits go from the site's config through server.json (`nagaya site up`) to the Sessions page."""
    import json

    st = json.loads(run_root(["cat", str(portal.state_dir / "server.json")]).stdout)
    assert (st["app_idle_minutes"], st["app_max_hours"], st["app_warn_minutes"]) == (60, 12, 10)
    alice = as_user(users["alice"])
    alice.page.goto("/sessions")
    text = alice.page.inner_text("#session-limits")
    assert "after 60 minutes" in text and "warns 10 minutes" in text and "at most 12 hours" in text, text
