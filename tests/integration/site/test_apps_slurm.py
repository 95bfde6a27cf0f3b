"""The portal's apps and builds on a multi-node Slurm, end to end: a site started by `nagaya site up` with
SLURM_CONF in its environment (the test cluster's slurm.conf is not in the default place: the root dispatcher
passes exactly that on to each user's operations), its users' backend `slurm` in their own config.

Alice starts a web app session through /api/sessions; its job lands on a node of the cluster (each node has its
own network and UTS namespaces, none is the server's host), and her portal login reaches the app through the
portal's authenticated proxy (/sessions/ID/app/...), over a relay the dispatcher runs as Alice through the
scheduler. Bob's login, and no login, get the same answer as a missing session."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.helpers import images
from tests.helpers.slurm import SlurmCluster
from tests.integration.site.conftest import Site, SiteUser, indexed, module_people, push, site_down, site_up

pytestmark = pytest.mark.integration

PYTHON = Path("/usr/bin/python3.11")          # Debian's: its ld.so paths are the image's too
START_TIMEOUT = 240

# The web app: HTTP on $NAGAYA_APP_SOCKET with nothing but os, socket and sys (the image's Python is minimal).
APP = """import os, socket, sys
path = os.environ["NAGAYA_APP_SOCKET"]
s = socket.socket(socket.AF_UNIX); s.bind(path); os.chmod(path, 0o660); s.listen(16)
while True:
    c, _ = s.accept()
    req = b""
    while b"\\r\\n\\r\\n" not in req:
        chunk = c.recv(4096)
        if not chunk:
            break
        req += chunk
    line = req.split(b"\\r\\n", 1)[0].decode(errors="replace")
    body = ("app of uid %d on %s answers %s" % (os.getuid(), os.uname().nodename, line)).encode()
    c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
    c.close()
"""


def python_image(dest: Path) -> Path:
    """busybox (for the launcher's /bin/sh) and Debian's Python with the top of its standard library."""
    root = images.busybox_rootfs(dest / "rootfs")
    out = subprocess.run(["ldd", str(PYTHON)], capture_output=True, text=True, check=True).stdout
    libs = re.findall(r"(/\S+\.so[.\d]*)", out)
    for f in [str(PYTHON), *libs]:
        target = root / f.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(f), target)
    (root / "usr/bin/python3").symlink_to("python3.11")
    src, lib = Path("/usr/lib/python3.11"), root / "usr/lib/python3.11"
    lib.mkdir(parents=True)
    for f in src.glob("*.py"):
        shutil.copy2(f, lib / f.name)
    for pkg in ("encodings", "collections", "importlib"):
        shutil.copytree(src / pkg, lib / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))
    layout = images.oci_layout(dest / "layout", [images.dir_tar(root)],
                               {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})
    out_tar = images.oci_archive(layout, dest / "py.tar")
    out_tar.chmod(0o644)
    return out_tar


@pytest.fixture(scope="module")
def cluster(site_system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "srun", "sbatch"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    require(PYTHON.exists(), "Debian's python3.11 is not installed")
    c = SlurmCluster(nodes=2, netns=True).start()
    yield c
    c.stop()


@contextlib.contextmanager
def slurm_site(cluster: SlurmCluster) -> Iterator[tuple[Site, Path]]:
    """A site whose `site up` alone was given the cluster's SLURM_CONF (its users' environments have none),
    and a scratch directory beside it; both gone afterwards."""
    top = Path(tempfile.mkdtemp(prefix="nagaya-slurm-site-"))
    top.chmod(0o755)
    site = site_up(top / "state", env=cluster.env)
    try:
        yield site, top
    finally:
        site_down(site.state_dir)
        shutil.rmtree(top, ignore_errors=True)


def use_slurm(u: SiteUser) -> None:
    """The user's own config: their jobs go to Slurm (the dispatcher runs each operation with it)."""
    conf = u.u.home / ".config" / "nagaya"
    u.u.run(["sh", "-c", f"mkdir -p {conf} && printf '[sched]\\nbackend = \"slurm\"\\n' >> {conf}/nagaya.toml"],
            check=True)


@pytest.fixture(scope="module")
def world(cluster: SlurmCluster) -> Iterator[dict[str, Any]]:
    with slurm_site(cluster) as (site, top):
        people = module_people(site, "asl", ("alice", "bob"))
        for u in people.values():
            use_slurm(u)
        alice = people["alice"]
        creds = {k: u.creds(site.registry) for k, u in people.items()}
        ref = f"{site.registry}/{alice.name}/py:1"
        r = push(alice, python_image(top), ref, creds["alice"])
        assert r.returncode == 0, r.stderr
        indexed(site, alice, f"{alice.name}/py", "1")          # a session names the tag: the index must have it
        app = alice.u.home / "slurm_web_app.py"
        app.write_text(APP)
        os.chown(app, alice.u.uid, alice.u.gid)
        yield {"site": site, "people": people, "creds": creds, "image": ref, "app": app}


@contextlib.contextmanager
def browser_login(site: Site, u: SiteUser) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=site.server, timeout=60, follow_redirects=False) as c:
        _login(c, u)
        yield c


def _login(c: httpx.Client, u: SiteUser) -> None:
    form = c.get("/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf, form[:2000]
    r = c.post("/login", data={"username": u.name, "password": u.password, "csrf": csrf.group(1)})
    assert r.status_code in (302, 303) and "error" not in r.headers.get("location", ""), r.text[:500]


def server_log(site: Site) -> str:
    return "\n".join((site.state_dir / "logs" / f"{n}.log").read_text(errors="replace")[-2000:]
                     for n in ("server", "jobs") if (site.state_dir / "logs" / f"{n}.log").exists())


def test_a_web_app_on_another_node_through_the_portals_proxy(cluster: SlurmCluster, world: dict[str, Any]) -> None:
    site, creds, alice = world["site"], world["creds"], world["people"]["alice"]
    r = site.api("POST", "/api/sessions", auth=creds["alice"], json={
        "kind": "web", "image": world["image"], "command": ["python3", "-I", "-S", str(world["app"])]})
    assert r.status_code == 201, r.text + server_log(site)
    sid = str(r.json()["id"])
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            mine = {x["id"]: x for x in site.api("GET", "/api/sessions", auth=creds["alice"]).json()}
            rec = mine[sid]
            if rec["state"] == "RUNNING" and rec["node"]:
                break
            assert not rec.get("ended") and time.monotonic() < deadline, f"{rec}\n{server_log(site)}"
            time.sleep(1)
        node = rec["node"]
        # Slurm's node, in its own namespaces: never the server's host, so the proxy needs the relay.
        assert node in cluster.nodes and node != socket.gethostname(), rec
        with browser_login(site, alice) as c:
            deadline = time.monotonic() + START_TIMEOUT
            while (got := c.get(f"/sessions/{sid}/app/hello?x=1")).status_code != 200:
                assert got.status_code in (502, 503, 504) and time.monotonic() < deadline, \
                    f"{got.status_code} {got.text[:500]}\n{server_log(site)}"
                time.sleep(1)
            want = f"app of uid {alice.u.uid} on {node} answers GET "
            assert got.text.startswith(want) and "/hello?x=1" in got.text, got.text
            # The app sees the path under its session, as the proxy forwards it.
            for _ in range(3):                                   # each request a fresh relay, one use each
                assert c.get(f"/sessions/{sid}/app/again").text.startswith(want)
        # Bob's login and no login: the answer of a missing session.
        with browser_login(site, world["people"]["bob"]) as c:
            assert c.get(f"/sessions/{sid}/app/hello").status_code == 404
            assert c.get(f"/sessions/{'0' * 32}/app/hello").status_code == 404
        with httpx.Client(base_url=site.server, timeout=30) as anon:
            assert anon.get(f"/sessions/{sid}/app/hello").status_code in (303, 401, 404)
        assert site.api("DELETE", f"/api/sessions/{sid}", auth=creds["bob"]).status_code == 404
    finally:
        r = site.api("DELETE", f"/api/sessions/{sid}", auth=creds["alice"])
        assert r.status_code == 200, r.text
    # Its job ends: nothing of Alice's is left on the cluster.
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-u", alice.name], capture_output=True, text=True,
                         env={**os.environ, **cluster.env}).stdout.strip():
        assert time.monotonic() < deadline, "the session's job was not cancelled"
        time.sleep(1)
