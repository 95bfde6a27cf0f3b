"""The compiled starter (src/starter): a plain `nagaya run|exec IMAGE CMD` replayed from the plan the Python
launcher wrote builds the same container as the Python path, and everything it cannot replay goes to Python.

NAGAYA_STARTER=debug makes the starter say on stderr which path ran; =off forces the Python path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers import gpu_layouts
from tests.helpers.gpu_config import write_user_config
from tests.helpers.users import User

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("session_images")]
FAST = "nagaya-starter: fast path"
STARTER = "/usr/local/bin/nagaya"
# What a container shows of itself, minus what differs between any two runs (mount ids, pids, link counts,
# and the host's own mounts under /tmp, which other tests make and remove meanwhile).
PROBE = r"""
id; pwd; hostname; umask; ulimit -a
env | grep -v '^NAGAYA_STARTER=' | sort
awk '$5 !~ "^/tmp/" { for (i = 7; $i != "-"; i++); print $4, $5, $6, $(i+1), $(i+2), $(i+3) }' /proc/self/mountinfo
cat /etc/passwd /etc/group /etc/hosts /etc/resolv.conf /proc/self/uid_map /proc/self/gid_map
stat -c '%n %a %u %g %F' / /etc /etc/* /home /tmp
grep -E '^(Uid|Gid|Groups|NoNewPrivs|Seccomp|Cap[A-Za-z]*):' /proc/self/status
"""


@pytest.fixture(autouse=True)
def starter_installed() -> None:
    with open(STARTER, "rb") as f:
        require(f.read(4) == b"\x7fELF", f"{STARTER} is not the compiled starter (bash deploy/install.sh with cc)")
    assert os.stat(STARTER).st_mode & 0o6000 == 0, "the starter must never be setuid or setgid"


def fast(user: User, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return user.nagaya(*args, env={"NAGAYA_STARTER": "debug", **(env or {})}, **kw)


def python(user: User, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """The Python path, asked to write a plan as the starter asks when its plan is missing or stale."""
    return user.nagaya(*args, env={"NAGAYA_STARTER": "off", "NAGAYA_STARTER_PLAN": "want", **(env or {})}, **kw)


def took_fast(r: subprocess.CompletedProcess) -> bool:
    return FAST in r.stderr


def python_reason(r: subprocess.CompletedProcess) -> str:
    for line in r.stderr.splitlines():
        if line.startswith("nagaya-starter: python path: "):
            return line.split(": ", 2)[2]
    return ""


def stderr_of(r: subprocess.CompletedProcess) -> str:
    return "\n".join(x for x in r.stderr.splitlines() if not x.startswith("nagaya-starter: "))


def both(user: User, *args: str, **kw) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The Python path (which writes the plan), then the starter's replay of it."""
    py = python(user, *args, **kw)
    fa = fast(user, *args, **kw)
    assert took_fast(fa), fa.stderr
    return py, fa


@pytest.fixture
def tmp_cwd(alice: User) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nagaya-starter-"))
    os.chown(d, alice.uid, alice.gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("where", ["home", "tmp", "root"])
def test_fast_path_builds_the_same_container(alice: User, workdir: Path, tmp_cwd: Path, where: str) -> None:
    cwd = {"home": workdir, "tmp": tmp_cwd, "root": Path("/")}[where]
    py, fa = both(alice, "run", "bb", "sh", "-c", PROBE, cwd=cwd)
    assert py.returncode == 0, py.stderr
    assert fa.returncode == 0, fa.stderr
    assert fa.stdout == py.stdout
    assert f"\n{cwd}\n" in fa.stdout                        # pwd: the caller's directory
    assert f"{alice.name}:x:{alice.uid}:{alice.gid}:" in fa.stdout
    assert "NoNewPrivs:\t1" in fa.stdout


def test_entrypoint_env_and_exec(alice: User, workdir: Path) -> None:
    """`run` puts the image's ENTRYPOINT before the command; `exec` does not; ENV and NAGAYAENV_ apply."""
    env = {"NAGAYAENV_FROM_HOST": "host", "SHARED": "host", "PS1": "host> "}
    py, fa = both(alice, "run", "app:1", "x", "y z", cwd=workdir, env=env)
    assert (py.returncode, py.stdout) == (fa.returncode, fa.stdout) == (0, f"ep x y z\n{workdir}\n")
    probe = "env | grep -v '^NAGAYA_STARTER=' | sort"
    py, fa = both(alice, "exec", "app:1", "sh", "-c", probe, cwd=workdir, env=env)
    assert py.returncode == fa.returncode == 0, py.stderr + fa.stderr
    assert fa.stdout == py.stdout
    lines = fa.stdout.splitlines()
    assert "FROM_HOST=host" in lines and "SHARED=image" in lines and "FROM_IMAGE=image" in lines
    assert not any(x.startswith("PS1=") for x in lines)
    assert "NAGAYA_CONTAINER=app:1" in lines


def test_exit_codes_and_errors_match(alice: User, workdir: Path) -> None:
    cases = [("sh", "-c", "exit 5"), ("sh", "-c", "kill -TERM $$"), ("no-such-command",), ("/app/noexec.sh",),
             ("/app",), ("./relative-missing",)]
    for cmd in cases:
        py, fa = both(alice, "run", "bb", *cmd, cwd=workdir)
        assert fa.returncode == py.returncode, (cmd, py.stderr, fa.stderr)
        assert stderr_of(fa) == stderr_of(py), cmd
    assert python(alice, "run", "bb", "no-such-command", cwd=workdir).returncode == 127
    assert python(alice, "run", "bb", "/app/noexec.sh", cwd=workdir).returncode == 126
    assert python(alice, "run", "bb", "sh", "-c", "kill -TERM $$", cwd=workdir).returncode == 143


def test_audit_record_is_written(alice: User, workdir: Path) -> None:
    log = alice.home / ".local" / "share" / "nagaya" / "audit.jsonl"
    python(alice, "run", "bb", "sh", "-c", "exit 4", cwd=workdir)
    py_rec = json.loads(log.read_text().splitlines()[-1])
    r = fast(alice, "run", "bb", "sh", "-c", "exit 4", cwd=workdir)
    assert took_fast(r) and r.returncode == 4
    rec = json.loads(log.read_text().splitlines()[-1])
    assert rec["id"] != py_rec["id"]
    for k in ("time", "id", "duration_s"):
        py_rec.pop(k)
        assert rec.pop(k)
    assert rec == py_rec
    assert rec["command"] == ["sh", "-c", "exit 4"] and rec["exit_code"] == 4 and rec["cwd"] == str(workdir)
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    # arguments that are not ASCII, or not UTF-8 at all, are recorded as Python records them
    arg = "h\u00e9\U0001f600\t\"q\"\\"
    python(alice, "run", "bb", "true", arg, cwd=workdir)
    want = log.read_text().splitlines()[-1]
    r = fast(alice, "run", "bb", "true", arg, cwd=workdir)
    assert took_fast(r)
    got = log.read_text().splitlines()[-1]
    assert json.loads(got)["command"] == json.loads(want)["command"] == ["true", arg]
    assert got.split('"command":', 1)[1].split("]", 1)[0] == want.split('"command":', 1)[1].split("]", 1)[0]


def test_audit_to_the_site_spool(alice: User, workdir: Path, tmp_cwd: Path) -> None:
    spool = tmp_cwd / "spool"
    spool.mkdir()
    spool.chmod(0o1777)
    os.chown(tmp_cwd, 0, 0)
    tmp_cwd.chmod(0o755)
    conf = alice.mkdir(workdir / "conf" / "nagaya")
    (conf / "nagaya.toml").write_text(f'[audit]\nsite_dir = "{spool}"\n')
    env = {"XDG_CONFIG_HOME": str(workdir / "conf")}
    python(alice, "run", "bb", "true", "first", cwd=workdir, env=env)
    r = fast(alice, "run", "bb", "true", "second", cwd=workdir, env=env)
    assert took_fast(r) and r.returncode == 0, r.stderr
    f = spool / f"{alice.name}.jsonl"
    recs = [json.loads(x) for x in f.read_text().splitlines()]
    assert [x["command"] for x in recs] == [["true", "first"], ["true", "second"]]
    assert f.stat().st_uid == alice.uid


def _start(alice: User, workdir: Path, script: str) -> tuple[subprocess.Popen, Path]:
    out = workdir / f"{script}.out"
    out.unlink(missing_ok=True)
    p = alice.popen(["nagaya", "run", "bb", f"/app/{script}", str(out)], env={"NAGAYA_STARTER": "debug"},
                    cwd=workdir, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (out.exists() and out.read_text().strip()):
        assert time.monotonic() < deadline, "the app did not start"
        time.sleep(0.02)
    return p, out


def _wait_for(pred, what: str) -> None:
    deadline = time.monotonic() + 10
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_signals_are_forwarded(alice: User, workdir: Path) -> None:
    python(alice, "run", "bb", "true", cwd=workdir)                     # the plan
    p, out = _start(alice, workdir, "trap.sh")
    sent = []
    for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
        os.kill(p.pid, sig)
        name = sig.name.removeprefix("SIG")
        sent.append(name)
        _wait_for(lambda n=name: n in out.read_text().split(), f"{name} to reach the app")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=10) == 3
    assert FAST in p.stderr.read().decode()
    time.sleep(0.2)
    assert out.read_text().split() == ["ready", *sent, "TERM"]
    # `kill -TERM -PGID` (timeout, scancel) reaches the app, which cleans up
    p, out = _start(alice, workdir, "trap.sh")
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=10) == 3
    assert out.read_text().split()[-1] == "TERM"


def test_stop_and_continue(alice: User, workdir: Path) -> None:
    python(alice, "run", "bb", "true", cwd=workdir)
    p, out = _start(alice, workdir, "tick.sh")
    os.killpg(p.pid, signal.SIGSTOP)
    time.sleep(0.2)
    frozen = out.read_text()
    time.sleep(0.4)
    assert out.read_text() == frozen, "the app kept running while stopped"
    os.killpg(p.pid, signal.SIGCONT)
    _wait_for(lambda: out.read_text() != frozen, "the app to continue")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=10) == 128 + signal.SIGTERM
    assert FAST in p.stderr.read().decode()


def test_sigkill_of_the_starter_leaves_nothing(alice: User, workdir: Path) -> None:
    python(alice, "run", "bb", "true", cwd=workdir)
    p, _out = _start(alice, workdir, "tick.sh")
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    deadline = time.monotonic() + 5
    while any(str(workdir) in x for x in alice.processes()):
        assert time.monotonic() < deadline, alice.processes()
        time.sleep(0.05)


def test_ctrl_c_in_a_terminal(alice: User, workdir: Path) -> None:
    python(alice, "run", "bb", "true", cwd=workdir)
    sock, out = workdir / "tmux.sock", workdir / "trap.out"
    tmux = ["tmux", "-S", str(sock)]
    r = alice.run([*tmux, "new-session", "-d", "-x", "120", "-y", "30", "env", "NAGAYA_STARTER=debug", "nagaya",
                   "run", "bb", "/app/trap.sh", str(out)], cwd=workdir)
    assert r.returncode == 0, r.stderr
    try:
        _wait_for(lambda: out.exists() and "ready" in out.read_text(), "the app to start")
        assert FAST in alice.run([*tmux, "capture-pane", "-p"]).stdout
        alice.run([*tmux, "send-keys", "C-c"])
        _wait_for(lambda: "INT" in out.read_text().split(), "Ctrl-C to reach the app")
        alice.run([*tmux, "send-keys", "C-\\"])
        _wait_for(lambda: "QUIT" in out.read_text().split(), "Ctrl-\\ to reach the app")
        assert out.read_text().split() == ["ready", "INT", "QUIT"]      # each once: not forwarded again
        pane = int(alice.run([*tmux, "list-panes", "-F", "#{pane_pid}"]).stdout.split()[0])
        os.kill(pane, signal.SIGTERM)                                   # the starter (env exec'd it)
        _wait_for(lambda: "TERM" in out.read_text().split(), "TERM to reach the app")
    finally:
        alice.run([*tmux, "kill-server"])


# -- the Python path for everything else ---------------------------------------------------------------


def test_falls_back_for_what_it_does_not_replay(alice: User, workdir: Path) -> None:
    python(alice, "run", "bb", "true", cwd=workdir)
    cases: list[tuple[tuple[str, ...], dict[str, str], str]] = [
        (("run", "--backend", "bwrap", "bb", "true"), {}, "options"),
        (("run", "--gpus", "bb", "true"), {}, ""),          # no GPU here: Python says so (and writes no plan)
        (("run", "--gpus", "0", "--gpus", "1", "-e", "A=1", "bb", "true"), {}, "options"),
        (("run", "-e", "A=1", "bb", "true"), {}, "options"),
        (("run", "bb"), {}, "not a plain run"),
        (("run", "--", "bb"), {}, "no command"),
        (("shell", "bb"), {}, "not a plain run"),
        (("run", "localhost:9/nothing/here:1", "true"), {}, "no plan for this image"),
        (("run", "bb", "true"), {"NAGAYA_RUNTIME_BACKEND": "runc"}, "NAGAYA_ variable"),
        (("run", "bb", "true"), {"XDG_DATA_HOME": str(workdir / "data")}, "environment variable the config reads"),
        (("run", "bb", "true"), {"NAGAYA_STARTER": "off"}, ""),
    ]
    for args, env, why in cases:
        r = fast(alice, *args, env=env, cwd=workdir, input="")
        assert not took_fast(r), args
        if why:
            assert why in python_reason(r), (args, r.stderr)
    # the Python path's own answers are unchanged
    r = fast(alice, "run", "--backend", "bwrap", "bb", "sh", "-c", "exit 6", cwd=workdir)
    assert r.returncode == 6


def test_a_directory_that_needs_a_bind_goes_to_python(alice: User) -> None:
    d = Path(tempfile.mkdtemp(prefix="nagaya-starter-", dir="/var/tmp"))
    os.chown(d, alice.uid, alice.gid)
    try:
        python(alice, "run", "bb", "true", cwd=alice.home)              # a current plan
        r = fast(alice, "run", "bb", "pwd", cwd=d)
        assert "needs a bind" in python_reason(r)
        assert r.returncode == 0 and r.stdout == f"{d}\n"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_changed_config_invalidates_the_plan(alice: User, workdir: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(workdir / "conf")}
    python(alice, "run", "bb", "true", cwd=workdir, env=env)
    assert took_fast(fast(alice, "run", "bb", "true", cwd=workdir, env=env))
    conf = alice.mkdir(workdir / "conf" / "nagaya")
    (conf / "nagaya.toml").write_text("# nothing yet\n")
    r = fast(alice, "run", "bb", "true", cwd=workdir, env=env)
    assert "appeared" in python_reason(r) and r.returncode == 0
    assert took_fast(fast(alice, "run", "bb", "true", cwd=workdir, env=env))    # the Python run wrote a new plan
    (conf / "nagaya.toml").write_text('[runtime]\nbackend = "runc"\n')
    r = fast(alice, "run", "bb", "true", cwd=workdir, env=env)
    assert "changed" in python_reason(r) and r.returncode == 0, r.stderr
    r = fast(alice, "run", "bb", "true", cwd=workdir, env=env)
    assert "changed" in python_reason(r)                                # runc runs are never replayed


def test_a_retagged_image_invalidates_the_plan(alice: User, workdir: Path, rootfs: Path, app_layout: Path) -> None:
    assert alice.nagaya("image", "import", str(rootfs), "--name", "starter-retag").returncode == 0
    python(alice, "run", "starter-retag", "true", cwd=workdir)
    assert took_fast(fast(alice, "run", "starter-retag", "true", cwd=workdir))
    assert alice.nagaya("image", "import", str(app_layout), "--name", "starter-retag").returncode == 0
    r = fast(alice, "exec", "starter-retag", "cat", "/app/data.txt", cwd=workdir)
    assert "changed" in python_reason(r)
    assert r.stdout == "upper data\n"                                   # the new image's file
    alice.nagaya("image", "rm", "starter-retag")
    r = fast(alice, "run", "starter-retag", "true", cwd=workdir)
    assert not took_fast(r) and r.returncode != 0


def test_plan_is_written_only_for_plain_runs(alice: User, workdir: Path, rootfs: Path) -> None:
    from nagaya.runtime.fastplan import plan_name

    assert alice.nagaya("image", "import", str(rootfs), "--name", "starter-plain").returncode == 0
    plan = alice.home / ".cache" / "nagaya" / "starter" / plan_name("starter-plain", os.uname().nodename)
    try:
        plan.unlink(missing_ok=True)
        for opts in (["--backend", "bwrap"], ["--writable-tmpfs"], ["--no-home"], ["--hostname", "h"]):
            r = python(alice, "run", *opts, "starter-plain", "true", cwd=workdir)
            assert r.returncode == 0, r.stderr
            assert not plan.exists(), opts
        alice.nagaya("run", "starter-plain", "true", cwd=workdir, env={"NAGAYA_STARTER": "off"})
        assert not plan.exists()            # a Python run the starter did not ask for a plan writes none
        r = fast(alice, "run", "starter-plain", "true", cwd=workdir)
        assert "no plan" in python_reason(r)    # the starter asks for one
        st = plan.stat()
        assert st.st_uid == alice.uid and st.st_mode & 0o777 == 0o600
        assert plan.parent.stat().st_mode & 0o777 == 0o700
        assert took_fast(fast(alice, "run", "starter-plain", "true", cwd=workdir))
    finally:
        alice.nagaya("image", "rm", "starter-plain")


# -- --gpus over a fake driver layout ------------------------------------------------------------------

GPU_PROBE = PROBE + r"""
ls -la /dev/nvidia* /.nagaya/gpu/lib /.nagaya/gpu/bin /lib/firmware/nvidia 2>&1; nvidia-smi; echo $LD_LIBRARY_PATH
"""


@pytest.fixture
def fake_driver(alice: User, workdir: Path, tmp_cwd: Path) -> tuple[Path, dict[str, str]]:
    tree = tmp_cwd / "driver"
    os.chown(tmp_cwd, 0, 0)
    tmp_cwd.chmod(0o755)
    write_user_config(gpu_layouts.debian(tree, 2), workdir / "conf")
    return tree, {"XDG_CONFIG_HOME": str(workdir / "conf")}


@pytest.mark.parametrize("request_", [(), ("all",), ("1",), ("=0,1",)])
def test_gpus_fast_path_builds_the_same_container(alice: User, workdir: Path, fake_driver, request_) -> None:
    _tree, env = fake_driver
    gpus = ["--gpus" + request_[0]] if request_ and request_[0].startswith("=") else ["--gpus", *request_]
    py, fa = both(alice, "run", *gpus, "bb", "sh", "-c", GPU_PROBE, cwd=workdir, env=env)
    assert py.returncode == 0, py.stderr
    assert fa.returncode == 0 and fa.stdout == py.stdout, fa.stderr
    assert "NVIDIA-SMI" in fa.stdout or "nvidia-smi" in fa.stdout.lower()
    want = "CUDA_VISIBLE_DEVICES=0" if request_ == ("1",) else "CUDA_VISIBLE_DEVICES=0,1"
    assert want in fa.stdout.splitlines()
    log = alice.home / ".local" / "share" / "nagaya" / "audit.jsonl"
    rec = json.loads(log.read_text().splitlines()[-1])
    assert rec["details"]["gpus"] == (request_[0].lstrip("=") if request_ else "all")


def test_gpu_plan_follows_the_driver(alice: User, workdir: Path, fake_driver) -> None:
    tree, env = fake_driver
    python(alice, "run", "--gpus", "bb", "true", cwd=workdir, env=env)
    assert took_fast(fast(alice, "run", "--gpus", "bb", "true", cwd=workdir, env=env))
    version = tree / "proc" / "driver" / "nvidia" / "version"          # the kernel module was upgraded
    version.write_text(version.read_text().replace(gpu_layouts.VERSION, "580.99.01"))
    r = fast(alice, "run", "--gpus", "bb", "true", cwd=workdir, env=env)
    assert "changed" in python_reason(r) and r.returncode == 0, r.stderr
    # the Python runs rediscover the driver (and print its notes once), then write a plan again
    assert any(took_fast(fast(alice, "run", "--gpus", "bb", "true", cwd=workdir, env=env)) for _ in range(3))
    os.mknod(tree / "dev" / "nvidia2", 0o666 | 0o020000, os.makedev(195, 2))   # a GPU more
    r = fast(alice, "run", "--gpus", "bb", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES", cwd=workdir, env=env)
    assert "changed" in python_reason(r) and r.stdout == "0,1,2\n", r.stderr
    r = fast(alice, "run", "--gpus", "bb", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES", cwd=workdir,
             env={**env, "SLURM_STEP_GPUS": "2"})                       # a scheduler's allocation
    assert "environment variable" in python_reason(r) and r.stdout == "0\n", r.stderr


def test_batch_job_record_is_the_same(alice: User, workdir: Path) -> None:
    """Inside a batch job the run leaves the record `nagaya job exec` enters the container by."""
    env = {"SLURM_JOB_ID": "424242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}
    records = Path(f"/tmp/.nagaya-jobs-{alice.uid}")
    record = records / f"slurm-424242-0.0@{os.uname().nodename}.json"
    python(alice, "run", "bb", "true", cwd=workdir)                     # a current plan
    got = {}
    for mode in ("off", "debug"):
        p = alice.popen(["nagaya", "run", "bb", "sleep", "2"], env={**env, "NAGAYA_STARTER": mode}, cwd=workdir,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for(record.exists, "the job record")
        rec = json.loads(record.read_text())
        assert rec["pid"] == p.pid and rec["uid"] == alice.uid
        assert os.stat(f"/proc/{p.pid}/ns/user").st_ino == rec["userns"]
        for k in ("pid", "start", "backend_pid", "userns", "pidns"):
            rec.pop(k)
        rec["env"].pop("NAGAYA_STARTER")
        got[mode] = rec
        assert p.wait(timeout=20) == 0
        assert not record.exists()                                      # removed when the container ends
        if mode == "debug":
            assert FAST in p.stderr.read().decode()
    assert got["debug"] == got["off"]
    assert got["debug"]["argv"] == ["sleep", "2"] and got["debug"]["cwd"] == str(workdir)


def test_a_site_cdi_spec_for_gpus_goes_to_python(alice: User, workdir: Path, fake_driver) -> None:
    """--gpus with a site's CDI spec (its edits, perhaps hooks) is never replayed: the spec decides, in Python."""
    tree, env = fake_driver
    python(alice, "run", "--gpus", "bb", "true", cwd=workdir, env=env)
    assert took_fast(fast(alice, "run", "--gpus", "bb", "true", cwd=workdir, env=env))
    gpu_layouts.cdi_spec(tree, "nvidia.json", {
        "cdiVersion": "0.6.0", "kind": "nvidia.com/gpu",
        "devices": [{"name": "all", "containerEdits": {"deviceNodes": [
            {"path": "/dev/nvidia0", "hostPath": f"{tree}/dev/nvidia0"}]}}],
        "containerEdits": {"env": ["FROM_CDI=nvidia"]}})
    for _ in range(2):
        r = fast(alice, "run", "--gpus", "bb", "sh", "-c", "echo $FROM_CDI", cwd=workdir, env=env)
        assert not took_fast(r) and r.stdout == "nvidia\n", r.stderr


def test_job_exec_enters_a_container_the_starter_made(system: None, rootfs: Path, app_layout: Path) -> None:
    """A local batch job's `nagaya run` takes the fast path (the runner's NAGAYA_JOB_* variables are not the
    config's) and `nagaya job exec` finds and enters its container by the record the starter wrote."""
    from tests.integration.sched_helpers import (
        ensure_users,
        import_images,
        reset_user,
        stop_runner,
        submit,
        wait_state,
    )

    u, _other = ensure_users(("nagaya-sx1", 5200000), ("nagaya-sx2", 5300000))
    reset_user(u)
    import_images(u, rootfs, app_layout)
    # the scheduler's settings in the user's config file: NAGAYA_SCHED_* variables would reach the job
    conf = u.mkdir(u.home / ".config" / "nagaya")
    (conf / "nagaya.toml").write_text('[sched]\nbackend = "local"\nidle_exit = 20\nkill_grace = 2\n')
    records = Path(f"/tmp/.nagaya-jobs-{u.uid}")
    try:
        job = submit(u, "--image", "bb", "--", "sh", "-c", "echo ran")     # its run writes the pinned digest's plan
        assert wait_state(u, job, timeout=60)["state"] == "COMPLETED"
        job = submit(u, "--image", "bb", "--", "sh", "-c", "echo ready; sleep 30")
        _wait_for(lambda: "ready" in u.nagaya("logs", job).stdout, "the app to start")
        rec = json.loads(next(records.glob(f"local-{job}-*.json")).read_text())
        assert Path(f"/proc/{rec['pid']}/exe").resolve() == Path(STARTER)    # the starter supervises it
        r = u.nagaya("job", "exec", job, "--", "sh", "-c", "id -u; cat /proc/1/comm; echo $NAGAYA_CONTAINER")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[:2] == [str(u.uid), "bwrap"] and r.stdout.split()[2].startswith("bb@sha256:")
        u.nagaya("job", "cancel", job)
    finally:
        stop_runner(u)
        subprocess.run(["pkill", "-9", "-u", u.name], check=False)


def test_another_umask_or_a_file_named_like_the_image_goes_to_python(alice: User, workdir: Path) -> None:
    python(alice, "run", "bb", "true", cwd=workdir)
    assert took_fast(fast(alice, "run", "bb", "true", cwd=workdir))
    # the upper layer's files are made with the caller's umask: a plan made under another is not replayed
    r = alice.run(["sh", "-c", "umask 077; exec nagaya run bb stat -c %a /home"], cwd=workdir,
                  env={"NAGAYA_STARTER": "debug"})
    assert "umask" in python_reason(r) and r.returncode == 0, r.stderr
    # a single-file image wins over a cached image of the same name, as `nagaya run` resolves it
    (workdir / "x.nsq").write_text("not an image\n")
    os.chown(workdir / "x.nsq", alice.uid, alice.gid)
    r = fast(alice, "run", "x.nsq", "true", cwd=workdir)
    assert "single-file" in python_reason(r) and r.returncode != 0
