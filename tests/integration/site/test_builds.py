"""Builds from the browser and the API (server/builds.py), end to end on a real site as unprivileged users: a
Dockerfile and its context uploaded, built as a batch job AS THE USER (rootless buildah through the root
dispatcher and the user's own local backend), its log followed, the image pushed to the user's project and run;
a rebuild repeats the kept context; a git URL served over http by the test is built at its commit; the portal's
Build page (CSRF, Rebuild on the image page); another user sees none of it (404); limits hold."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import pwd
import re
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.users import User
from tests.integration.site.conftest import Site, SiteUser, site_down, site_up
from tests.security.helpers import portal

pytestmark = pytest.mark.integration

BUILD_TIMEOUT = 900
DOCKERFILE = """\
FROM scratch
ARG GREETING=unset
COPY busybox /bin/busybox
COPY hello.txt /hello.txt
RUN ["/bin/busybox", "sh", "-c", "echo $GREETING > /greeting"]
CMD ["/bin/busybox", "cat", "/hello.txt", "/greeting"]
"""
SLOW = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sleep", "600"]
"""
BUSYBOX = Path("/bin/busybox").read_bytes()


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-3000:]}\n{r.stdout[-1000:]}"
    return r


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a: Any) -> None:
        pass


@pytest.fixture(scope="module")
def git_server(base_dir: Path) -> Iterator[tuple[str, Path]]:
    """A bare git repository served over plain http ("dumb" protocol) on 127.0.0.1: the site allows this host."""
    root = base_dir / "git-http"
    work = base_dir / "git-work"
    root.mkdir()
    work.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(base_dir)}
    (work / "Dockerfile").write_text(DOCKERFILE)
    (work / "hello.txt").write_text("hello from git\n")
    (work / "busybox").write_bytes(BUSYBOX)
    (work / "busybox").chmod(0o755)
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "one"]):
        ok(subprocess.run(["git", *args], cwd=work, env=env, capture_output=True, text=True))
    ok(subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "repo.git")], env=env,
                      capture_output=True, text=True))
    ok(subprocess.run(["git", "update-server-info"], cwd=root / "repo.git", env=env, capture_output=True, text=True))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}", work
    srv.shutdown()


@pytest.fixture(scope="module")
def bsite(site_system: None, base_dir: Path, git_server: tuple[str, Path]) -> Iterator[Site]:
    """A site of this module's own: git builds from the test's http server, 4 MiB uploads, one build at a time."""
    s = site_up(base_dir / "bstate", env={"NAGAYA_BUILDS_GIT_HOSTS": git_server[0], "NAGAYA_BUILDS_GIT_SCHEMES": "http",
                                           "NAGAYA_BUILDS_UPLOAD_MAX": "4MiB", "NAGAYA_BUILDS_MAX_RUNNING": "1"})
    yield s
    site_down(s.state_dir)


def _user(name: str, subid: int) -> SiteUser:
    """A test user with subordinate ids (rootless buildah needs them) and a password for the portal."""
    u = User.ensure(name, subid)
    pw = f"pw-{name}-{os.getpid()}"
    subprocess.run(["chpasswd"], input=f"{name}:{pw}\n", text=True, check=True)
    subprocess.run(["rm", "-rf", str(u.home / ".config" / "nagaya"), str(u.home / ".local" / "share" / "nagaya")],
                   check=True)
    return SiteUser(u, pw)


@pytest.fixture(scope="module")
def people(bsite: Site) -> dict[str, SiteUser]:
    out = {"alice": _user("nyb-alice", 1_910_000), "bob": _user("nyb-bob", 1_920_000)}
    for u in out.values():
        u.login(bsite.server)
    return out


def api(site: Site, who: SiteUser, method: str, path: str, **kw: Any) -> httpx.Response:
    return site.api(method, path, auth=who.creds(site.registry), **kw)


def context_files(hello: str = "hello from an upload\n", dockerfile: str = DOCKERFILE) -> list[tuple[str, Any]]:
    return [("context", ("Dockerfile", dockerfile.encode())), ("context", ("hello.txt", hello.encode())),
            ("context", ("busybox", BUSYBOX))]


def wait_build(site: Site, who: SiteUser, bid: str) -> dict[str, Any]:
    deadline = time.monotonic() + BUILD_TIMEOUT
    while True:
        r = api(site, who, "GET", f"/api/builds/{bid}")
        assert r.status_code == 200, r.text
        b = r.json()
        if not b["active"]:
            return b
        assert time.monotonic() < deadline, f"the build never ended: {b}"
        time.sleep(2)


def log_of(site: Site, who: SiteUser, bid: str) -> str:
    r = api(site, who, "GET", f"/api/builds/{bid}/log")
    assert r.status_code == 200, r.text
    return str(r.json()["log"])


def uploads_left(site: Site) -> list[str]:
    return os.listdir(f"{site.state_dir}-builds")


def test_upload_build_runs_as_the_user_pushes_and_rebuilds(bsite: Site, people: dict[str, SiteUser]) -> None:
    alice, bob = people["alice"], people["bob"]
    tag = f"{bsite.registry}/{alice.name}/hello:1"
    r = api(bsite, alice, "POST", "/api/builds", files=context_files(),
            data={"tag": tag, "build_args": "GREETING=hi there"})
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["source"] == "upload" and re.fullmatch(r"[0-9a-f]{64}", b["sha256"]) and b["job"]
    assert uploads_left(bsite) == []                   # the server's copy is gone once the user's side has it
    done = wait_build(bsite, alice, b["id"])
    log = log_of(bsite, alice, b["id"])
    assert done["state"] == "COMPLETED", log[-3000:]
    uid = pwd.getpwnam(alice.name).pw_uid
    assert f"as {alice.name} (uid {uid})" in log and "STEP" in log
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", done["digest"])
    # The build directory is alice's own, private; the push token is gone, the context kept for rebuilds.
    d = alice.u.home / ".local" / "share" / "nagaya" / "builds" / b["id"]
    st = d.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (uid, 0o700)
    assert sorted(os.listdir(d)) == ["context.tar", "recipe.json"]
    # The image is in alice's project, pullable and runnable by her.
    run = ok(alice.nagaya("run", tag, timeout=300))
    assert run.stdout.splitlines() == ["hello from an upload", "hi there"]
    tags = api(bsite, alice, "GET", f"/api/repositories/{alice.name}/hello/tags")
    assert tags.status_code == 200 and done["digest"] in tags.text

    # Bob sees none of it: every door answers like a missing build.
    for method, path in (("GET", f"/api/builds/{b['id']}"), ("GET", f"/api/builds/{b['id']}/log"),
                         ("POST", f"/api/builds/{b['id']}/rebuild"), ("DELETE", f"/api/builds/{b['id']}")):
        assert api(bsite, bob, method, path).status_code == 404, (method, path)
    assert api(bsite, bob, "GET", "/api/builds").json() == []

    # A rebuild repeats the kept context (same digest of the context), as a new build of alice's.
    r = api(bsite, alice, "POST", f"/api/builds/{b['id']}/rebuild")
    assert r.status_code == 201, r.text
    again = r.json()
    assert again["rebuild_of"] == b["id"] and again["sha256"] == b["sha256"]
    assert again["build_args"] == ["GREETING=hi there"]
    done2 = wait_build(bsite, alice, again["id"])
    assert done2["state"] == "COMPLETED", log_of(bsite, alice, again["id"])[-3000:]
    assert done2["digest"] == done["digest"]            # the same inputs, from alice's layer cache


def test_push_rights_are_checked_before_anything_runs(bsite: Site, people: dict[str, SiteUser]) -> None:
    alice, bob = people["alice"], people["bob"]
    r = api(bsite, bob, "POST", "/api/builds", files=context_files(),
            data={"tag": f"{bsite.registry}/{alice.name}/stolen:1"})
    assert r.status_code == 403, r.text
    assert uploads_left(bsite) == []
    assert api(bsite, bob, "GET", "/api/builds").json() == []
    # Another registry, a digest, no context: refused with one line.
    for data in ({"tag": f"elsewhere.example:5000/{bob.name}/x:1"}, {"tag": f"{bsite.registry}/{bob.name}/x@sha256:"
                                                                              + "0" * 64}):
        assert api(bsite, bob, "POST", "/api/builds", files=context_files(), data=data).status_code == 400
    assert api(bsite, bob, "POST", "/api/builds", data={"tag": f"{bsite.registry}/{bob.name}/x:1"},
               files={"none": ("x", b"")}).status_code == 400


def test_git_build_at_its_commit(bsite: Site, people: dict[str, SiteUser], git_server: tuple[str, Path]) -> None:
    alice = people["alice"]
    host, work = git_server
    head = ok(subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True)).stdout.strip()
    tag = f"{bsite.registry}/{alice.name}/fromgit:1"
    r = api(bsite, alice, "POST", "/api/builds", data={"tag": tag, "git_url": f"http://{host}/repo.git",
                                                        "git_ref": "main"})
    assert r.status_code == 201, r.text
    b = wait_build(bsite, alice, r.json()["id"])
    assert b["state"] == "COMPLETED", log_of(bsite, alice, b["id"])[-3000:]
    assert b["git_commit"] == head and b["source"] == "git"
    assert ok(alice.nagaya("run", tag, timeout=300)).stdout.splitlines() == ["hello from git", "unset"]
    # main moves on; a rebuild still builds the recorded commit (and says so), not the branch's new head.
    bare = work.parent / "git-http" / "repo.git"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(work.parent)}
    (work / "hello.txt").write_text("a later commit\n")
    for args, cwd in ((["commit", "-q", "-am", "two"], work), (["push", "-q", str(bare), "main"], work),
                      (["update-server-info"], bare)):
        ok(subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True))
    subprocess.run(["chmod", "-R", "a+rX", str(bare)], check=True)
    r = api(bsite, alice, "POST", f"/api/builds/{b['id']}/rebuild")
    assert r.status_code == 201, r.text
    again = wait_build(bsite, alice, r.json()["id"])
    assert again["state"] == "COMPLETED" and again["git_commit"] == head, log_of(bsite, alice, again["id"])[-3000:]
    assert f"at {head}" in log_of(bsite, alice, again["id"])
    assert ok(alice.nagaya("run", tag, timeout=300)).stdout.splitlines() == ["hello from git", "unset"]
    r = api(bsite, alice, "POST", "/api/builds", data={"tag": tag, "git_url": f"http://{host}/repo.git"})
    fresh = wait_build(bsite, alice, r.json()["id"])                 # a new build: the default branch as it is now
    assert fresh["state"] == "COMPLETED" and fresh["git_commit"] not in ("", head)
    assert ok(alice.nagaya("run", tag, timeout=300)).stdout.splitlines() == ["a later commit", "unset"]
    # Only the site's schemes and hosts: file://, ssh, another host or port, credentials in the URL.
    for url in ("file:///etc/passwd", f"ssh://{host}/repo.git", "http://10.0.0.1/repo.git",
                f"http://u:p@{host}/repo.git", "ext::sh -c touch% /tmp/x", f"-uhttp://{host}/repo.git",
                f"https://{host}/repo.git"):
        r = api(bsite, alice, "POST", "/api/builds", data={"tag": tag, "git_url": url})
        assert r.status_code == 400, (url, r.text)


def test_limits_cancel_and_hostile_archives(bsite: Site, people: dict[str, SiteUser]) -> None:
    alice = people["alice"]
    tag = f"{bsite.registry}/{alice.name}/slow:1"
    # Over the site's 4 MiB upload limit: refused before it is read.
    big = [("context", ("big.bin", b"\0" * (6 << 20))), ("context", ("Dockerfile", b"FROM scratch\n"))]
    r = api(bsite, alice, "POST", "/api/builds", files=big, data={"tag": tag})
    assert r.status_code == 400 and "limit" in r.text
    assert uploads_left(bsite) == []
    # One build at a time on this site: the second waits for the first to end (409), cancel ends it.
    r = api(bsite, alice, "POST", "/api/builds", files=context_files(dockerfile=SLOW), data={"tag": tag})
    assert r.status_code == 201, r.text
    slow = r.json()
    r2 = api(bsite, alice, "POST", "/api/builds", files=context_files(), data={"tag": tag})
    assert r2.status_code == 409, r2.text
    assert api(bsite, alice, "DELETE", f"/api/builds/{slow['id']}").json()["state"] == "CANCELLED"
    deadline = time.monotonic() + 120
    while any(slow["id"] in p for p in alice.u.processes()):
        assert time.monotonic() < deadline, alice.u.processes()
        time.sleep(1)
    # An upload a dead server process left behind (an hour old) goes with the next upload.
    stale = Path(f"{bsite.state_dir}-builds") / ("f" * 32 + ".ctx")
    stale.write_bytes(b"left behind")
    os.chown(stale, pwd.getpwnam("nagaya").pw_uid, -1)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    # A context with a path outside it, a link, a device: the job (as alice) refuses to unpack it.
    for member in (tarfile.TarInfo("../../escaped"), _link("Dockerfile", "/etc/shadow"), _dev("dev")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            t.addfile(member, io.BytesIO(b"") if member.isreg() else None)
        r = api(bsite, alice, "POST", "/api/builds", files=[("context", ("ctx.tar", buf.getvalue()))],
                data={"tag": tag})
        assert r.status_code == 201, r.text
        bad = wait_build(bsite, alice, r.json()["id"])
        log = log_of(bsite, alice, bad["id"])
        assert bad["state"] == "FAILED", log
        assert "inside the build context" in log or "only files and directories" in log, log
    assert not (alice.u.home / ".local" / "share" / "nagaya" / "escaped").exists()
    assert not stale.exists() and uploads_left(bsite) == []


def _link(name: str, target: str) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.linkname = tarfile.SYMTYPE, target
    return t


def _dev(name: str) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.devmajor, t.devminor = tarfile.CHRTYPE, 1, 3
    return t


def test_build_page_rebuild_button_and_csrf(bsite: Site, people: dict[str, SiteUser]) -> None:
    alice, bob = people["alice"], people["bob"]
    c, _ = portal(bsite, alice.name, alice.password)
    page = c.get("/builds")
    assert page.status_code == 200 and 'enctype="multipart/form-data"' in page.text
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token
    tag = f"{bsite.registry}/{alice.name}/paged:1"
    files = context_files(hello="hello from the page\n")
    assert c.post("/builds", files=files, data={"tag": tag}).status_code == 403          # no CSRF token
    r = c.post("/builds", files=files, data={"tag": tag, "csrf": token.group(1)})
    assert r.status_code == 303, r.text
    bid = r.headers["location"].rsplit("/", 1)[-1]
    assert c.get(f"/builds/{bid}").status_code == 200
    b = wait_build(bsite, alice, bid)
    assert b["state"] == "COMPLETED", log_of(bsite, alice, bid)[-3000:]
    frag = c.get(f"/builds/{bid}/log")
    assert frag.status_code == 200 and "STEP" in frag.text and b["digest"] in frag.text
    # The image page offers Rebuild (loaded from /builds/of-image), which repeats this build.
    img = c.get(f"/images/{alice.name}/paged")
    assert img.status_code == 200 and "/builds/of-image?repository=" in img.text
    button = c.get("/builds/of-image", params={"repository": f"{alice.name}/paged", "tag": "1"})
    assert f'action="/builds/{bid}/rebuild"' in button.text
    r = c.post(f"/builds/{bid}/rebuild", data={"csrf": token.group(1)})
    assert r.status_code == 303, r.text
    again = r.headers["location"].rsplit("/", 1)[-1]
    assert wait_build(bsite, alice, again)["state"] == "COMPLETED"
    # Bob's browser: 404 on alice's build pages, no button on her image.
    o, _ = portal(bsite, bob.name, bob.password)
    assert o.get(f"/builds/{bid}").status_code == 404
    assert o.get(f"/builds/{bid}/log").status_code == 404
    bob_token = re.search(r'name="csrf" value="([^"]+)"', o.get("/builds").text)
    assert bob_token and o.post(f"/builds/{bid}/rebuild", data={"csrf": bob_token.group(1)}).status_code == 404
    assert o.post(f"/builds/{bid}/cancel", data={"csrf": bob_token.group(1)}).status_code == 404
    assert "rebuild" not in o.get("/builds/of-image", params={"repository": f"{alice.name}/paged", "tag": "1"}).text


def test_cli_submit_is_the_same_operation(bsite: Site, people: dict[str, SiteUser], base_dir: Path) -> None:
    """`nagaya build DIR -t TAG --submit`: the context packed and sent to /api/builds, built by the site as the user."""
    alice = people["alice"]
    ctx = base_dir / "cli-ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "hello.txt").write_text("hello from the CLI\n")
    (ctx / "busybox").write_bytes(BUSYBOX)
    (ctx / "busybox").chmod(0o755)
    subprocess.run(["chown", "-R", f"{alice.u.uid}:{alice.u.gid}", str(ctx)], check=True)
    tag = f"{bsite.registry}/{alice.name}/cli:1"
    r = ok(alice.nagaya("build", str(ctx), "-t", tag, "--submit", "--json"))
    out = json.loads(r.stdout)
    assert out["via"] == "api" and out["url"].endswith(f"/builds/{out['id']}")
    done = wait_build(bsite, alice, out["id"])
    assert done["state"] == "COMPLETED", log_of(bsite, alice, out["id"])[-3000:]
    assert ok(alice.nagaya("run", tag, timeout=300)).stdout.splitlines() == ["hello from the CLI", "unset"]
    # A link in the context is refused here, before anything is sent.
    (ctx / "ln").symlink_to("/etc/passwd")
    bad = alice.nagaya("build", str(ctx), "-t", tag, "--submit")
    assert bad.returncode != 0 and "no links" in bad.stderr


def test_definition_file_from_a_site_image(bsite: Site, people: dict[str, SiteUser]) -> None:
    """An Apptainer definition file whose base is one of the user's images on the site: the build job pulls it
    with the build's own token (the user's rights), and pushes the result."""
    alice = people["alice"]
    base = f"{bsite.registry}/{alice.name}/base:1"
    shell = 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "ln", "-s", "busybox", "/bin/sh"]\n'
    r = api(bsite, alice, "POST", "/api/builds", files=context_files(dockerfile=shell), data={"tag": base})
    assert r.status_code == 201, r.text
    assert wait_build(bsite, alice, r.json()["id"])["state"] == "COMPLETED"
    deffile = (f"Bootstrap: docker\nFrom: {base}\n\n%files\n    note.txt /note.txt\n\n"
               "%post\n    /bin/busybox echo post ran > /post.txt\n\n"
               "%runscript\n    /bin/busybox cat /note.txt /post.txt\n")
    tag = f"{bsite.registry}/{alice.name}/fromdef:1"
    r = api(bsite, alice, "POST", "/api/builds", data={"tag": tag, "file": "app.def"},
            files=[("context", ("app.def", deffile.encode())), ("context", ("note.txt", b"a note\n"))])
    assert r.status_code == 201, r.text
    b = wait_build(bsite, alice, r.json()["id"])
    assert b["state"] == "COMPLETED" and b["file"] == "app.def", log_of(bsite, alice, b["id"])[-3000:]
    assert ok(alice.nagaya("run", tag, timeout=300)).stdout.splitlines() == ["a note", "post ran"]
    # Bob's build cannot pull Alice's private image: the build's token carries Bob's rights, nobody else's.
    bob = people["bob"]
    steal = f"FROM {base}\nRUN [\"/bin/busybox\", \"true\"]\n"
    r = api(bsite, bob, "POST", "/api/builds", data={"tag": f"{bsite.registry}/{bob.name}/stolen:1"},
            files=[("context", ("Dockerfile", steal.encode()))])
    assert r.status_code == 201, r.text
    b = wait_build(bsite, bob, r.json()["id"])
    log = log_of(bsite, bob, b["id"])
    assert b["state"] == "FAILED" and not b["digest"], log[-3000:]
    assert "not found or access denied" in log or "denied" in log.lower(), log[-3000:]
