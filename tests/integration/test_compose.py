"""`nagaya compose` on the local backend, as an unprivileged user: a healthchecked http server with four
client replicas that reach it by service name (the stack test_compose_slurm.py runs over three nodes),
teardown on SIGINT / `down` / a failing service, healthchecks that keep running once a service is healthy,
GPUs shared out between replicas, strict validation naming the offending path, and placement refusing a
port clash."""

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

from tests.helpers.fake_gpu import fake_gpus
from tests.helpers.ports import free_port
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, import_images, wait_for

pytestmark = pytest.mark.integration

STACK = """\
services:
  httpd:
    image: bb
    command:
      - sh
      - -c
      - mkdir -p $$HOME/www && echo hello from httpd > $$HOME/www/index.html && exec httpd -f -p ${{PORT}} -h $$HOME/www
    ports: ["${{PORT}}"]
    healthcheck:
      test: "wget -q -O- http://127.0.0.1:${{PORT}}/"
      interval: 5s
      start_interval: 200ms
      retries: 50
  client:
    image: ${{CLIENT_IMAGE:-bb}}
    deploy:
      replicas: 4
    depends_on:
      httpd:
        condition: service_healthy
    environment:
      GREETING: ${{GREETING}}
    command:
      - sh
      - -c
      - wget -q -O- http://httpd:${{PORT}}/ && echo "$$GREETING $$NAGAYA_SERVICE_HTTPD_HOSTS" && {tail}
"""


@pytest.fixture(scope="module")
def alice(system: None, rootfs: Path, app_layout: Path) -> User:
    # The scheduler suites' user: other suites `pkill -u` the conftest users after each of their tests.
    u, _ = ensure_users(("nagaya-s1", 500000), ("nagaya-s2", 700000))
    import_images(u, rootfs, app_layout)
    return u


@pytest.fixture
def workdir(alice: User) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="compose-", dir=alice.home))
    os.chown(d, alice.uid, alice.gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _project(user: User, workdir: Path, text: str, dotenv: str = "") -> Path:
    d = user.mkdir(workdir / "stack")
    (d / "compose.yml").write_text(text)
    if dotenv:
        (d / ".env").write_text(dotenv)
    user.chown_tree(d)
    return d


def _ps(user: User, d: Path) -> dict:
    r = user.nagaya("compose", "ps", "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _pids(user: User) -> set[str]:
    return {p.split()[0] for p in user.processes()}


def _no_leftovers(user: User, before: set[str]) -> None:
    wait_for(lambda: not (_pids(user) - before), 20, f"no process of {user.name}'s stack left")
    with open("/proc/mounts") as f:
        assert str(user.home) not in f.read()       # every mount lived in a private namespace


@pytest.fixture
def stack(alice: User, workdir: Path) -> tuple[User, Path, int]:
    port = free_port()
    d = _project(alice, workdir, STACK.format(tail="sleep 600"), dotenv=f"GREETING=hi-from-dotenv\nPORT={port}\n")
    return alice, d, port


def test_stack_by_service_name_then_sigint(stack: tuple[User, Path, int]) -> None:
    user, d, port = stack
    before = _pids(user)
    up = user.popen(["nagaya", "compose", "up"], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        st = wait_for(lambda: ((s := _ps(user, d))["status"] in ("running", "failed") or up.poll() is not None)
                      and s, 60, "the stack to come up")
        assert st["status"] == "running", st
        reps = {r["name"]: r for r in st["replicas"]}
        assert sorted(reps) == ["client-1", "client-2", "client-3", "client-4", "httpd-1"]
        assert reps["httpd-1"]["health"] == "healthy" and reps["httpd-1"]["ports"] == [port]
        assert all(r["node"] == socket.gethostname() and r["state"] == "running" for r in reps.values())

        def fetched() -> bool:
            out = user.nagaya("compose", "logs", "client", cwd=d).stdout
            return all(f"client-{i} | hello from httpd" in out and f"client-{i} | hi-from-dotenv 127.0.0.1" in out
                       for i in range(1, 5))

        wait_for(fetched, 30, "every client to fetch from httpd by service name")
        assert "httpd-1" not in user.nagaya("compose", "logs", "client", cwd=d).stdout
    finally:
        up.send_signal(signal.SIGINT)
        _out, err = up.communicate(timeout=60)
    assert up.returncode == 128 + signal.SIGINT, err
    assert "all services are up" in err
    assert _ps(user, d)["status"] == "down"
    _no_leftovers(user, before)


def test_detach_and_down(stack: tuple[User, Path, int]) -> None:
    user, d, _port = stack
    before = _pids(user)
    r = user.nagaya("compose", "up", "-d", cwd=d, timeout=90)
    assert r.returncode == 0, r.stderr
    try:
        assert _ps(user, d)["status"] == "running"
        again = user.nagaya("compose", "up", "-d", cwd=d)
        assert again.returncode == 7 and "already up" in again.stderr
    finally:
        r = user.nagaya("compose", "down", cwd=d, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _ps(user, d)["status"] == "down"
    _no_leftovers(user, before)
    assert user.nagaya("compose", "down", cwd=d).stdout.strip() == "nothing is running"


def test_a_failing_service_stops_the_stack(alice: User, workdir: Path) -> None:
    port = free_port()
    d = _project(alice, workdir, STACK.format(tail="exit 3"), dotenv=f"GREETING=x\nPORT={port}\n")
    before = _pids(alice)
    r = alice.nagaya("compose", "up", cwd=d, timeout=90)
    assert r.returncode == 3, r.stderr
    assert "service client failed: client-" in r.stderr and "exited with 3" in r.stderr
    st = _ps(alice, d)
    assert st["status"] == "failed" and st["failed"]["service"] == "client"
    _no_leftovers(alice, before)


@pytest.mark.parametrize("body,path,msg", [
    ("services:\n  web:\n    image: bb\n    ports:\n      - target: 80\n        mdoe: host\n",
     "services.web.ports[0].mdoe", "unknown key (in no compose or Swarm spec); did you mean mode?"),
    ("services:\n  web:\n    image: bb\n    netwroks: [a]\n", "services.web.netwroks", "did you mean networks?"),
    ("services:\n  web:\n    image: bb\n    privileged: true\n", "services.web.privileged", "refused: containers run "
     "with your own rights"),
    ("services:\n  web:\n    image: bb\n    user: root\n", "services.web.user", "refused: user 'root': replicas "
     "run as you"),
    ("services:\n  web:\n    image: bb\n    deploy:\n      replicas: -1\n", "services.web.deploy.replicas",
     "greater than or equal to 0"),
    ("services:\n  web:\n    image: bb\n    healthcheck:\n      test: \"true\"\n      interval: soon\n",
     "services.web.healthcheck.interval", "invalid duration"),
    ("services:\n  web:\n    image: bb\n    depends_on: {db: {condition: service_healthy}}\n"
     "  db:\n    image: bb\n", "", "db has no healthcheck"),
    ("services:\n  web:\n    image: bb\n    volumes: [data:/data]\n", "services.web.volumes[0]",
     "named volume 'data' is not in the file's top-level volumes"),
    ("services:\n  web:\n    image: ${NOPE:?set NOPE first}\n", "services.web.image", "set NOPE first"),
])
def test_strict_validation_names_the_path(alice: User, workdir: Path, body: str, path: str, msg: str) -> None:
    d = _project(alice, workdir, body)
    r = alice.nagaya("compose", "up", cwd=d)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and f"compose.yml: {path}" in line and msg in line, line


def test_placement_refuses_a_port_clash(alice: User, workdir: Path) -> None:
    d = _project(alice, workdir, "services:\n  web:\n    image: bb\n    ports: ['8080:8080']\n"
                                  "    deploy: {replicas: 2}\n")
    r = alice.nagaya("compose", "up", cwd=d)
    assert r.returncode == 2
    assert "cannot place web-2: port 8080/tcp" in r.stderr and "web-1" in r.stderr
    assert not os.path.exists(d / "hosts")


HEALTH = """\
services:
  db:
    image: bb
    command: ["sleep", "600"]
    volumes: ["./flag:/flag"]
    healthcheck:
      test: ["CMD", "test", "-f", "/flag/ok"]
      interval: 300ms
      retries: 2
"""


def test_healthchecks_keep_running(alice: User, workdir: Path) -> None:
    d = _project(alice, workdir, HEALTH)
    flag = alice.mkdir(d / "flag") / "ok"
    flag.touch()
    before = _pids(alice)
    up = alice.popen(["nagaya", "compose", "up"], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def db() -> dict:
        return _ps(alice, d)["replicas"][0]

    try:
        wait_for(lambda: _ps(alice, d)["status"] == "running", 60, "the stack to come up")
        assert db()["health"] == "healthy"
        flag.unlink()                       # the check starts failing: unhealthy after `retries` in a row
        r = wait_for(lambda: (x := db())["health"] == "unhealthy" and x, 30, "db to turn unhealthy")
        assert r["failing_streak"] >= 2 and r["state"] == "running" and r["health_output"] == "exit 1"
        assert _ps(alice, d)["status"] == "running"         # reported, not acted upon: the service still runs
        table = alice.nagaya("compose", "ps", cwd=d).stdout
        assert "unhealthy" in table
        flag.touch()                        # one passing check: healthy again
        r = wait_for(lambda: (x := db())["health"] == "healthy" and x, 30, "db to be healthy again")
        assert r["failing_streak"] == 0
    finally:
        up.send_signal(signal.SIGINT)
        _out, err = up.communicate(timeout=60)
    assert up.returncode == 128 + signal.SIGINT, err
    assert "db-1 on" in err and "is unhealthy after 2 checks (exit 1)" in err and "db-1 is healthy" in err
    _no_leftovers(alice, before)
    # Unhealthy before the stack is up: the service never came up, and the stack fails naming it.
    flag.unlink()
    r = alice.nagaya("compose", "up", cwd=d, timeout=90)
    assert r.returncode == 1, r.stderr
    assert "nagaya: service db: db-1 on" in r.stderr and "is unhealthy after 2 checks" in r.stderr
    _no_leftovers(alice, before)


GPUS = """\
services:
  train:
    image: bb
    deploy: {{replicas: {n}}}
    x-nagaya: {{gpus: 1}}
    command: ["sh", "-c", "echo devs $$(ls /dev | grep nvidia | sort | tr '\\n' ' ') \
nv=$$NVIDIA_VISIBLE_DEVICES cuda=$$CUDA_VISIBLE_DEVICES && nvidia-smi"]
"""


def test_replicas_get_disjoint_gpus(alice: User, workdir: Path) -> None:
    gpu_env = fake_gpus(Path("/tmp/nagaya-fake-gpu-compose"), 2)
    d = _project(alice, workdir, GPUS.format(n=2))
    r = alice.nagaya("compose", "up", cwd=d, env=gpu_env, timeout=90)
    assert r.returncode == 0, r.stderr
    st = _ps(alice, d)
    assert sorted(x["gpus"] for x in st["replicas"]) == [[0], [1]]
    table = alice.nagaya("compose", "ps", cwd=d).stdout
    assert "GPUS" in table and "train-1" in table
    out = alice.nagaya("compose", "logs", cwd=d).stdout
    for x in st["replicas"]:
        g = x["gpus"][0]
        assert f"{x['name']} | devs nvidia{g} nvidiactl nv={g} cuda=0" in out, out
        assert f"{x['name']} | NVIDIA-SMI fake" in out
    (d / "compose.yml").write_text(GPUS.format(n=3))
    r = alice.nagaya("compose", "up", cwd=d, env=gpu_env)
    assert r.returncode == 2
    assert r.stderr.strip() == ("nagaya: cannot place train-3: it needs 1 GPU(s) and no node it may run on has that "
                                f"many free ({socket.gethostname()}: 0 of 2); use fewer replicas or GPUs, or more "
                                "nodes"), r.stderr
    r = alice.nagaya("compose", "up", cwd=d, env={**gpu_env, "CUDA_VISIBLE_DEVICES": "1"})
    assert r.returncode == 2 and "cannot place train-2" in r.stderr and ": 0 of 1)" in r.stderr  # the job's GPUs
    # Inside an allocation (SLURM_JOB_GPUS), `nagaya run --gpus` counts within it: the replica placed on
    # host GPU 1 gets it as the allocation's GPU 0.
    (d / "compose.yml").write_text(GPUS.format(n=1))
    r = alice.nagaya("compose", "up", cwd=d, env={**gpu_env, "SLURM_JOB_GPUS": "1"}, timeout=90)
    assert r.returncode == 0, r.stderr
    lines = [x for x in alice.nagaya("compose", "logs", cwd=d).stdout.splitlines() if "| devs" in x]
    assert lines[-1] == "train-1 | devs nvidia1 nvidiactl nv=1 cuda=0", lines     # the logs span both runs
