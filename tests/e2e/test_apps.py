"""Interactive apps in the portal, end to end in headless Chromium, on the local backend: a Jupyter session
from an image the tests build (Debian's Jupyter packages), connected through the portal's proxy, a cell run
over the kernel's websocket; a web app of the user's own on its unix socket; another user's session URL is a
404; the token never in a page; idle culling with the clock moved; ending leaves no process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SHOTS, wait_indexed
from tests.integration.site.conftest import Site, SiteUser, push, run_root

START_TIMEOUT = 600          # the first start pulls and unpacks a ~400 MB image as the user

WEB_APP = """import os, socketserver, http.server as h
class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
class H(h.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("hello from my app; cookies seen: " + self.headers.get("Cookie", "")).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(b)))
        self.send_header("Set-Cookie", "nagaya_session=planted; Path=/"); self.end_headers(); self.wfile.write(b)
    def address_string(self):
        return "unix"
S(os.environ["NAGAYA_APP_SOCKET"], H).serve_forever()
"""


@pytest.fixture(scope="module")
def jupyter(portal: Site, users: dict[str, SiteUser], world: dict[str, Any]) -> str:
    from tests.helpers import jupyter_image

    ref = f"{portal.registry}/nye-alice/jupyter:1"
    r = push(users["alice"], jupyter_image.archive(), ref, world["creds"]["alice"])
    assert r.returncode == 0, r.stderr
    wait_indexed(portal, world["creds"]["alice"], "nye-alice/jupyter")
    return ref


@pytest.fixture(autouse=True)
def no_session_left(portal: Site) -> Any:
    """Whatever a failed test left: every session is ended (a cull pass far in the future) before the site goes."""
    yield
    cull(portal, time.time() + 10**7)
    for sid in records(portal):
        wait_gone(sid)


def server_log(site: Site) -> str:
    ls = subprocess.run(["ls", "-laRn", f"{site.state_dir}-apps"], capture_output=True, text=True).stdout
    return (site.state_dir / "logs" / "server.log").read_text(errors="replace")[-1500:] + ls


def records(site: Site) -> dict[str, dict[str, Any]]:
    d = site.state_dir / "app-sessions"
    return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")} if d.is_dir() else {}


def processes_of(sid: str) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if sid in cmd and state != "Z":
            out.append(f"{p.name}: {cmd[:200]}")
    return out


def wait_gone(sid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while processes_of(sid):
        assert time.monotonic() < deadline, f"processes left after the session ended: {processes_of(sid)}"
        time.sleep(0.5)


def start(ui: Any, site: Site, kind: str, image: str, command: str = "") -> str:
    before = set(records(site))
    ui.page.goto("/sessions")
    ui.page.select_option("#start-session select[name=kind]", kind)
    ui.page.select_option("#start-session select[name=image]", image)
    if command:
        ui.page.fill("#start-session input[name=command]", command)
    ui.page.click("#start-session button[type=submit]")
    ui.page.wait_for_url("**/sessions")
    new = set(records(site)) - before
    assert len(new) == 1, ui.page.content()[:2000]
    sid = new.pop()
    deadline = time.monotonic() + START_TIMEOUT
    while not ui.page.locator(f"tr[data-session='{sid}'] a.connect").count():
        assert time.monotonic() < deadline, f"the session never became ready: {ui.page.content()[-3000:]}"
        row = ui.page.locator(f"tr[data-session='{sid}']").inner_text()
        assert "FAILED" not in row and "ended" not in row, row
        time.sleep(2)
        ui.page.reload()
    return sid


def cull(site: Site, now: float) -> list[dict[str, Any]]:
    r = run_root(["setpriv", "--reuid=nagaya", "--regid=nagaya", "--init-groups", "--", sys.executable, "-I",
                  "-m", "nagaya.server.apps", "cull", str(site.state_dir / "server.json"), "--now", str(now)])
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout.strip().splitlines()[-1]))


RUN_CELL = """async ([base]) => {
  const k = await (await fetch(base + "api/kernels", {method: "POST", body: "{}"})).json();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(proto + "//" + location.host + base + "api/kernels/" + k.id + "/channels");
  return await new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error("no output in 60 s")), 60000);
    ws.onerror = () => reject(new Error("websocket error"));
    ws.onopen = () => ws.send(JSON.stringify({
      header: {msg_id: "m1", username: "e2e", session: "s1", msg_type: "execute_request", version: "5.3", date: ""},
      parent_header: {}, metadata: {}, channel: "shell",
      content: {code: "print(6 * 7)", silent: false, store_history: false, user_expressions: {}, allow_stdin: false}}));
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.msg_type === "stream" && m.parent_header.msg_id === "m1") { ws.close(); resolve(m.content.text); }
    };
  });
}"""


RUN_TERMINAL = """async ([base]) => {
  const t = await (await fetch(base + "api/terminals", {method: "POST"})).json();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(proto + "//" + location.host + base + "terminals/websocket/" + t.name);
  let seen = "";
  return await new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error("no output in 60 s: " + seen)), 60000);
    ws.onerror = () => reject(new Error("websocket error"));
    ws.onopen = () => ws.send(JSON.stringify(["stdin", "echo term-$((6*7)) $(id -un)\\r"]));
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m[0] !== "stdout") return;
      seen += m[1];
      const g = seen.match(/term-42 (\\S+)/);
      if (g) { ws.close(); resolve(g[1]); }
    };
  });
}"""


def test_jupyter_session_through_the_proxy(as_user: Any, portal: Site, users: dict[str, SiteUser], jupyter: str,
                                           job_service: Path) -> None:
    alice, bob = as_user(users["alice"]), as_user(users["bob"])
    sid = start(alice, portal, "jupyter", jupyter)
    rec = records(portal)[sid]
    html = alice.page.content()
    row = alice.page.locator(f"tr[data-session='{sid}']").inner_text()
    assert "RUNNING" in row and rec["digest"].startswith("sha256:") and rec["digest"][7:19] in html, row
    assert rec["token"] not in html                          # the token is the proxy's alone
    alice.shot("sessions-running")

    # Connect: Jupyter's own page, through the proxy, in Chromium.
    url = f"/sessions/{sid}/app/tree"
    r = alice.page.goto(url)
    assert r is not None and r.status == 200, (r and r.status, server_log(portal))
    alice.page.wait_for_selector("#notebook_list", state="attached", timeout=60000)
    assert rec["token"] not in alice.page.content()
    alice.shot("jupyter-through-proxy")
    # A cell: a kernel started over the REST API, code run over its websocket, the output back.
    out = alice.page.evaluate(RUN_CELL, [f"/sessions/{sid}/app/"])
    assert out.strip() == "42"
    # A terminal in the session (a shell in Alice's image, as Alice), over the same authenticated websocket proxy.
    assert alice.page.evaluate(RUN_TERMINAL, [f"/sessions/{sid}/app/"]) == users["alice"].name
    alice.page.goto("/sessions")
    alice.page.goto(str(alice.page.get_attribute(f"tr[data-session='{sid}'] a.terminal", "href")))
    assert "/terminals/" in alice.page.url and not alice.page.url.endswith("/new")
    alice.page.wait_for_selector("#terminado-container, .terminal", state="attached", timeout=60000)
    alice.shot("jupyter-terminal-through-proxy")

    # Bob, Alice's session URL: the same answer as a missing session, for pages, the API and websockets.
    with bob.client() as c:
        for path in ("tree", "api/kernels", "api/status"):
            assert c.get(f"/sessions/{sid}/app/{path}").status_code == 404
        assert c.post(f"/sessions/{sid}/app/api/kernels", json={}).status_code == 404
        assert c.post(f"/sessions/{sid}/end", data={"csrf": "x"}).status_code in (403, 404)
    with httpx.Client(base_url=portal.server, follow_redirects=False) as anon:
        assert anon.get(f"/sessions/{sid}/app/api/status").status_code in (303, 404)
    bob.page.goto("/sessions")
    assert sid[:8] not in bob.page.content()
    got = bob.page.evaluate("""async ([u]) => await new Promise((resolve) => {
        const ws = new WebSocket("ws://" + location.host + u);
        ws.onopen = () => resolve("open"); ws.onclose = () => resolve("closed"); })""",
                            [f"/sessions/{sid}/app/api/kernels/x/channels"])
    assert got == "closed"
    # A cross-site write through Alice's own login is refused (the proxy adds the token: Origin must be ours).
    with alice.client() as c:
        r = c.post(f"/sessions/{sid}/app/api/kernels", json={}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
    logs = "".join(p.read_text(errors="replace") for p in (portal.state_dir / "logs").glob("*.log"))
    assert logs
    assert rec["token"] not in logs

    # End: through the scheduler, and nothing of the session is left running.
    alice.page.goto("/sessions")
    alice.page.click(f"tr[data-session='{sid}'] form[action$='/end'] button")
    alice.page.wait_for_url("**/sessions")
    assert "ended by you" in alice.page.locator(f"tr[data-session='{sid}']").inner_text()
    wait_gone(sid)
    with alice.client() as c:
        assert c.get(f"/sessions/{sid}/app/api/status").status_code == 410


def test_web_app_and_idle_culling(as_user: Any, portal: Site, users: dict[str, SiteUser], jupyter: str,
                                  job_service: Path, world: dict[str, Any]) -> None:
    u = users["alice"]
    app = u.u.home / "e2e_web_app.py"
    app.write_text(WEB_APP)
    os.chown(app, u.u.uid, u.u.gid)
    alice = as_user(u)
    sid = start(alice, portal, "web", jupyter, f"python3 {app}")
    with alice.client() as c:
        c.cookies.set("theirs", "1")
        r = c.get(f"/sessions/{sid}/app/")
        assert r.status_code == 200, r.text
        assert r.text.startswith("hello from my app")
        assert "theirs=1" in r.text and "nagaya" not in r.text     # the portal's cookies never reach the app
        assert "nagaya_session" not in r.headers.get("set-cookie", "")   # nor may the app set ours
    # Not idle yet: a pass at the real time ends nothing; an hour later it does (no sleeping).
    assert not [x for x in cull(portal, time.time()) if x["session"] == sid]
    ended = [x for x in cull(portal, time.time() + 3700) if x["session"] == sid]   # idle: 1 h; deadline: 2 h
    assert ended and "idle" in ended[0]["why"]
    wait_gone(sid)
    alice.page.goto("/sessions")
    row = alice.page.locator(f"tr[data-session='{sid}']").inner_text()
    assert "idle" in row and "CANCELLED" in row
    # The same sessions through the API (personal access tokens): the owner's only, never the token.
    mine = portal.api("GET", "/api/sessions", auth=world["creds"]["alice"])
    assert mine.status_code == 200 and [x for x in mine.json() if x["id"] == sid and x["ended"]]
    assert "token" not in mine.text and records(portal)[sid]["token"] not in mine.text
    assert sid not in portal.api("GET", "/api/sessions", auth=world["creds"]["bob"]).text
    assert portal.api("DELETE", f"/api/sessions/{sid}", auth=world["creds"]["bob"]).status_code == 404
    if SHOTS.exists():
        alice.shot("sessions-culled")
    subprocess.run(["rm", "-f", str(app)], check=False)


TYPE_IN_TERMINAL = """async ([base]) => {
  const ws = new WebSocket((location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + base + "ws");
  ws.binaryType = "arraybuffer";
  let seen = "";
  return await new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error("no output in 60 s: " + seen)), 60000);
    ws.onerror = () => reject(new Error("websocket error"));
    ws.onopen = () => ws.send(new TextEncoder().encode("echo web-$((6*7)) $(id -un)\\r"));
    ws.onmessage = (e) => {
      seen += new TextDecoder().decode(e.data);
      const g = seen.match(/web-42 (\\S+)/);
      if (g) { ws.close(); resolve(g[1]); }
    };
  });
}"""


def test_web_terminal_session(as_user: Any, portal: Site, users: dict[str, SiteUser], jupyter: str,
                              job_service: Path) -> None:
    """A shell in the user's image (xterm.js over the proxied websocket), without Jupyter: a command runs, as
    the user; another user's terminal URL and websocket are refused; ending it leaves no shell behind."""
    alice, bob = as_user(users["alice"]), as_user(users["bob"])
    sid = start(alice, portal, "terminal", jupyter)
    base = f"/sessions/{sid}/app/"
    alice.page.goto(base)
    alice.page.wait_for_selector(".xterm", state="attached", timeout=60000)
    assert alice.page.evaluate(TYPE_IN_TERMINAL, [base]) == users["alice"].name
    alice.shot("web-terminal")
    with bob.client() as c:
        assert c.get(base).status_code == 404
    bob.page.goto("/sessions")
    got = bob.page.evaluate("""async ([u]) => await new Promise((resolve) => {
        const ws = new WebSocket("ws://" + location.host + u);
        ws.onopen = () => resolve("open"); ws.onclose = () => resolve("closed"); })""", [base + "ws"])
    assert got == "closed"
    alice.page.goto("/sessions")
    alice.page.click(f"tr[data-session='{sid}'] form[action$='/end'] button")
    alice.page.wait_for_url("**/sessions")
    wait_gone(sid)
