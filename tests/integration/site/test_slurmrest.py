"""The portal submits through slurmrestd with a JWT per user: a private Slurm 22.05 with auth/jwt, slurmrestd
as an unprivileged account, a site with `[sched] portal_submit = "slurmrestd"` and no root dispatcher.
Users log in through the API; their jobs run as their own uid, show their logs, cancel; another user can
neither see nor touch them. Run under `flock /tmp/nagaya-site.lock` and `flock /tmp/nagaya-sched.lock`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.helpers.ports import free_port
from tests.helpers.slurm import SlurmCluster
from tests.integration.site.conftest import Site, SiteUser, daemons, ensure_user, push, site_down, site_up

pytestmark = pytest.mark.integration

JWT_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/slurm-wlm/auth_jwt.so")
RESTD_USER = "nobody"           # slurmrestd refuses root and SlurmUser; it needs no rights of its own
RESTD_SOCKET: list[Path] = []


@pytest.fixture(scope="module")
def jwt_key(site_system: None) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-jwt-"))
    d.chmod(0o711)
    key = d / "jwt_hs256.key"
    key.write_bytes(os.urandom(32))
    shutil.chown(key, "nagaya", "nagaya")         # the service account's; slurmctld (root here) reads it too
    key.chmod(0o400)
    yield key
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(jwt_key: Path) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "/usr/sbin/slurmrestd", "setfacl"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    require(JWT_PLUGIN.exists(), "Slurm's auth/jwt plugin is not installed (apt-get install slurm-wlm-jwt-plugin)")
    c = SlurmCluster(nodes=2, extra_conf=f"AuthAltTypes=auth/jwt\nAuthAltParameters=jwt_key={jwt_key}\n").start()
    yield c
    c.stop()
    assert not c._stepds() - c.stepds_before, "job steps left behind"


@pytest.fixture(scope="module")
def restd(cluster: SlurmCluster) -> Iterator[str]:
    """slurmrestd on a loopback port (what the site uses) and on a unix socket (RESTD_SOCKET, for the gateway
    test)."""
    port = free_port()
    log = open(cluster.dir / "slurmrestd.log", "wb")
    sock_dir = cluster.dir / "restd"
    sock_dir.mkdir()
    shutil.chown(sock_dir, RESTD_USER)
    RESTD_SOCKET.append(sock_dir / "slurmrestd.sock")
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": str(cluster.conf), "SLURM_JWT": "daemon"}
    p = subprocess.Popen(["setpriv", f"--reuid={RESTD_USER}", "--regid=nogroup", "--clear-groups", "--",
                          "/usr/sbin/slurmrestd", "-a", "rest_auth/jwt", "-s", "openapi/v0.0.38", f"127.0.0.1:{port}",
                          f"unix:{RESTD_SOCKET[-1]}"],
                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert p.poll() is None, (cluster.dir / "slurmrestd.log").read_text()
        try:
            httpx.get(f"{url}/slurm/v0.0.38/ping", timeout=2)      # 401 without a token: it is up
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "slurmrestd did not answer"
            time.sleep(0.1)
    yield url
    os.kill(p.pid, signal.SIGTERM)
    p.wait(timeout=15)
    log.close()


@pytest.fixture(scope="module")
def rest_site(restd: str, jwt_key: Path, base_dir: Path) -> Iterator[Site]:
    s = site_up(base_dir / "rest-state", env={
        "NAGAYA_SCHED_PORTAL_SUBMIT": "slurmrestd", "NAGAYA_SCHED_SLURMRESTD_URL": restd,
        "NAGAYA_SCHED_SLURMRESTD_JWT_KEY": str(jwt_key), "NAGAYA_SCHED_NAGAYA": "/usr/local/bin/nagaya"})
    yield s
    site_down(s.state_dir)


@pytest.fixture(scope="module")
def rest_users(rest_site: Site, image_archive: Path) -> tuple[SiteUser, SiteUser]:
    one = ensure_user("nys-rest1", f"pw-rest1-{os.getpid()}")
    two = ensure_user("nys-rest2", f"pw-rest2-{os.getpid()}")
    for u in (one, two):
        shutil.rmtree(u.u.home / ".cache" / "nagaya", ignore_errors=True)    # the job's pull starts afresh
        u.login(rest_site.server)
    r = push(one, image_archive, f"{rest_site.registry}/nys-rest1/bb:1", one.creds(rest_site.registry))
    assert r.returncode == 0, r.stderr
    wait_indexed(rest_site, api_login(rest_site, one), "nys-rest1/bb")
    return one, two


def api_login(site: Site, u: SiteUser) -> tuple[str, str]:
    r = site.api("POST", "/api/login", auth=(u.name, u.password), json={"token_name": "rest-test"})
    assert r.status_code == 200, r.text
    return u.name, r.json()["token"]


def portal_login(site: Site, u: SiteUser) -> httpx.Client:
    """A portal session as a browser gets it: the login form's CSRF token, then the password."""
    c = httpx.Client(base_url=site.server, timeout=60, follow_redirects=False)
    r = c.post("/login", data={"username": u.name, "password": u.password, "csrf": csrf_of(c, "/login")})
    assert r.status_code == 303, r.text
    return c


def csrf_of(c: httpx.Client, url: str) -> str:
    r = c.get(url)
    assert r.status_code == 200, (url, r.status_code)
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert m, f"no CSRF token on {url}"
    return m.group(1)


def wait_indexed(site: Site, creds: tuple[str, str], repository: str) -> None:
    deadline = time.monotonic() + 30
    while not any(x["name"] == repository for x in site.api("GET", "/api/repositories", auth=creds).json()):
        assert time.monotonic() < deadline, f"{repository} was not indexed"
        time.sleep(0.1)


def wait_job(site: Site, creds: tuple[str, str], job: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = site.api("GET", f"/api/jobs/{job}", auth=creds)
        assert r.status_code == 200, r.text
        if r.json()["state"] in states:
            return dict(r.json())
        assert time.monotonic() < deadline, f"job {job} stayed {r.json()['state']}, not {states}"
        time.sleep(0.2)


def test_no_root_dispatcher(rest_site: Site) -> None:
    """slurmrestd submission needs no root part: `site up` started no dispatcher, only root-less daemons."""
    status = json.loads((rest_site.state_dir / "site.json").read_text()) \
        if (rest_site.state_dir / "site.json").exists() else {}
    assert "jobs" not in status.get("pids", {})
    for line in daemons(rest_site.state_dir):
        pid = int(line.split()[0])
        assert os.stat(f"/proc/{pid}").st_uid != 0, line


def test_submit_log_cancel_as_the_user(rest_site: Site, rest_users: tuple[SiteUser, SiteUser],
                                       cluster: SlurmCluster) -> None:
    one, two = rest_users
    image = f"{rest_site.registry}/nys-rest1/bb:1"
    tok1, tok2 = api_login(rest_site, one), api_login(rest_site, two)
    r = rest_site.api("POST", "/api/jobs", auth=tok1, json={
        "image": image, "command": ["/bin/busybox", "sh", "-c", "id -u; echo hello from rest; echo to stderr >&2"],
        "name": "rest-id"})
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    info = wait_job(rest_site, tok1, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = rest_site.api("GET", f"/api/jobs/{job}/log", auth=tok1).json()["log"]
    assert info["state"] == "COMPLETED", (info, log, cluster.logs())
    # it ran as nys-rest1's uid, in Slurm's records, in the container and on disk
    assert info["user"] == one.name and info["name"] == "rest-id"
    assert info["digest"].startswith("sha256:") and info["image"].endswith(f"bb@{info['digest']}")
    assert str(one.u.uid) in log.split() and "hello from rest" in log and "to stderr" in log
    out = rest_site.state_dir / "job-logs" / one.name / f"slurm-{job}.out"
    assert out.stat().st_uid == one.u.uid
    # the user reads their own log; the other user cannot even look into the directory
    assert one.run(["cat", str(out)]).returncode == 0
    assert two.run(["cat", str(out)]).returncode != 0
    # the CLI's slurm backend reads the same record (comment: the pinned digest and the image)
    r = one.nagaya("job", "show", job, "--json", env={**cluster.env, "NAGAYA_SCHED_BACKEND": "slurm"})
    assert r.returncode == 0 and json.loads(r.stdout)["digest"] == info["digest"], r.stderr

    # a failing job: its exit code, as the CLI reports it
    r = rest_site.api("POST", "/api/jobs", auth=tok1, json={"image": image, "command": ["/bin/busybox", "sh", "-c",
                                                                                        "exit 3"]})
    assert r.status_code == 201, r.text
    failed = wait_job(rest_site, tok1, r.json()["id"], {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert (failed["state"], failed["exit_code"]) == ("FAILED", 3)

    # a long job, submitted and cancelled through the portal's pages
    web1, web2 = portal_login(rest_site, one), portal_login(rest_site, two)
    r = web1.post("/jobs", data={"image": image, "command": "/bin/busybox sh -c 'echo started; exec sleep 300'",
                                 "nodes": "1", "cpus": "1", "time_limit": "10", "name": "rest-long",
                                 "csrf": csrf_of(web1, "/jobs")})
    assert r.status_code == 303 and r.headers["location"].startswith("/jobs/"), r.text
    long_job = r.headers["location"].rsplit("/", 1)[1]
    wait_job(rest_site, tok1, long_job, {"RUNNING"})
    deadline = time.monotonic() + 60                    # the live log: what the job printed so far
    while "started" not in web1.get(f"/jobs/{long_job}/log").text:
        assert time.monotonic() < deadline, "the portal showed no log"
        time.sleep(0.2)
    assert "rest-long" in web1.get("/jobs").text and "rest-long" not in web2.get("/jobs").text
    assert long_job in {j["id"] for j in rest_site.api("GET", "/api/jobs", auth=tok1).json()}
    # the other user: no sight of it, no cancel, no log, not in their list, and not the image either
    for method, url in (("GET", f"/api/jobs/{long_job}"), ("GET", f"/api/jobs/{long_job}/log"),
                        ("DELETE", f"/api/jobs/{long_job}"), ("GET", f"/api/jobs/{job}/log")):
        assert rest_site.api(method, url, auth=tok2).status_code in (403, 404), url
    csrf2 = csrf_of(web2, "/jobs")
    for method, url in (("GET", f"/jobs/{long_job}"), ("GET", f"/jobs/{long_job}/log"),
                        ("POST", f"/jobs/{long_job}/cancel")):
        r = web2.request(method, url, data={"csrf": csrf2} if method == "POST" else None)
        assert r.status_code in (403, 404), (url, r.status_code)
    assert rest_site.api("GET", "/api/jobs", auth=tok2).json() == []
    r = rest_site.api("POST", "/api/jobs", auth=tok2, json={"image": image, "command": ["true"]})
    assert r.status_code == 404
    assert wait_job(rest_site, tok1, long_job, {"RUNNING"})["state"] == "RUNNING"      # untouched by them
    r = web1.post(f"/jobs/{long_job}/cancel", data={"csrf": csrf_of(web1, f"/jobs/{long_job}")})
    assert r.status_code == 303, r.text
    assert wait_job(rest_site, tok1, long_job, {"CANCELLED", "COMPLETED", "FAILED"})["state"] == "CANCELLED"
    assert rest_site.api("DELETE", f"/api/jobs/{long_job}", auth=tok1).status_code == 409    # already over
    # the audit trail has both submissions with their pinned digest
    with sqlite3.connect(rest_site.state_dir / "nagaya.db") as db:
        rows = db.execute("SELECT digest, details FROM audit_events WHERE action = 'job.submit' AND actor = ?",
                          (one.name,)).fetchall()
    jobs = {json.loads(d)["job"]: digest for digest, d in rows}
    assert jobs[job] == jobs[long_job] == info["digest"]


def test_gateway_over_a_unix_socket(restd: str, jwt_key: Path, rest_users: tuple[SiteUser, SiteUser],
                                    tmp_path: Path) -> None:
    """The same gateway with `slurmrestd_url = "unix:PATH"`: tokens, the owner filter and Slurm's errors."""
    from nagaya.errors import NotFound, PermissionDenied
    from nagaya.sched.slurmrest import SlurmRest

    one, two = rest_users
    gw = SlurmRest(f"unix:{RESTD_SOCKET[-1]}", jwt_key, tmp_path, service_account="nagaya")
    mine = gw.for_user(one.name).list()
    assert mine and {j.user for j in mine} == {one.name}          # the jobs of the test above, only theirs
    assert gw.for_user(two.name).list() == []
    with pytest.raises(NotFound):
        gw.for_user(two.name).status(mine[0].id)
    with pytest.raises(NotFound):
        gw.for_user(one.name).status("999999")
    for who in ("root", "nagaya", "nobody"):
        with pytest.raises(PermissionDenied):
            gw.for_user(who).list()


def test_site_up_refuses_a_key_everyone_can_read(site_system: None, base_dir: Path, jwt_key: Path) -> None:
    """Bad configuration is one clear line and a non-zero exit, before any daemon starts."""
    open_key = jwt_key.with_name("open.key")
    open_key.write_bytes(os.urandom(32))
    open_key.chmod(0o644)
    private = jwt_key.with_name("root-only.key")
    private.write_bytes(os.urandom(32))
    private.chmod(0o600)                                    # root's: the service account cannot read it
    base = {"NAGAYA_SCHED_PORTAL_SUBMIT": "slurmrestd", "NAGAYA_SCHED_SLURMRESTD_URL": "http://127.0.0.1:9"}
    cases = {"readable by every user": {**base, "NAGAYA_SCHED_SLURMRESTD_JWT_KEY": str(open_key)},
             "not readable by nagaya": {**base, "NAGAYA_SCHED_SLURMRESTD_JWT_KEY": str(private)},
             "needs [sched] slurmrestd_url": {"NAGAYA_SCHED_PORTAL_SUBMIT": "slurmrestd"},
             "must be dispatcher or slurmrestd": {"NAGAYA_SCHED_PORTAL_SUBMIT": "sbatch"}}
    for i, (msg, env) in enumerate(cases.items()):
        state = base_dir / f"bad-rest-{i}"
        r = subprocess.run(["/usr/local/bin/nagaya", "site", "up", "--state-dir", str(state)],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (msg, r.stderr)
        assert not daemons(state)
