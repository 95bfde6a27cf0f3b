"""Apps on another node than the portal's (server/app_relay.py), the dispatcher's side, on a real Slurm 22.05
whose nodes have their own network and UTS namespaces: an app of Alice's serving HTTP on its session socket on
node n2 is reached from the portal's account through a one-use relay that runs as Alice and becomes an
overlapping step of her job on n2 (the app sees its peer in its own node's namespaces); another user's session
directory, a job that is not the caller's and a peer that is not the portal's account get nothing."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nagaya.server.app_relay import run_relay
from nagaya.server.job_terminal import Terminals
from tests.conftest import require
from tests.helpers.slurm import SlurmCluster
from tests.helpers.users import User
from tests.integration.sched_helpers import ensure_users, wait_for
from tests.security.test_job_terminal import connect_as

pytestmark = pytest.mark.integration

SID = "ab" * 16
# The app: HTTP on a unix socket; it answers with its node's name and whether its peer (the relay's end on the
# node) is in its own UTS namespace, i.e. on its node.
APP = """import os, socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o660); s.listen(8)
while True:
    c, _ = s.accept()
    pid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    try:
        same = os.readlink(f"/proc/{pid}/ns/uts") == os.readlink("/proc/self/ns/uts")
    except OSError:
        same = False
    req = b""
    while b"\\r\\n\\r\\n" not in req:
        chunk = c.recv(4096)
        if not chunk:
            break
        req += chunk
    body = f"app on {os.uname().nodename}; peer on my node: {same}".encode()
    c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
    c.close()
"""


@pytest.fixture(scope="module")
def cluster(system: None) -> Iterator[SlurmCluster]:
    for exe in ("slurmctld", "slurmd", "munged", "srun", "sbatch"):
        require(shutil.which(exe) is not None, f"{exe} is not installed (bash deploy/install.sh)")
    c = SlurmCluster(nodes=2, netns=True).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def site(cluster: SlurmCluster) -> Iterator[dict]:
    alice, bob = ensure_users(("nagaya-ar1", 5400000), ("nagaya-ar2", 5500000))
    svc, _ = ensure_users(("nagaya-arsvc", 5600000), ("nagaya-ar3", 5700000))
    for u in (alice, bob):
        u.extra_env.update(cluster.env)
        conf = u.home / ".config" / "nagaya"              # the relay runs with a clean environment
        u.run(["mkdir", "-p", str(conf)], check=True)
        u.run(["sh", "-c", f"printf '[sched]\\nbackend = \"slurm\"\\n' > {conf}/nagaya.toml"], check=True)
    top = Path(tempfile.mkdtemp(prefix="ngr-", dir="/tmp"))
    top.chmod(0o755)
    apps = top / "state-apps"                            # as the dispatcher makes it: root's, 0755
    apps.mkdir(mode=0o755)
    for u in (alice, bob):                               # USER/: the user's, the service group's, 02750
        (apps / u.name).mkdir()
        os.chown(apps / u.name, u.uid, svc.gid)
        (apps / u.name).chmod(0o2750)
    session = apps / alice.name / SID
    alice.run(["mkdir", "-m", "0750", str(session)], check=True)
    app = alice.home / "relay_app.py"
    app.write_text(APP)
    os.chown(app, alice.uid, alice.gid)
    spool = top / "spool"
    spool.mkdir(mode=0o750)
    os.chown(spool, 0, svc.gid)
    fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    yield {"alice": alice, "bob": bob, "svc": svc, "apps": apps, "session": session, "app": app,
           "terms": Terminals(fd, spool, svc.uid, svc.gid)}
    os.close(fd)
    shutil.rmtree(top, ignore_errors=True)
    for u in (alice, bob):
        shutil.rmtree(u.home / ".config" / "nagaya", ignore_errors=True)


def sbatch(cluster: SlurmCluster, u: User, command: str, node: str) -> str:
    r = u.run(["sbatch", "--parsable", f"--nodelist={node}", "--time=5", "-o", "/dev/null", "--wrap", command],
              env=cluster.env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def relay(site: dict, who: User, job: str, node: str, session: str = SID) -> bytes:
    got = site["terms"].start(pwd.getpwnam(who.name), {"session": session, "job_id": job, "node": node,
                                                       "dir": str(site["apps"] / who.name / session)}, run=run_relay)
    assert "result" in got, got
    path = site["terms"].path / got["result"]["socket"]
    return connect_as(site["svc"], path, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", wait=60)


def test_an_app_on_another_node_through_the_scheduler(cluster: SlurmCluster, site: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = site["alice"], site["bob"]
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])        # the dispatcher's own setting
    node = cluster.nodes[1]
    job = sbatch(cluster, alice, f"exec /usr/bin/python3 -I {site['app']} {site['session']}/sock", node)
    wait_for(lambda: (site["session"] / "sock").exists(), 90, "the app to listen on its node")
    out = relay(site, alice, job, node)
    assert out.startswith(b"HTTP/1.0 200"), out
    assert f"app on {node}; peer on my node: True".encode() in out, out
    # Straight from this host the app's peer is not on its node: the relay above went through the scheduler.
    direct = subprocess.run(["/usr/bin/python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); "
                             "s.connect(sys.argv[1]); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); "
                             "print(s.recv(4096).decode())", str(site["session"] / "sock")],
                            capture_output=True, text=True)
    assert "peer on my node: False" in direct.stdout, direct

    # Bob asking for Alice's job (his relay runs as Bob): not his job, nothing comes back.
    assert relay(site, bob, job, node) == b""
    # A relay of Alice's to a job of Bob's on the node: not hers, nothing.
    bobs = sbatch(cluster, bob, "exec sleep 300", node)
    wait_for(lambda: "R" in bob.run(["squeue", "-h", "-j", bobs, "-o", "%t"], env=cluster.env).stdout, 60,
             "bob's job to run")
    assert relay(site, alice, bobs, node) == b""
    # Alice's relay to a session directory that holds no socket: nothing, and no error leaks anyone's data.
    assert relay(site, alice, job, node, session="cd" * 16) == b""
    # Another account than the portal's cannot use a relay at all.
    got = site["terms"].start(pwd.getpwnam(alice.name), {"session": SID, "job_id": job, "node": node,
                                                         "dir": str(site["session"])}, run=run_relay)
    assert connect_as(bob, site["terms"].path / got["result"]["socket"], b"GET /\r\n\r\n").startswith(b"REFUSED")
    for j, u in ((job, alice), (bobs, bob)):
        u.run(["scancel", j], env=cluster.env)
    # nothing of the relays is left as Alice's processes but her job's own, which scancel ends
    wait_for(lambda: not [p for p in alice.processes() if "app_relay" in p], 30, "the relays to end")


def test_the_portals_proxy_path_to_an_app_on_another_node(cluster: SlurmCluster, site: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """AppSessions.connect_path (what the proxy connects to, for HTTP and websockets alike): a session whose
    node is not this host gets a relay through the job service, and an HTTP client reaches the app by it."""
    import httpx

    from nagaya.server.apps import AppSession, AppSessions

    alice = site["alice"]
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    node = cluster.nodes[1]
    alice.run(["rm", "-f", str(site["session"] / "sock")], check=True)    # the first test's app's, gone now
    job = sbatch(cluster, alice, f"exec /usr/bin/python3 -I {site['app']} {site['session']}/sock", node)
    wait_for(lambda: (site["session"] / "sock").exists(), 90, "the app to listen on its node")
    spool = site["apps"].parent / "spool"
    # This process stands for the portal's account here (the relay's peer check is of the service account).
    fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    terms = Terminals(fd, spool, 0, 0)
    asked: list[tuple[str, str, dict]] = []

    class Jobs:                       # the job service: the dispatcher's answer to `app_relay`, as jobs.py gives it
        def terms_dir(self) -> Path:
            return spool / "terms"

        def app_relay(self, user: str, session: str, job_id: str, node: str) -> str:
            args = {"session": session, "job_id": job_id, "node": node}
            asked.append((user, "app_relay", args))
            return str(terms.start(pwd.getpwnam(user), {**args, "dir": str(site["apps"] / user / session)},
                                   run=run_relay)["result"]["socket"])

    state = site["apps"].parent / "state"
    state.mkdir(exist_ok=True)
    apps = AppSessions(Jobs(), state)  # type: ignore[arg-type]
    rec = AppSession(id=SID, user=alice.name, kind="web", image="r/x:1", job=job, token="", created=0.0,
                     deadline=1e12, last_seen=0.0, node=node, state="RUNNING")
    try:
        assert apps.node_of(rec) == node and apps.ready(rec)
        path, release = apps.connect_path(rec)
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=60) as c:
                r = c.get("http://localhost/")
        finally:
            release()
        assert r.status_code == 200 and r.text == f"app on {node}; peer on my node: True", r.text
        assert asked == [(alice.name, "app_relay", {"session": SID, "job_id": job, "node": node})]
        # a session on the server's own host: no relay, the app's own socket, opened no-follow as before
        rec.node = os.uname().nodename
        path, release = apps.connect_path(rec)
        release()
        assert path.startswith("/proc/self/fd/") and len(asked) == 1
    finally:
        os.close(terms.fd)
        os.close(fd)
        alice.run(["scancel", job], env=cluster.env)
