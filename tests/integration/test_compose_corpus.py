"""Compose and stack files as people write them for Docker Compose and `docker stack deploy`
(tests/integration/compose_corpus/: a web app + database + cache, a Swarm stack with replicas, placement and
restart policy, a GPU inference service, an HPC-style client/server pair) run unchanged on the local backend:
each ignored key is reported in exactly one line, typos still fail naming their path, and restart policies
restart a crashing replica with back-off, give up after max_attempts, and show restarts in `compose ps`.
test_compose_slurm.py runs the same corpus on the Slurm test cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nagaya.compose import keys
from nagaya.compose.spec import interpolate, read_env_file
from tests.helpers.fake_gpu import fake_gpus
from tests.helpers.ports import free_port
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, import_images, wait_for

pytestmark = pytest.mark.integration
CORPUS = Path(__file__).parent / "compose_corpus"
FILES = {"webapp": "docker-compose.yml", "swarm": "stack.yml", "gpu": "compose.yml", "hpc": "compose.yml"}


@pytest.fixture(scope="module")
def alice(system: None, rootfs: Path, app_layout: Path) -> User:
    u, _ = ensure_users(("nagaya-s1", 500000), ("nagaya-s2", 700000))
    import_images(u, rootfs, app_layout)
    return u


@pytest.fixture
def workdir(alice: User) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="corpus-", dir=alice.home))
    os.chown(d, alice.uid, alice.gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def corpus_env(user: User) -> dict[str, str]:
    """What a user would have exported: free ports (the tests run side by side), ids, a job token."""
    return {"WEB_PORT": str(free_port()), "DB_PORT": str(free_port()), "CACHE_PORT": str(free_port()),
            "API_PORT": str(free_port()), "SERVER_PORT": str(free_port()), "UID": str(user.uid),
            "GID": str(user.gid), "JOB_TOKEN": "tok-42"}


def copy_stack(user: User, dest: Path, name: str) -> Path:
    d = dest / name
    shutil.copytree(CORPUS / name, d)
    user.chown_tree(d)
    return d / FILES[name]


def expected_ignored(f: Path, env: dict[str, str]) -> list[str]:
    """The lines `compose up` must print for the file: one per ignored key, computed from the key table."""
    import yaml

    dotenv = f.parent / ".env"
    full = {**(read_env_file(dotenv) if dotenv.is_file() else {}), **env}
    data = interpolate(yaml.safe_load(f.read_text()), full)
    return sorted(f"nagaya: {f}: {a.path}: ignored: {a.reason}" for a in keys.check(data, str(f)))


def ignored_lines(stderr: str) -> list[str]:
    return sorted(x for x in stderr.splitlines() if ": ignored: " in x)


def ps(user: User, f: Path, env: dict[str, str] | None = None) -> dict:
    r = user.nagaya("compose", "ps", "--json", "-f", str(f), cwd=f.parent, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def logs(user: User, f: Path, env: dict[str, str] | None = None) -> str:
    return user.nagaya("compose", "logs", "-f", str(f), cwd=f.parent, env=env).stdout


def pids(user: User) -> set[str]:
    return {p.split()[0] for p in user.processes()}


class Up:
    """`compose up` in the foreground, stopped with SIGINT as ^C would."""

    def __init__(self, user: User, f: Path, env: dict[str, str], *args: str) -> None:
        self.user, self.f, self.env = user, f, env
        self.before = pids(user)
        self.p = user.popen(["nagaya", "compose", "up", "-f", str(f), *args], cwd=f.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err = ""

    def running(self, timeout: float = 90) -> dict:
        st = wait_for(lambda: ((s := ps(self.user, self.f))["status"] in ("running", "failed") or
                               self.p.poll() is not None) and s, timeout, f"{self.f} to come up", every=0.2)
        assert st["status"] == "running", (st, self.stop())
        return st

    def stop(self) -> str:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        _out, self.err = self.p.communicate(timeout=90)
        wait_for(lambda: not (pids(self.user) - self.before), 30, "no process of the stack left")
        return self.err


def test_webapp_database_cache(alice: User, workdir: Path) -> None:
    env = corpus_env(alice)
    f = copy_stack(alice, workdir, "webapp")
    up = Up(alice, f, env)
    try:
        st = up.running()
        names = sorted(r["name"] for r in st["replicas"])
        assert names == ["cache-1", "db-1", "webapp-web"], names     # container_name; adminer's profile is off
        out = wait_for(lambda: "web on web " in (o := logs(alice, f)) and o, 30, "the web app's line")
        assert "webapp-web | web on web env=production db=ok cache=+PONG secret=9 meta=1" in out, out
        page = subprocess.run(["wget", "-q", "-O-", f"http://127.0.0.1:{env['WEB_PORT']}/"], capture_output=True,
                              text=True, timeout=30)
        assert "web on web env=production db=ok" in page.stdout
        table = alice.nagaya("compose", "ps", "-f", str(f), cwd=f.parent).stdout
        assert "RESTARTS" in table and "webapp-web" in table
    finally:
        err = up.stop()
    assert up.p.returncode == 128 + signal.SIGINT, err
    assert ignored_lines(err) == expected_ignored(f, env), err
    for line in (f"{f}: version: ignored: obsolete", f"{f}: networks: ignored: host networking inside a job",
                 f"{f}: services.web.networks: ignored: host networking", f"{f}: services.web.labels: ignored",
                 f"{f}: services.web.logging: ignored", f"{f}: services.web.ports[0].mode: ignored",
                 f"{f}: services.cache.cap_drop: ignored", f"{f}: services.db.expose: ignored"):
        assert sum(line in x for x in err.splitlines()) == 1, (line, err)
    # The named volume outlives the stack (a directory of the user's), the secret was mounted read-only.
    vol = alice.home / ".local/share/nagaya/compose/volumes/webapp_db-data/ready"
    assert vol.read_text() == "ok\n"
    # With the debug profile, adminer runs too.
    up = Up(alice, f, env, "--profile", "debug")
    try:
        assert "adminer-1" in [r["name"] for r in up.running()["replicas"]]
    finally:
        up.stop()


def test_swarm_stack(alice: User, workdir: Path) -> None:
    env = corpus_env(alice)
    f = copy_stack(alice, workdir, "swarm")
    up = Up(alice, f, env)
    try:
        st = up.running()
        reps = {r["name"]: r for r in st["replicas"]}
        assert sorted(reps) == ["agent-1", "api-1", "worker-1", "worker-2", "worker-3"]    # global: one per node
        wait_for(lambda: all(f"worker-{i} | worker on " in logs(alice, f) for i in (1, 2, 3)), 60,
                 "every worker to reach the api by name")
        assert f"worker-1 | api on {socket.gethostname()}" in logs(alice, f)
    finally:
        err = up.stop()
    assert ignored_lines(err) == expected_ignored(f, env), err
    assert f"{f}: services.worker.deploy.endpoint_mode: ignored" in err
    assert f"{f}: services.api.deploy.update_config: ignored" in err


def test_gpu_inference(alice: User, workdir: Path) -> None:
    env = {**corpus_env(alice), **fake_gpus(Path("/tmp/nagaya-fake-gpu-corpus"), 2)}
    f = copy_stack(alice, workdir, "gpu")
    up = Up(alice, f, env)
    try:
        st = up.running()
        gpus = sorted(tuple(r["gpus"]) for r in st["replicas"] if r["service"] == "inference")
        assert gpus == [(0,), (1,)], st
        out = wait_for(lambda: (o := logs(alice, f)).count("NVIDIA-SMI fake") == 2 and o, 30, "both replicas")
        for i in (1, 2):
            assert f"inference-{i} | serving resnet50 on {socket.gethostname()} gpus=0 devs=1" in out, out
        assert "client-1 | client sees 127.0.0.1,127.0.0.1" in logs(alice, f)
    finally:
        err = up.stop()
    assert ignored_lines(err) == expected_ignored(f, env), err
    assert f"{f}: services.inference.runtime: ignored" in err and f"{f}: services.inference.ulimits: ignored" in err


def test_hpc_client_server(alice: User, workdir: Path) -> None:
    env = corpus_env(alice)
    f = copy_stack(alice, workdir, "hpc")
    up = Up(alice, f, env)
    try:
        up.running()
        out = wait_for(lambda: "client-2 | client 2 done" in (o := logs(alice, f)) and o, 30, "the clients")
        assert f"server-1 | server up as {alice.uid} on server0" in out, out
        assert "client-1 | token=tok-42 host=server0" in out
    finally:
        err = up.stop()
    assert "server-1 | server0 got USR1, checkpointing" in logs(alice, f)      # its stop_signal
    assert ignored_lines(err) == expected_ignored(f, env), err
    assert [x for x in ignored_lines(err) if "services.server.init" in x] == \
        [f"nagaya: {f}: services.server.init: ignored: nagaya's pid 1 already reaps children and forwards signals"]
    # Another user's id is refused, naming the path.
    r = alice.nagaya("compose", "up", "-f", str(f), cwd=f.parent, env={**env, "UID": "0"})
    assert r.returncode == 2 and f"{f}: services.server.user: refused: user '0'" in r.stderr, r.stderr


@pytest.mark.parametrize("body,line", [
    ("services:\n  web:\n    image: bb\n    restrat: always\n",
     "services.web.restrat: unknown key (in no compose or Swarm spec); did you mean restart?"),
    ("services:\n  web:\n    image: bb\n    deploy:\n      resources:\n        limits: {cpu: 1}\n",
     "services.web.deploy.resources.limits.cpu: unknown key (in no compose or Swarm spec); did you mean cpus?"),
    ("services:\n  web:\n    image: bb\nnetworks:\n  a: {drivr: overlay}\n",
     "networks.a.drivr: unknown key (in no compose or Swarm spec); did you mean driver?"),
    ("services:\n  web:\n    image: bb\n    deploy:\n      restart_policy: {condition: sometimes}\n",
     "services.web.deploy.restart_policy.condition: Input should be 'none', 'on-failure' or 'any'"),
    ("services:\n  web:\n    image: bb\n    extends: {service: base}\n",
     "services.web.extends: refused: extends is not supported"),
    ("services:\n  web:\n    image: bb\n    secrets: [pw]\nsecrets:\n  pw: {external: true}\n",
     "secrets.pw.external: refused: external secrets live in a Swarm store"),
    ("services:\n  web:\n    image: bb\n    deploy:\n      placement:\n        constraints: [node.zone == a]\n",
     "services.web.deploy.placement.constraints: Value error, 'node.zone == a': expected"),
])
def test_typos_and_refusals_name_the_path(alice: User, workdir: Path, body: str, line: str) -> None:
    f = workdir / "compose.yml"
    f.write_text(body)
    os.chown(f, alice.uid, alice.gid)
    r = alice.nagaya("compose", "up", "-f", str(f), cwd=workdir)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and f"nagaya: {f}: {line.replace('Value error, ', '')}" in r.stderr, r.stderr


CRASH = """\
services:
  flaky:
    image: bb
    restart: "on-failure:3"
    command: ["sh", "-c", "echo attempt; exit 3"]
  recovers:
    image: bb
    volumes: ["./state:/state"]
    deploy:
      restart_policy: {condition: on-failure, delay: 300ms, max_attempts: 4}
    command: ["sh", "-c", "echo x >> /state/n; test $$(wc -l < /state/n) -ge 3 || exit 1; echo recovered; \\
exec sleep 600"]
"""


def test_restart_on_failure_backs_off_and_gives_up(alice: User, workdir: Path) -> None:
    f = workdir / "compose.yml"
    f.write_text(CRASH)
    alice.chown_tree(workdir)
    before = pids(alice)
    r = alice.nagaya("compose", "up", "-f", str(f), cwd=workdir, timeout=120)
    wait_for(lambda: not (pids(alice) - before), 30, "no process left")
    assert r.returncode == 3, r.stderr
    # Docker's back-off for `restart:`: 0.1 s, doubled for every restart in a row; then nagaya gives up.
    for n, delay in ((1, "0.1"), (2, "0.2"), (3, "0.4")):
        assert f"compose: flaky-1 exited with 3; restarting in {delay}s (attempt {n} of 3)" in r.stderr, r.stderr
    assert "compose: flaky-1 exited with 3; giving up after 3 restart(s)" in r.stderr
    assert "nagaya: service flaky failed: flaky-1 on" in r.stderr and "exited with 3 after 3 restart(s)" in r.stderr
    st = ps(alice, f)
    flaky = next(x for x in st["replicas"] if x["name"] == "flaky-1")
    assert flaky["restarts"] == 3 and flaky["exit_code"] == 3 and flaky["state"] == "exited"
    assert logs(alice, f).count("flaky-1 | attempt") == 4
    assert "RESTARTS" in alice.nagaya("compose", "ps", "-f", str(f), cwd=workdir).stdout


def test_restart_policy_recovers_and_ps_counts(alice: User, workdir: Path) -> None:
    f = workdir / "compose.yml"
    f.write_text(CRASH.split("  recovers:")[0].replace("flaky", "ok").replace("exit 3", "exec sleep 600")
                 + "  recovers:" + CRASH.split("  recovers:")[1])
    alice.mkdir(workdir / "state")
    alice.chown_tree(workdir)
    up = Up(alice, f, {})
    try:
        up.running()
        rec = wait_for(lambda: (x := next(r for r in ps(alice, f)["replicas"] if r["name"] == "recovers-1"))
                       ["state"] == "running" and "recovered" in logs(alice, f) and x, 30, "recovers-1 to recover")
        assert rec["restarts"] == 2, rec
        table = alice.nagaya("compose", "ps", "-f", str(f), cwd=workdir).stdout
        row = next(x for x in table.splitlines() if x.strip().startswith("recovers-1"))
        assert " running " in f" {row} " and " 2 " in f" {row} ", table
    finally:
        err = up.stop()
    # Swarm's delay, doubled per restart in a row.
    assert "recovers-1 exited with 1; restarting in 0.3s (attempt 1 of 4)" in err, err
    assert "recovers-1 exited with 1; restarting in 0.6s (attempt 2 of 4)" in err, err


BUILD = """\
name: {name}
services:
  app:
    build:
      context: ./app
      args: [GREETING=built-by-compose]
      cache_from: [app:cache]
    command: ["cat", "/greeting"]
  inline:
    image: {name}-inline:1
    build:
      dockerfile_inline: |
        FROM bb
        RUN echo inline > /greeting
    command: ["cat", "/greeting"]
"""


def test_build_before_up(alice: User, workdir: Path) -> None:
    d = alice.mkdir(workdir / "proj")
    name = f"b{os.urandom(4).hex()}"           # images of its own: the user's cache outlives the test
    (d / "compose.yml").write_text(BUILD.format(name=name))
    alice.mkdir(d / "app")
    (d / "app" / "Dockerfile").write_text("FROM bb\nARG GREETING=x\nRUN echo $GREETING > /greeting\n")
    alice.chown_tree(d)
    r = alice.nagaya("compose", "up", cwd=d, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"compose: building {name}-app for app" in r.stderr, r.stderr
    assert f"compose: building {name}-inline:1 for inline" in r.stderr, r.stderr
    assert r.stderr.count(": ignored: ") == 1 and "services.app.build.cache_from: ignored" in r.stderr
    out = alice.nagaya("compose", "logs", cwd=d).stdout
    assert "app-1 | built-by-compose" in out and "inline-1 | inline" in out, out
    r = alice.nagaya("compose", "up", cwd=d, timeout=300)           # images exist: not built again
    assert r.returncode == 0 and "building" not in r.stderr, r.stderr
    (d / "app" / "Dockerfile").write_text("FROM bb\nRUN false\n")
    r = alice.nagaya("compose", "up", "--build", cwd=d, timeout=300)   # --build: built again, and it fails
    assert r.returncode != 0 and "nagaya: services.app.build: nagaya build failed" in r.stderr, r.stderr
    for image in (f"{name}-app", f"{name}-inline:1"):
        alice.nagaya("image", "rm", image)
