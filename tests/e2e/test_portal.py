"""The web portal in headless Chromium against a real site: login/logout, images (own + shared only),
projects and members, robot tokens (create, rotate, revoke), image delete, jobs page, admin audit trail and
CSV export, and a second user who gets 403/404 on every object URL of the first (pages and API).
Screenshots of each page go to test-output/screenshots/."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Portal, api_login
from tests.integration.site.conftest import Site, SiteUser

pytestmark = pytest.mark.e2e


def _granted(site: Site, repository: str, auth: tuple[str, str]) -> set[str] | int:
    r = site.token(f"repository:{repository}:pull", auth)
    if r.status_code != 200:
        return r.status_code
    payload = r.json()["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return {a for e in claims["access"] for a in e["actions"]}


def test_login_logout_session_cookie(browser: Any, portal: Site, users: dict[str, SiteUser],
                                     world: dict[str, Any]) -> None:
    p = Portal(browser, portal)
    try:
        page = p.page
        page.goto("/images")
        page.wait_for_url(re.compile(r".*/login\?next=.*"))                   # anonymous: sent to the login page
        p.shot("01-login")
        page.fill("input[name=username]", users["alice"].name)
        page.fill("input[name=password]", "wrong password")
        page.click("button[type=submit]")
        assert "Wrong username or password" in page.inner_text("main")
        page.fill("input[name=password]", users["alice"].password)
        page.click("button[type=submit]")
        page.wait_for_url("**/images")                         # back where the user wanted to go
        cookie = next(c for c in p.ctx.cookies() if c["name"] == "nagaya_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]   # http: no Secure
        page.goto("/dashboard")
        assert "Hello, nye-alice" in page.inner_text("h1")
        recent = page.inner_text("main table")
        assert "nye-alice/hello" in recent and "e2e-shared/base" in recent and "nye-bob" not in recent
        p.shot("02-dashboard")
        page.click("text=Sign out")
        page.wait_for_url("**/login")
        page.goto("/dashboard")
        page.wait_for_url(re.compile(r".*/login\?next=.*"))                   # the session is gone server-side
        with httpx.Client(base_url=portal.server, cookies={"nagaya_session": cookie["value"]}) as c:
            assert c.get("/dashboard").status_code == 303       # the old cookie is dead too
        assert not p.errors, p.errors                          # no CSP or script errors on the pages
    finally:
        p.close()


def test_images_own_and_shared_only(as_user: Any, portal: Site, users: dict[str, SiteUser]) -> None:
    p: Portal = as_user(users["alice"])
    page = p.page
    page.goto("/images")
    text = page.inner_text("main")
    assert "nye-alice/hello" in text and "e2e-shared/base" in text
    assert "nye-bob" not in text
    p.shot("03-images")
    page.click("text=nye-alice/hello")
    page.wait_for_url("**/images/nye-alice/hello")
    text = page.inner_text("main")
    assert "sha256:" in text and "KiB" in text and "Pushed" in text
    assert f"nagaya run {portal.registry}/nye-alice/hello:1" in text
    assert page.locator("button.danger", has_text="Delete").count() == 1      # owner may delete
    p.shot("04-repository")
    with page.expect_download() as dl:
        page.click("text=manifest (JSON)")
    manifest = json.loads(open(dl.value.path()).read())
    assert manifest["layers"] and manifest["config"]["digest"].startswith("sha256:")
    # the whole image as one file (an OCI archive streamed from the registry): every blob verifies, and
    # nagaya imports it as an ordinary user
    with page.expect_download() as dl:
        page.click("text=Download image")
    assert dl.value.suggested_filename == "nye-alice_hello_1.oci.tar"
    out = users["alice"].u.home / "hello.oci.tar"
    dl.value.save_as(out)
    with tarfile.open(out) as tar:
        names = tar.getnames()
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith("blobs/sha256/"):
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == m.name.rsplit("/", 1)[1]
    assert {"oci-layout", "index.json", f"blobs/sha256/{manifest['config']['digest'][7:]}"} <= set(names)
    os.chown(out, users["alice"].u.uid, users["alice"].u.gid)
    r = users["alice"].nagaya("image", "import", str(out), "--name", "e2e-imported")
    assert r.returncode == 0, r.stderr
    out.unlink()
    # the shared image: readable, not deletable for a non-admin
    page.goto("/images/e2e-shared/base")
    assert "sha256:" in page.inner_text("main")
    assert page.locator("button.danger", has_text="Delete").count() == 0


def test_delete_image(as_user: Any, portal: Site, users: dict[str, SiteUser], world: dict[str, Any]) -> None:
    p: Portal = as_user(users["alice"])
    page = p.page
    page.goto("/images/nye-alice/scratch")
    page.on("dialog", lambda d: d.accept())
    page.click("button.danger")
    page.wait_for_url("**/images")
    assert "Deleted nye-alice/scratch" in page.inner_text("main")
    assert "nye-alice/scratch" not in page.inner_text("main table") if page.locator("main table").count() else True
    r = httpx.get(f"http://{portal.registry}/v2/nye-alice/scratch/manifests/1", timeout=10)
    assert r.status_code == 401                                 # nothing anonymous; now check as alice:
    creds = world["creds"]["alice"]
    tok = portal.token("repository:nye-alice/scratch:pull", creds).json()["token"]
    r = httpx.get(f"http://{portal.registry}/v2/nye-alice/scratch/manifests/1", timeout=10,
                  headers={"Authorization": f"Bearer {tok}",
                           "Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert r.status_code == 404                                 # gone from the registry itself


def test_project_and_members(as_user: Any, users: dict[str, SiteUser]) -> None:
    p: Portal = as_user(users["alice"])
    page = p.page
    page.goto("/projects")
    page.fill("input[name=name]", "e2e-lab")
    page.click("text=Create project")
    page.wait_for_url("**/projects/e2e-lab")
    assert "Project e2e-lab created" in page.inner_text("main")
    page.fill("#new-member", users["bob"].name)
    page.select_option("select[name=role]", "developer")
    page.click("text=Save member")
    page.wait_for_url("**/projects/e2e-lab")
    rows = page.inner_text("main table")
    assert users["bob"].name in rows and "developer" in rows and "owner" in rows
    p.shot("05-project")
    # an unknown user: a clear error page, nothing added
    page.fill("#new-member", "nye-nobody-here")
    page.click("text=Save member")
    assert "no such user" in page.inner_text("main")
    page.goto("/projects")
    assert "e2e-lab" in page.inner_text("main table")
    p.shot("06-projects")


def test_tokens_create_rotate_revoke(as_user: Any, portal: Site, users: dict[str, SiteUser]) -> None:
    p: Portal = as_user(users["alice"])
    page = p.page
    page.goto("/tokens")
    page.select_option("select[name=project]", "nye-alice")
    page.fill("input[name=name]", "ci")
    page.click("text=Create token")
    secret = page.inner_text("#secret").strip()
    assert secret.startswith("nyr_") and "shown only on this page" in page.inner_text("main")
    p.shot("07-token-secret")
    robot = "robot$nye-alice+ci"
    assert _granted(portal, "nye-alice/hello", (robot, secret)) == {"pull"}
    page.goto("/tokens")
    assert secret not in page.content()                         # never shown again
    p.shot("08-tokens")
    page.on("dialog", lambda d: d.accept())
    page.click("#token-nye-alice-ci >> text=Rotate")
    new = page.inner_text("#secret").strip()
    assert new != secret and new.startswith("nyr_")
    assert _granted(portal, "nye-alice/hello", (robot, secret)) == 401       # the old secret is dead
    assert _granted(portal, "nye-alice/hello", (robot, new)) == {"pull"}
    page.goto("/tokens")
    page.click("#token-nye-alice-ci >> text=Revoke")
    page.wait_for_url("**/tokens")
    assert "revoked" in page.inner_text("#token-nye-alice-ci")
    assert _granted(portal, "nye-alice/hello", (robot, new)) == 401


def test_jobs_page(as_user: Any, portal: Site, users: dict[str, SiteUser]) -> None:
    p: Portal = as_user(users["alice"])
    page = p.page
    page.goto("/jobs")
    text = page.inner_text("main")
    assert "Run a job" in text and f"{portal.registry}/nye-alice/hello:1" in page.inner_html("select[name=image]")
    assert f"{portal.registry}/nye-bob/secret:1" not in page.inner_html("select[name=image]")
    p.shot("09-jobs")
    # `nagaya site up` (as root) starts the job service with the site: the API answers at once.
    alice = api_login(portal, users["alice"])
    assert portal.api("GET", "/api/jobs", auth=alice).status_code == 200


def test_second_user_gets_403_or_404_everywhere(as_user: Any, portal: Site, users: dict[str, SiteUser],
                                                  world: dict[str, Any]) -> None:
    alice = world["creds"]["alice"]
    # Alice's private objects: her personal project, a second project, a token in it.
    r = portal.api("POST", "/api/projects", auth=alice, json={"name": "e2e-private"})
    assert r.status_code == 201, r.text
    r = portal.api("POST", "/api/projects/e2e-private/tokens", auth=alice, json={"name": "deploy", "scope": "pull"})
    assert r.status_code == 201, r.text
    r = portal.api("POST", "/api/projects/nye-alice/tokens", auth=alice, json={"name": "keep", "scope": "pull"})
    assert r.status_code == 201, r.text
    digest = portal.api("GET", "/api/repositories/nye-alice/hello/tags", auth=alice).json()[0]["digest"]

    bob_p: Portal = as_user(users["bob"])
    bob_page = bob_p.page
    bob_page.goto("/images/nye-alice/hello")
    assert "Not found" in bob_page.inner_text("h1")
    bob_p.shot("10-other-users-image-404")
    c = bob_p.client()
    csrf = bob_p.csrf()
    pages = ["/images/nye-alice/hello", f"/manifest/nye-alice/hello?ref={digest}", "/manifest/nye-alice/hello?ref=1",
             "/projects/nye-alice", "/projects/e2e-private", "/images?project=nye-alice",
             "/admin/users", "/admin/jobs", "/admin/audit", "/admin/audit.csv", "/admin/audit.json"]
    for url in pages:
        r = c.get(url)
        assert r.status_code in (403, 404), (url, r.status_code)
        assert digest not in r.text and "deploy" not in r.text
    posts = [("/images/delete", {"repository": "nye-alice/hello", "digest": digest}),
             ("/projects/nye-alice/members", {"member": users["bob"].name, "kind": "user", "role": "owner"}),
             ("/projects/e2e-private/members", {"member": users["bob"].name, "kind": "user", "role": "owner"}),
             ("/projects/e2e-private/members/remove", {"member": users["alice"].name, "kind": "user"}),
             ("/tokens", {"project": "e2e-private", "name": "evil", "scope": "pull", "expires_days": "1"}),
             ("/tokens/e2e-private/deploy/revoke", {}), ("/tokens/e2e-private/deploy/rotate", {}),
             ("/tokens/nye-alice/keep/revoke", {}), ("/tokens/nye-alice/keep/rotate", {})]
    for url, form in posts:
        r = c.post(url, data={**form, "csrf": csrf})
        assert r.status_code in (403, 404), (url, r.status_code)
    # the same through the JSON API with Bob's own token
    bob = api_login(portal, users["bob"])
    api = [("GET", "/api/projects/e2e-private", None), ("GET", "/api/projects/e2e-private/members", None),
           ("GET", "/api/projects/nye-alice/members", None), ("GET", "/api/repositories/nye-alice/hello/tags", None),
           ("GET", "/api/tokens?project=e2e-private", None), ("GET", "/api/tokens?project=nye-alice", None),
           ("GET", "/api/audit", None),
           ("POST", "/api/projects/e2e-private/members", {"name": users["bob"].name, "role": "owner"}),
           ("POST", "/api/projects/e2e-private/tokens", {"name": "evil", "scope": "pull"}),
           ("DELETE", "/api/projects/e2e-private/tokens/deploy", None),
           ("DELETE", "/api/projects/nye-alice/tokens/keep", None),
           ("DELETE", f"/api/projects/e2e-private/members/user/{users['alice'].name}", None)]
    for method, url, body in api:
        r = portal.api(method, url, auth=bob, json=body)
        assert r.status_code in (403, 404), (method, url, r.status_code)
    r = portal.api("GET", "/api/repositories", auth=bob)
    assert {x["project"] for x in r.json()} <= {"nye-bob", "e2e-shared", "e2e-lab"}
    assert _granted(portal, "nye-alice/hello", bob) == set()
    # a forged form without the CSRF token is refused even for Bob's own project
    r = c.post("/projects", data={"name": "e2e-forged"})
    assert r.status_code == 403
    # nothing of Alice's changed
    assert portal.api("GET", "/api/repositories/nye-alice/hello/tags", auth=alice).json()[0]["digest"] == digest
    toks = {t["name"]: t["state"] for t in portal.api("GET", "/api/tokens", auth=alice).json()}
    assert toks["deploy"] == "active" and toks["keep"] == "active" and "evil" not in toks
    members = portal.api("GET", "/api/projects/e2e-private/members", auth=alice).json()
    assert [m["name"] for m in members] == [users["alice"].name]


def test_login_rate_limit_and_csrf(portal: Site) -> None:
    with httpx.Client(base_url=portal.server, timeout=30) as c:
        form = c.get("/login").text
        tok = re.search(r'name="csrf" value="([^"]+)"', form)
        assert tok
        codes = [c.post("/login", data={"username": "nye-ratelimited", "password": "x", "csrf": tok.group(1)})
                 .status_code for _ in range(6)]
        assert codes == [401] * 5 + [429]
        # a login form posted from elsewhere (no matching cookie) is refused
        with httpx.Client(base_url=portal.server, timeout=30) as other:
            assert other.post("/login", data={"username": "x", "password": "y", "csrf": "z"}).status_code == 400


def test_admin_audit_and_export(as_user: Any, users: dict[str, SiteUser]) -> None:
    p: Portal = as_user(users["admin"])
    page = p.page
    page.click("text=Admin")
    page.wait_for_url("**/admin/users")
    text = page.inner_text("main table")
    assert users["alice"].name in text and users["bob"].name in text
    assert "e2e-shared" in page.inner_text("main") and "KiB" in page.inner_text("main")
    p.shot("11-admin-users")
    page.click("text=Audit trail")
    page.wait_for_url("**/admin/audit")
    text = page.inner_text("main")
    assert "registry.push" in text and "login" in text and "token.create" in text
    p.shot("12-admin-audit")
    page.fill("input[name=action]", "token.")
    page.click("text=Filter")
    page.wait_for_url(re.compile(r".*/admin/audit\?.*"))
    actions = {x.strip() for x in page.locator("main table tbody td:nth-child(2)").all_inner_texts()}
    assert actions and actions <= {"token.create", "token.rotate", "token.revoke"}
    with page.expect_download() as dl:
        page.click("#export-csv")
    assert dl.value.suggested_filename == "nagaya-audit.csv"
    rows = list(csv.DictReader(io.StringIO(open(dl.value.path()).read())))
    assert rows and {r["action"] for r in rows} <= {"token.create", "token.rotate", "token.revoke"}
    assert any(r["actor"] == users["alice"].name and "nye-alice" in r["details"] for r in rows)
    page.goto("/admin/jobs")
    p.shot("13-admin-jobs")
    # the admin pages are the admin's only
    alice: Portal = as_user(users["alice"])
    with alice.client() as c:
        for url in ("/admin/users", "/admin/audit", "/admin/audit.csv", "/admin/jobs"):
            assert c.get(url).status_code == 403, url


def test_job_submit_watch_cancel(as_user: Any, portal: Site, users: dict[str, SiteUser], job_service: Path) -> None:
    p: Portal = as_user(users["alice"])
    page = p.page
    page.goto("/jobs")
    page.select_option("select[name=image]", f"{portal.registry}/nye-alice/hello:1")
    ticker = "i=0; while [ $i -lt 120 ]; do echo tick $i; i=$((i+1)); sleep 1; done"
    page.fill("input[name=command]", f"/bin/busybox sh -c 'echo started; {ticker}'")
    page.fill("input[name=name]", "e2e-ticker")
    page.fill("input[name=time_limit]", "5:00")
    page.click("text=Submit job")
    page.wait_for_url(re.compile(r".*/jobs/\d+$"), timeout=120000)
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#log:has-text('tick 2')", timeout=120000)     # the live log, polled by htmx
    assert "RUNNING" in page.inner_text("#job-state")
    p.shot("14-job-running")
    # its CPU and memory over time: sampled every few seconds as Alice, charted as SVG when the page loads
    tok = api_login(portal, users["alice"])
    deadline = time.monotonic() + 60
    while len(portal.api("GET", f"/api/jobs/{job_id}/usage", auth=tok).json()) < 2:
        assert time.monotonic() < deadline, "no usage samples"
        time.sleep(1)
    page.reload()
    # attached, not "visible": a flat line (steady memory) has no height
    page.wait_for_selector("svg[aria-label='CPU (cores in use) over time'] polyline", state="attached", timeout=30000)
    page.wait_for_selector("svg[aria-label='Memory (resident) over time'] polyline", state="attached", timeout=30000)
    page.wait_for_selector("#job-state:has-text('RUNNING')", timeout=30000)
    p.shot("14b-job-usage")
    page.on("dialog", lambda d: d.accept())
    page.click("text=Cancel job")
    page.wait_for_selector("#job-state:has-text('CANCELLED')", timeout=60000)
    p.shot("15-job-cancelled")
    page.goto("/jobs")
    assert "e2e-ticker" in page.inner_text("main table")
    # the job ran as Alice, not as the service account or root
    ps = users["alice"].u.run(["cat", str(users["alice"].u.home / ".local/share/nagaya/jobs/logs" / f"{job_id}.out")])
    assert "tick 2" in ps.stdout
    # the JSON API: the same jobs, the same owner
    alice_tok = api_login(portal, users["alice"])
    r = portal.api("GET", "/api/jobs", auth=alice_tok)
    assert r.status_code == 200 and job_id in {j["id"] for j in r.json()}
    r = portal.api("POST", "/api/jobs", auth=alice_tok, json={
        "image": f"{portal.registry}/nye-alice/hello:1", "command": ["/bin/busybox", "sleep", "300"],
        "name": "e2e-api"})
    assert r.status_code == 201, r.text
    api_job = r.json()["id"]
    assert portal.api("GET", f"/api/jobs/{api_job}", auth=alice_tok).json()["name"] == "e2e-api"
    assert "log" in portal.api("GET", f"/api/jobs/{api_job}/log", auth=alice_tok).json()
    bob_tok = api_login(portal, users["bob"])
    for method, url in (("GET", f"/api/jobs/{api_job}"), ("GET", f"/api/jobs/{api_job}/log"),
                        ("GET", f"/api/jobs/{api_job}/usage"), ("DELETE", f"/api/jobs/{api_job}")):
        assert portal.api(method, url, auth=bob_tok).status_code in (403, 404), url
    assert api_job not in {j["id"] for j in portal.api("GET", "/api/jobs", auth=bob_tok).json()}
    r = portal.api("POST", "/api/jobs", auth=bob_tok, json={
        "image": f"{portal.registry}/nye-alice/hello:1", "command": ["true"]})
    assert r.status_code == 404                                    # not an image Bob may use
    assert portal.api("DELETE", f"/api/jobs/{api_job}", auth=alice_tok).status_code == 200
    deadline = time.monotonic() + 60                               # a running job ends when its watcher acts
    while portal.api("GET", f"/api/jobs/{api_job}", auth=alice_tok).json()["state"] != "CANCELLED":
        assert time.monotonic() < deadline, "the job was not cancelled"
        time.sleep(0.2)
    # Bob has no job of that id: 404 on the page, the log and the cancel
    bob: Portal = as_user(users["bob"])
    with bob.client() as c:
        csrf = bob.csrf()
        for method, url in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/log"),
                            ("POST", f"/jobs/{job_id}/cancel")):
            r = c.request(method, url, data={"csrf": csrf} if method == "POST" else None)
            assert r.status_code in (403, 404), (url, r.status_code)
