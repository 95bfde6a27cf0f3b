"""`nagaya run` semantics as an unprivileged user, proven by the same tests on both backends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.fake_gpu import fake_gpus
from tests.helpers.users import User

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("session_images")]
BACKENDS = ["bwrap", "runc"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, alice: User):
    yield request.param
    # A failed test must not leave processes that make the next one fail too.
    subprocess.run(["pkill", "-9", "-u", alice.name], check=False)


def run(user: User, backend: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return user.nagaya("run", "--backend", backend, *args, **kw)


def no_leftovers(user: User, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        procs = user.processes()
        if not procs:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes left behind: {procs}")
        time.sleep(0.05)


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_identity_and_home_cwd_tmp(alice: User, backend: str, workdir: Path) -> None:
    r = run(alice, backend, "bb", "sh", "-c",
            "id -u; id -g; id -un; echo $HOME; pwd; echo made > ./here.txt; echo tmp > /tmp/nagaya-$(id -u).t; "
            "echo home > $HOME/.nagaya-home-test; grep NoNewPrivs /proc/self/status", cwd=workdir)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split()
    assert out[:5] == [str(alice.uid), str(alice.gid), alice.name, str(alice.home), str(workdir)]
    assert out[-1] == "1"                                   # no new privileges
    assert (workdir / "here.txt").read_text() == "made\n"
    assert (workdir / "here.txt").stat().st_uid == alice.uid
    assert Path(f"/tmp/nagaya-{alice.uid}.t").read_text() == "tmp\n"
    assert (alice.home / ".nagaya-home-test").read_text() == "home\n"
    no_leftovers(alice)


def test_image_is_read_only_unless_asked(alice: User, backend: str, workdir: Path) -> None:
    # /var/tmp is world-writable in the image: only the read-only mount stops a write there.
    r = run(alice, backend, "bb", "touch", "/var/tmp/new")
    assert r.returncode == 1 and "Read-only" in r.stderr
    r = run(alice, backend, "--writable-tmpfs", "bb", "sh", "-c", "echo x > /var/tmp/new && cat /var/tmp/new")
    assert r.returncode == 0 and r.stdout == "x\n", r.stderr
    r = run(alice, backend, "bb", "test", "-e", "/var/tmp/new")
    assert r.returncode == 1                                # tmpfs changes vanish
    ov = workdir / "overlay"
    r = run(alice, backend, "--overlay", str(ov), "bb", "sh", "-c", "echo kept > /var/tmp/new")
    assert r.returncode == 0, r.stderr
    r = run(alice, backend, "--overlay", str(ov), "bb", "cat", "/var/tmp/new")
    assert r.stdout.split() == ["kept"], r.stderr
    assert run(alice, backend, "bb", "cat", "/app/data.txt").stdout == "image data\n"


MOUNTS = "awk '{print $5, $9}' /proc/self/mountinfo"


def test_read_only_run_reads_the_image_past_the_overlay(alice: User, backend: str) -> None:
    """bwrap, read-only: the image's top-level directories the overlay's upper layer leaves alone are the image's
    own mount (no overlayfs below them); /etc, where the generated files are, stays in the overlay. A writable
    run and runc keep the whole overlay."""
    r = run(alice, backend, "--entrypoint", "", "app:1", "sh", "-c", f"{MOUNTS}; grep -c ^{alice.name}: /etc/passwd")
    assert r.returncode == 0, r.stderr
    mounts = dict(line.split() for line in r.stdout.splitlines()[:-1] if line.count(" ") == 1)
    assert mounts["/"] == "overlay" and "/etc" not in mounts and r.stdout.splitlines()[-1] == "1"
    if backend == "bwrap":
        assert mounts["/app"] == mounts["/var"] == "nagaya", r.stdout      # the FUSE mount's source
    else:
        assert "/app" not in mounts and "/var" not in mounts, r.stdout
    r = run(alice, backend, "--writable-tmpfs", "bb", "sh", "-c", MOUNTS)
    assert r.returncode == 0 and not [x for x in r.stdout.splitlines() if x.endswith(" nagaya")], r.stdout


def test_binds(alice: User, backend: str, workdir: Path) -> None:
    src = alice.mkdir(workdir / "data")
    (src / "in.txt").write_text("input\n")
    r = run(alice, backend, "--bind", f"{src}:/data", "bb", "sh", "-c", "cat /data/in.txt; echo out > /data/out.txt")
    assert r.returncode == 0 and r.stdout == "input\n", r.stderr
    assert (src / "out.txt").read_text() == "out\n"
    r = run(alice, backend, "-B", f"{src}:/ro:ro", "bb", "sh", "-c", "echo x > /ro/x")
    assert r.returncode != 0 and not (src / "x").exists()
    r = run(alice, backend, "--bind", f"{workdir}/missing:/m", "bb", "true")
    assert r.returncode == 2 and r.stderr.strip() == f"nagaya: bind source {workdir}/missing does not exist"


def test_environment(alice: User, backend: str) -> None:
    env = {"HOST_ONLY": "host", "SHARED": "host", "NAGAYAENV_INJECTED": "yes"}
    script = "echo $HOST_ONLY,$SHARED,$FROM_IMAGE,$INJECTED,$CLI"
    r = run(alice, backend, "--entrypoint", "", "app:1", "sh", "-c", script, env=env)
    assert r.stdout.strip() == "host,image,image,yes,", r.stderr
    r = run(alice, backend, "--env", "CLI=cli", "--env", "SHARED=cli", "--entrypoint", "", "app:1", "sh", "-c", script,
            env=env)
    assert r.stdout.strip() == "host,cli,image,yes,cli"
    r = run(alice, backend, "--cleanenv", "--entrypoint", "", "app:1", "sh", "-c", script + ";echo $HOME", env=env)
    assert r.stdout.split() == [",image,image,,", str(alice.home)]


def test_entrypoint_cmd_workdir(alice: User, backend: str, workdir: Path) -> None:
    r = run(alice, backend, "app:1", cwd=workdir)
    assert r.stdout.split("\n")[:2] == ["ep default", "/app"], r.stderr        # image default: its WORKDIR
    r = run(alice, backend, "app:1", "a", "b c", cwd=workdir)
    assert r.stdout.split("\n")[:2] == ["ep a b c", str(workdir)]              # user's command: the cwd
    r = alice.nagaya("exec", "--backend", backend, "app:1", "echo", "direct")
    assert r.stdout == "direct\n"
    r = run(alice, backend, "--pwd", "/tmp", "app:1")
    assert r.stdout.split("\n")[1] == "/tmp"


def test_setuid_is_ignored(alice: User, backend: str) -> None:
    r = run(alice, backend, "--entrypoint", "", "app:1", "sh", "-c", "ls -l /app/busybox-suid; /app/busybox-suid id -u")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].startswith("-rws")
    assert r.stdout.split()[-1] == str(alice.uid)


@pytest.mark.parametrize(("cmd", "code"), [(["true"], 0), (["sh", "-c", "exit 7"], 7), (["nosuchcmd"], 127),
                                           (["/app/noexec.sh"], 126), (["/app"], 126),
                                           (["sh", "-c", "kill -TERM $$"], 143), (["sh", "-c", "kill -9 $$"], 137)])
def test_exit_codes(alice: User, backend: str, cmd: list[str], code: int) -> None:
    r = run(alice, backend, "bb", *cmd)
    assert r.returncode == code, r.stderr
    if code in (126, 127):
        assert r.stderr.startswith("nagaya: ") and r.stderr.count("\n") == 1
    no_leftovers(alice)


def test_stdio_pass_through(alice: User, backend: str) -> None:
    r = run(alice, backend, "bb", "sh", "-c", "read x; echo got:$x; echo err >&2", input="hello\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "got:hello\n", "err\n")


def _start(alice: User, backend: str, workdir: Path, script: str) -> tuple[subprocess.Popen, Path]:
    out = workdir / f"{script}.out"
    p = alice.popen(["nagaya", "run", "--backend", backend, "bb", f"/app/{script}", str(out)], cwd=workdir,
                    start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: out.exists() and out.read_text().strip() != "", what="the app to start")
    return p, out


def test_signals_reach_the_app(alice: User, backend: str, workdir: Path) -> None:
    p, out = _start(alice, backend, workdir, "trap.sh")
    sent = []
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGALRM):
        os.kill(p.pid, sig)
        name = sig.name.removeprefix("SIG")
        sent.append(name)
        wait_for(lambda n=name: n in out.read_text().split(), what=f"{name} to reach the app")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=10) == 3                      # the app's own exit code after its TERM trap
    assert out.read_text().split() == ["ready", *sent, "TERM"]
    no_leftovers(alice)


def test_group_signal_lets_the_app_clean_up(alice: User, backend: str, workdir: Path) -> None:
    """`kill -TERM -PGID` (timeout, scancel, a shell's kill %1) must reach the app, not kill it hard."""
    p, out = _start(alice, backend, workdir, "trap.sh")
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=10) == 3
    assert out.read_text().split()[-1] == "TERM"
    no_leftovers(alice)


def test_stop_and_continue_the_process_group(alice: User, backend: str, workdir: Path) -> None:
    p, out = _start(alice, backend, workdir, "tick.sh")
    os.killpg(p.pid, signal.SIGSTOP)
    time.sleep(0.2)
    frozen = out.read_text()
    time.sleep(0.4)
    assert out.read_text() == frozen, "the app kept running while stopped"
    os.killpg(p.pid, signal.SIGCONT)
    wait_for(lambda: out.read_text() != frozen, what="the app to continue")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=10) == 128 + signal.SIGTERM
    no_leftovers(alice)


def test_sigkill_of_nagaya_leaves_nothing(alice: User, backend: str, workdir: Path) -> None:
    p, _out = _start(alice, backend, workdir, "tick.sh")
    assert any("squashfuse" in x or "nagaya-squashfs" in x for x in alice.processes(keepers=True))
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    no_leftovers(alice)
    with open("/proc/self/mountinfo") as f:
        assert "squashfuse" not in f.read() and "nagaya" not in f.read()


def test_audit_record(alice: User, backend: str, workdir: Path) -> None:
    r = run(alice, backend, "bb", "sh", "-c", "exit 5", cwd=workdir)
    assert r.returncode == 5
    log = alice.home / ".local" / "share" / "nagaya" / "audit.jsonl"
    rec = json.loads(log.read_text().splitlines()[-1])
    assert rec["action"] == "run" and rec["user"] == alice.name and rec["exit_code"] == 5
    assert rec["command"] == ["sh", "-c", "exit 5"] and rec["cwd"] == str(workdir)
    assert rec["digest"].startswith("sha256:") and rec["duration_s"] > 0 and rec["host"]
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_interactive_shell_under_tmux(alice: User, backend: str, workdir: Path) -> None:
    sock = workdir / "tmux.sock"
    tmux = ["tmux", "-S", str(sock)]
    r = alice.run([*tmux, "new-session", "-d", "-x", "120", "-y", "30", "nagaya", "shell", "--backend", backend, "bb"],
                  cwd=workdir)
    assert r.returncode == 0, r.stderr

    def screen() -> str:
        return alice.run([*tmux, "capture-pane", "-p"]).stdout

    # Keys typed before the shell reads them wait in the terminal's buffer, as they would for a person.
    alice.run([*tmux, "send-keys", "echo $((6*7)); test -t 0 && echo stdin-is-a-tty; id -u", "Enter"])
    wait_for(lambda: "42" in screen(), what="the command's output")
    assert str(alice.uid) in screen()
    if backend == "bwrap":
        # runc starts the container in a session of its own, without a controlling terminal (README).
        assert "Nagaya>" in screen() and "stdin-is-a-tty" in screen()
    alice.run([*tmux, "send-keys", "exit", "Enter"])
    wait_for(lambda: alice.run([*tmux, "has-session"]).returncode != 0, what="the shell to exit")
    alice.run([*tmux, "kill-server"])
    no_leftovers(alice)


def test_gpu_passthrough_with_fake_devices(alice: User, backend: str, workdir: Path) -> None:
    env = fake_gpus(Path("/tmp/nagaya-fake-gpu"), 2)
    script = "ls /dev | grep nvidia | sort | tr '\\n' ' '; echo; cat /.nagaya/gpu/lib/libcuda.so.1; nvidia-smi; " \
             "echo $LD_LIBRARY_PATH $NVIDIA_VISIBLE_DEVICES"
    r = run(alice, backend, "--gpus", "all", "bb", "sh", "-c", script, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["nvidia0", "nvidia1", "nvidiactl"]
    assert lines[1:3] == ["fake cuda driver", "NVIDIA-SMI fake"]
    assert lines[3] == "/.nagaya/gpu/lib 0,1"
    r = run(alice, backend, "--gpus", "1", "bb", "sh", "-c", "ls /dev | grep nvidia | tr '\\n' ' '", env=env)
    assert r.stdout.split() == ["nvidia1", "nvidiactl"], r.stderr
    r = run(alice, backend, "--gpus", "3", "bb", "true", env=env)
    assert r.returncode == 2 and "no GPU 3" in r.stderr
    r = run(alice, backend, "bb", "sh", "-c", "ls /dev | grep -c nvidia", env=env)
    assert r.stdout.strip() == "0"                          # no --gpus: nothing passed through
    # Inside a Slurm allocation "all" is the job's GPUs and indices count within it; the host's global
    # CUDA_VISIBLE_DEVICES is renumbered for the devices the container has.
    slurm = {**env, "SLURM_JOB_GPUS": "1", "CUDA_VISIBLE_DEVICES": "1"}
    show = "ls /dev | grep nvidia | tr '\\n' ' '; echo; echo $NVIDIA_VISIBLE_DEVICES $CUDA_VISIBLE_DEVICES"
    for req in ("all", "0"):
        r = run(alice, backend, "--gpus", req, "bb", "sh", "-c", show, env=slurm)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0].split() == ["nvidia1", "nvidiactl"]
        assert r.stdout.splitlines()[1] == "1 0"
    r = run(alice, backend, "--gpus", "1", "bb", "true", env=slurm)
    assert r.returncode == 2 and "allocation of 1 GPU" in r.stderr, r.stderr
