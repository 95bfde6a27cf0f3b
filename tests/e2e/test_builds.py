"""Builds from the browser, end to end in headless Chromium on the local backend: Alice picks a Dockerfile and its
files on the Build page, the build runs as a batch job as her (her uid in the log), the log follows live, the image
lands in her project and runs; "Rebuild" on the image page repeats it; Bob's browser gets 404 for her build."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SHOTS, wait_indexed
from tests.helpers.users import User
from tests.integration.site.conftest import Site, SiteUser

BUILD_TIMEOUT = 900
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY hello.txt /hello.txt
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox echo built in the browser > /made"]
CMD ["/bin/busybox", "cat", "/hello.txt", "/made"]
"""


@pytest.fixture(scope="module")
def files(e2e_dir: Path, users: dict[str, SiteUser]) -> list[str]:
    """The files Alice picks in the file chooser; her subordinate ids, which rootless buildah needs."""
    User.ensure(users["alice"].name, 1_940_000)
    d = e2e_dir / "build-files"
    d.mkdir(exist_ok=True)
    (d / "Dockerfile").write_text(DOCKERFILE)
    (d / "hello.txt").write_text("hello from the Build page\n")
    (d / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    return [str(d / n) for n in ("Dockerfile", "hello.txt", "busybox")]


def wait_done(ui: Any, bid: str) -> str:
    deadline = time.monotonic() + BUILD_TIMEOUT
    while True:
        state = ui.page.locator("#build-state").inner_text()
        if not any(s in state for s in ("PENDING", "RUNNING", "SUBMITTING")):
            return state
        assert time.monotonic() < deadline, ui.page.locator("#log").inner_text()[-3000:]
        time.sleep(2)


def test_build_in_the_browser_as_the_user(as_user: Any, portal: Site, users: dict[str, SiteUser],
                                          world: dict[str, Any], files: list[str]) -> None:
    alice, bob = users["alice"], users["bob"]
    tag = f"{portal.registry}/{alice.name}/browserbuilt:1"
    ui = as_user(alice)
    ui.page.goto("/builds")
    ui.page.fill("#build-form input[name=tag]", tag)
    ui.page.set_input_files("#build-form input[name=context]", files)
    ui.page.click("#build-form button[type=submit]")
    ui.page.wait_for_url("**/builds/*")
    bid = ui.page.url.rsplit("/", 1)[-1]
    ui.page.wait_for_selector("#build-state")
    state = wait_done(ui, bid)
    log = ui.page.locator("#log").inner_text()
    ui.shot("build-done")
    assert "COMPLETED" in state, log[-3000:]
    uid = pwd.getpwnam(alice.name).pw_uid
    assert f"as {alice.name} (uid {uid})" in log and "STEP 1/" in log
    digest = ui.page.locator("#build-digest").inner_text()
    assert digest.startswith("sha256:")
    wait_indexed(portal, world["creds"]["alice"], f"{alice.name}/browserbuilt")
    # Her image runs, as pushed by the build.
    alice.login(portal.server)
    r = alice.nagaya("run", tag, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["hello from the Build page", "built in the browser"]

    # "Rebuild" on the image page (loaded by htmx) repeats the build from the kept context.
    ui.page.goto(f"/images/{alice.name}/browserbuilt")
    ui.page.wait_for_selector("form.rebuild button")
    ui.shot("image-rebuild")
    ui.page.click("form.rebuild button")
    ui.page.wait_for_url("**/builds/*")
    again = ui.page.url.rsplit("/", 1)[-1]
    assert again != bid
    ui.page.wait_for_selector("#build-state")
    assert "COMPLETED" in wait_done(ui, again), ui.page.locator("#log").inner_text()[-3000:]
    assert ui.page.locator("#build-digest").inner_text() == digest
    assert not ui.errors, ui.errors

    # Bob's browser: her build is a 404 like a missing one, and her list is not his.
    other = as_user(bob)
    resp = other.page.goto(f"/builds/{bid}")
    assert resp is not None and resp.status == 404
    other.page.goto("/builds")
    assert bid not in other.page.content()
    assert os.path.isdir(f"{alice.u.home}/.local/share/nagaya/builds/{bid}")
    kept = subprocess.run(["stat", "-c", "%u %a", f"{alice.u.home}/.local/share/nagaya/builds/{bid}"],
                          capture_output=True, text=True).stdout.split()
    assert kept == [str(uid), "700"]
    assert json.loads(Path(f"{alice.u.home}/.local/share/nagaya/builds/{bid}/recipe.json").read_text())["tag"] == tag
    assert (SHOTS / "build-done.png").exists()
