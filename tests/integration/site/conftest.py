"""Site fixtures: a real site (`nagaya site up` as root: registry + server as the `nagaya` service account),
Unix test users with passwords (PAM), a private PostgreSQL, and a tiny OCI image from busybox-static.
Every user-facing command runs as an unprivileged test user (setpriv); under CI=true a missing
component fails instead of skipping."""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import require
from tests.helpers import images
from tests.helpers.ports import free_port
from tests.helpers.users import User

CI = os.environ.get("CI") == "true"
NAGAYA = "/usr/local/bin/nagaya"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SITE_COMPONENTS = ("nagaya", "skopeo", "setpriv", "chpasswd", "useradd", "docker-registry")


def run_root(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


@dataclass
class SiteUser:
    """A Unix account with a password; `u` runs commands as that user (setpriv, clean environment)."""

    u: User
    password: str

    @property
    def name(self) -> str:
        return self.u.name

    def nagaya(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.u.nagaya(*args, **kw)

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return self.u.run(args, **kw)

    @property
    def auth_file(self) -> Path:
        return self.u.home / ".config" / "nagaya" / "auth.json"

    def login(self, server: str) -> subprocess.CompletedProcess:
        r = self.nagaya("login", "--password-stdin", "--json", server, input=self.password + "\n")
        assert r.returncode == 0, r.stderr
        return r

    def creds(self, registry: str) -> tuple[str, str]:
        """(user, personal access token) as stored by `nagaya login` — what standard clients send."""
        data = json.loads(self.auth_file.read_text())
        user, _, secret = base64.b64decode(data["auths"][registry]["auth"]).decode().partition(":")
        return user, secret


def ensure_user(name: str, password: str, groups: tuple[str, ...] = ()) -> SiteUser:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
    for g in groups:
        subprocess.run(["usermod", "-a", "-G", g, name], check=True)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    pw = pwd.getpwnam(name)
    u = User(name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))
    shutil.rmtree(u.home / ".config" / "nagaya", ignore_errors=True)     # no login from an earlier run
    return SiteUser(u, password)


def module_people(site: Site, prefix: str, names: tuple[str, ...]) -> dict[str, SiteUser]:
    """Users of one test module only (`nys-PREFIX-NAME`, "admin" in nagaya-admins), logged in to the site:
    other modules' fixtures reset the shared test users' logins."""
    ensure_group("nagaya-admins")
    users = {k: ensure_user(f"nys-{prefix}-{k}", f"pw-{prefix}-{k}-{os.getpid()}",
                            ("nagaya-admins",) if k == "admin" else ()) for k in names}
    for u in users.values():
        u.login(site.server)
    return users


def ensure_group(name: str) -> None:
    if run_root(["getent", "group", name]).returncode != 0:
        subprocess.run(["groupadd", name], check=True)


@dataclass
class Site:
    registry: str
    server: str
    state_dir: Path

    def token(self, scope: str, auth: tuple[str, str] | None) -> httpx.Response:
        return httpx.get(f"{self.server}/token", params={"service": "nagaya-registry", "scope": scope},
                         auth=auth, timeout=30)

    def granted(self, repository: str, actions: str, auth: tuple[str, str] | None) -> set[str] | int:
        """The actions in the registry token the server issues, or the HTTP status if it refuses."""
        r = self.token(f"repository:{repository}:{actions}", auth)
        if r.status_code != 200:
            return r.status_code
        payload = r.json()["token"].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return {a for e in claims["access"] if e["name"] == repository for a in e["actions"]}

    def api(self, method: str, path: str, auth: tuple[str, str] | None = None, **kw) -> httpx.Response:
        return httpx.request(method, f"{self.server}{path}", auth=auth, timeout=30, **kw)


def site_up(state_dir: Path, env: dict[str, str] | None = None) -> Site:
    r = run_root([NAGAYA, "site", "up", "--state-dir", str(state_dir), "--json"], env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr + r.stdout
    info = json.loads(r.stdout)
    return Site(info["registry"], info["server"], state_dir)


def site_down(state_dir: Path) -> None:
    r = run_root([NAGAYA, "site", "down", "--state-dir", str(state_dir), "--json"])
    assert r.returncode == 0, r.stderr
    assert not daemons(state_dir), "site down left processes running"


def daemons(state_dir: Path) -> list[str]:
    """Live (non-zombie) processes whose command line mentions the state dir."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(state_dir) in cmd and state != "Z":
            out.append(f"{p.name} {cmd}")
    return out


@pytest.fixture(scope="session")
def site_system() -> None:
    require(os.geteuid() == 0, "site tests run as root: they create Unix users and start the site")
    for exe in SITE_COMPONENTS:
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    require(run_root(["id", "nagaya"]).returncode == 0, "service account nagaya missing (bash deploy/install.sh)")


@pytest.fixture(scope="session")
def base_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-site-"))
    d.chmod(0o755)                      # the service account must reach the state dir inside
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def site(site_system: None, base_dir: Path) -> Iterator[Site]:
    s = site_up(base_dir / "state")
    yield s
    site_down(s.state_dir)


@pytest.fixture(scope="session")
def people(site_system: None) -> dict[str, SiteUser]:
    ensure_group("nys-lab")
    ensure_group("nagaya-admins")
    spec = {"owner": (), "maint": (), "dev": (), "guest": (), "outsider": (), "labber": ("nys-lab",),
            "admin": ("nagaya-admins",)}
    return {k: ensure_user(f"nys-{k}", f"pw-{k}-{os.getpid()}", g) for k, g in spec.items()}


@pytest.fixture(scope="session")
def logged_in(site: Site, people: dict[str, SiteUser]) -> dict[str, SiteUser]:
    for p in people.values():
        p.login(site.server)
    return people


@pytest.fixture(scope="session")
def image_archive(base_dir: Path) -> Path:
    """A one-layer OCI archive holding busybox (Debian's busybox-static), readable by every test user."""
    layer = images.tar_bytes([images.entry("bin/", "dir"),
                              images.entry("bin/busybox", "file", Path("/bin/busybox").read_bytes(), mode=0o755)])
    layout = images.oci_layout(base_dir / "bb-layout", [layer], {"Cmd": ["/bin/busybox", "true"]})
    out = images.oci_archive(layout, base_dir / "bb.tar")
    subprocess.run(["chmod", "-R", "a+rX", str(base_dir / "bb-layout"), str(out)], check=True)
    return out


def skopeo(who: SiteUser | User, args: list[str], creds: tuple[str, str] | None) -> subprocess.CompletedProcess:
    """skopeo as an unprivileged user with explicit credentials (None: anonymous)."""
    u = who.u if isinstance(who, SiteUser) else who
    return u.run(["skopeo", "--command-timeout", "60s", *args[:1], *_cred_args(args[0], creds), *args[1:]],
                 timeout=90)


def _cred_args(cmd: str, creds: tuple[str, str] | None) -> list[str]:
    if cmd == "copy":
        base = ["--src-tls-verify=false", "--dest-tls-verify=false"]
        if creds is None:
            return [*base, "--src-no-creds", "--dest-no-creds"]
        c = f"{creds[0]}:{creds[1]}"
        return [*base, f"--src-creds={c}", f"--dest-creds={c}"]
    base = ["--tls-verify=false"]
    return [*base, "--no-creds"] if creds is None else [*base, f"--creds={creds[0]}:{creds[1]}"]


def push(who: SiteUser | User, archive: Path, ref: str, creds: tuple[str, str] | None) -> subprocess.CompletedProcess:
    return skopeo(who, ["copy", f"oci-archive:{archive}", f"docker://{ref}"], creds)


def indexed(site: Site, who: SiteUser, repository: str, tag: str, deadline_s: float = 30) -> dict:
    """Wait for the registry's (asynchronous) push notification to reach the server's index: a push has
    returned before the server knows of it, and a job, session or page that names the tag reads the index."""
    end = time.monotonic() + deadline_s
    while True:
        r = site.api("GET", f"/api/repositories/{repository}/tags", auth=who.creds(site.registry))
        if r.status_code == 200:
            hit = [t for t in r.json() if t["tag"] == tag]
            if hit:
                return hit[0]
        assert time.monotonic() < end, f"{repository}:{tag} never reached the index"
        time.sleep(0.2)


# ---- PostgreSQL: Debian's server, started here as the postgres user on a private port and socket dir ------


@dataclass
class Postgres:
    socket_dir: Path
    port: int

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@/{db}?host={self.socket_dir}&port={self.port}"

    def createdb(self, db: str) -> str:
        r = run_root(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", str(PG_BIN / "createdb"),
                      "-h", str(self.socket_dir), "-p", str(self.port), db])
        assert r.returncode == 0, r.stderr
        return self.url(db)


@pytest.fixture(scope="session")
def postgres(site_system: None) -> Iterator[Postgres]:
    require((PG_BIN / "postgres").exists() and run_root(["id", "postgres"]).returncode == 0,
            "PostgreSQL 15 is not installed (apt-get install postgresql)")
    d = Path(tempfile.mkdtemp(prefix="nagaya-pg-"))
    d.chmod(0o755)
    data, sock = d / "data", d / "sock"
    sock.mkdir()
    shutil.chown(d, "postgres", "postgres")
    shutil.chown(sock, "postgres", "postgres")
    as_pg = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    r = run_root([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    assert r.returncode == 0, r.stderr
    port = free_port()
    r = run_root([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(d / "pg.log"), "-w", "-t", "60", "-o",
                  f"-p {port} -k {sock} -c listen_addresses=''", "start"])
    assert r.returncode == 0, r.stderr + (d / "pg.log").read_text(errors="replace")
    try:
        yield Postgres(sock, port)
    finally:
        run_root([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        deadline = time.monotonic() + 10
        while daemons(data) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(d, ignore_errors=True)
