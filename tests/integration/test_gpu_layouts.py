"""`nagaya run --gpus` and `--device` on fake driver layouts modelled on real ones, in real containers on
both backends: exactly which device nodes, libraries, links, tools, firmware and ICD files the container
gets, and which it does not (tests/helpers/gpu_layouts.py builds the trees)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import gpu_layouts as L
from tests.helpers.users import User

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("session_images")]
V = L.VERSION
BASE = Path("/tmp/nagaya-gpu-layouts")
NV_REAL = sorted(f"{n}.{V}" for n in L.NV_LIBS)
NV_LINKS = sorted([*L.NV_LIBS.values(), "libcuda.so"])


@pytest.fixture(params=["bwrap", "runc"])
def backend(request: pytest.FixtureRequest, alice: User):
    yield request.param
    subprocess.run(["pkill", "-9", "-u", alice.name], check=False)


def layout(builder, name: str, alice: User, **kw) -> dict[str, str]:
    BASE.mkdir(mode=0o755, exist_ok=True)
    BASE.chmod(0o755)
    subprocess.run(["rm", "-rf", str(alice.home / ".cache/nagaya/gpu")], check=False)   # notes come once
    return builder(BASE / name, **kw)


def run(alice: User, backend: str, env: dict[str, str], *args: str, script: str, **kw) -> subprocess.CompletedProcess:
    r = alice.nagaya("run", "--backend", backend, *args, "bb", "sh", "-c", script, env=env, **kw)
    assert r.returncode == 0, r.stderr
    return r


SHOW = ("ls /dev | grep -E '^(nvidia|kfd)' | sort | tr '\\n' ' '; echo; ls /dev/dri 2>/dev/null | tr '\\n' ' '; echo; "
        "ls /.nagaya/gpu/lib | sort | tr '\\n' ' '; echo; "
        "for f in /.nagaya/gpu/lib/*; do [ -L $f ] && echo -n \"$(basename $f)>$(readlink $f) \"; done; echo; "
        "ls /.nagaya/gpu/bin 2>/dev/null | tr '\\n' ' '; echo; "
        "ls /lib/firmware/nvidia 2>/dev/null | tr '\\n' ' '; echo")


def shown(r: subprocess.CompletedProcess) -> list[list[str]]:
    return [line.split() for line in r.stdout.splitlines()]


def test_debian_packages(alice: User, backend: str) -> None:
    env = layout(L.debian, "debian", alice, count=2)
    r = run(alice, backend, env, "--gpus", "all", script=SHOW + "; nvidia-smi; nvidia-debugdump; "
            "cat /usr/share/vulkan/icd.d/nvidia_icd.json; echo; cat /etc/OpenCL/vendors/nvidia.icd; "
            "echo $LD_LIBRARY_PATH $CUDA_VISIBLE_DEVICES")
    out = shown(r)
    assert out[0] == ["nvidia-uvm", "nvidia0", "nvidia1", "nvidiactl"]       # nvidia-modeset: not a device
    assert out[2] == sorted(NV_REAL + NV_LINKS)                               # never the other package's libz
    links = dict(x.split(">") for x in out[3])
    assert links == {**{so: f"{n}.{V}" for n, so in L.NV_LIBS.items()}, "libcuda.so": f"libcuda.so.{V}"}
    assert out[4] == ["nvidia-debugdump", "nvidia-smi"]
    assert out[5] == [V]                                                      # not the old driver's firmware
    assert r.stdout.splitlines()[6:] == [f"nvidia-smi {V}", f"nvidia-debugdump {V}",
                                         '{"file_format_version": "1.0.1", "ICD": {"library_path": '
                                         '"libGLX_nvidia.so.0"}}', "libnvidia-opencl.so.1", "/.nagaya/gpu/lib 0,1"]
    assert "note:" not in r.stderr


def test_runfile_installer_skips_the_old_driver(alice: User, backend: str) -> None:
    env = layout(L.runfile, "runfile", alice, count=1)
    r = run(alice, backend, env, "--gpus", script=SHOW)
    out = shown(r)
    assert out[0] == ["nvidia-uvm", "nvidia0", "nvidiactl"]
    assert out[2] == sorted(NV_REAL + NV_LINKS)                               # no libcuda.so.550.54.15
    assert f"skipped {BASE}/runfile/usr/lib64/libcuda.so.{L.OLD}: version {L.OLD}, but the loaded driver is {V}" \
        in r.stderr
    r = run(alice, backend, env, "--gpus", script="true")
    assert "note:" not in r.stderr                                            # once per driver, from the cache


def test_usr_local_nvidia_behind_wrapper_scripts(alice: User, backend: str) -> None:
    env = layout(L.local, "local", alice, count=2)
    r = run(alice, backend, env, "--gpus", "1", script=SHOW + "; nvidia-smi; command -v nvidia-debugdump || echo none")
    out = shown(r)
    assert out[0] == ["nvidia-uvm", "nvidia1", "nvidiactl"]
    assert out[4] == ["nvidia-smi"]
    assert r.stdout.splitlines()[-2:] == [f"nvidia-smi {V} (local)", "none"]  # the driver's binary, not the wrapper
    assert f"nvidia-smi: passed over the script(s) {BASE}/local/usr/bin/nvidia-smi" in r.stderr
    assert "nvidia-debugdump: only script(s) found" in r.stderr


def test_amd_rocm(alice: User, backend: str) -> None:
    env = layout(L.amd, "amd", alice, count=2)
    r = run(alice, backend, env, "--gpus", "1", script=SHOW + "; rocm-smi; echo $ROCR_VISIBLE_DEVICES")
    out = shown(r)
    assert out[0] == ["kfd"] and out[1] == ["renderD129"]                   # the chosen GPU's render node only
    assert out[2] == sorted(["libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.6.1.40091", "libhsa-runtime64.so",
                             "libhsa-runtime64.so.1", "libhsa-runtime64.so.1.13.60100", "librocm_smi64.so",
                             "librocm_smi64.so.7", "librocm_smi64.so.7.2.60100"])
    assert r.stdout.splitlines()[-2:] == ["rocm-smi fake", "0"]
    r = run(alice, backend, {**env, "SLURM_JOB_GPUS": "0"}, "--gpus", script=SHOW)
    assert shown(r)[1] == ["renderD128"]


def test_cdi_specs_nvidia_and_amd(alice: User, backend: str, workdir: Path) -> None:
    env = layout(L.debian, "cdi", alice, count=2)
    root = BASE / "cdi"
    hook_out = workdir / "hook"
    L.cdi_spec(root, "nvidia.yaml", {
        "cdiVersion": "0.6.0", "kind": "nvidia.com/gpu",
        "devices": [{"name": str(i), "containerEdits": {"deviceNodes": [
            {"path": f"/dev/nvidia{i}", "hostPath": f"{root}/dev/nvidia{i}"}]}} for i in range(2)],
        "containerEdits": {
            "env": ["FROM_CDI=nvidia"],
            "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": f"{root}/dev/nvidiactl"}],
            "mounts": [{"hostPath": f"{root}/usr/bin/nvidia-smi", "containerPath": "/usr/bin/nvidia-smi",
                        "options": ["ro", "nosuid", "nodev", "bind"]}],
            "hooks": [{"hookName": "createContainer", "path": "/bin/sh", "env": ["PATH=/usr/bin:/bin"],
                       "args": ["sh", "-c", f"id -u > {hook_out}; cat > {hook_out}.state"]},
                      # as nvidia-ctk's update-ldcache fails without root: reported, and the run goes on
                      {"hookName": "createContainer", "path": "/bin/sh",
                       "args": ["sh", "-c", "echo cannot write /etc/ld.so.cache >&2; exit 1"]},
                      {"hookName": "poststop", "path": "/bin/true"}]}}, yaml_text=True)
    (root / "dev/amd").mkdir()
    L.cdi_spec(root, "amd.json", {
        "cdiVersion": "0.8.0", "kind": "amd.com/gpu",
        "devices": [{"name": "all", "containerEdits": {"env": ["FROM_CDI=amd"], "deviceNodes": [
            {"path": "/dev/kfd", "hostPath": f"{root}/dev/nvidia0"}]}}]})
    script = "ls /dev | grep -E '^(nvidia|kfd)' | sort | tr '\\n' ' '; echo; echo $FROM_CDI; /usr/bin/nvidia-smi"
    r = run(alice, backend, env, "--device", "nvidia.com/gpu=1", script=script, cwd=workdir)
    assert r.stdout.splitlines() == ["nvidia1 nvidiactl ", "nvidia", f"nvidia-smi {V}"]
    assert hook_out.read_text().strip() == str(alice.uid)                 # the hook ran as the user
    assert '"status": "creating"' in hook_out.with_suffix(".state").read_text()
    assert "nagaya: warning: CDI createContainer hook /bin/sh failed: cannot write /etc/ld.so.cache" in r.stderr
    assert "nagaya: note: CDI poststop hook /bin/true not run" in r.stderr
    # the audit record keeps the devices, and `reproduce --run` asks for them again
    audit = alice.home / ".local/share/nagaya/audit.jsonl"
    rec = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()][-1]
    assert rec["action"] == "run" and rec["details"]["devices"] == ["nvidia.com/gpu=1"]
    again = alice.nagaya("reproduce", "--run", rec["id"], env=env, cwd=workdir)
    assert again.returncode == 0 and again.stdout.splitlines()[:2] == ["nvidia1 nvidiactl ", "nvidia"], again.stderr
    r = run(alice, backend, env, "--device", "amd.com/gpu=all", script="ls /dev | grep -c kfd; echo $FROM_CDI")
    assert r.stdout.split() == ["1", "amd"]
    # --gpus takes the site's NVIDIA spec: its devices and mounts, no discovery of its own
    r = run(alice, backend, env, "--gpus", "0", script=script + "; ls /.nagaya 2>&1 | head -1")
    assert r.stdout.splitlines()[:3] == ["nvidia0 nvidiactl ", "nvidia", f"nvidia-smi {V}"]
    r = alice.nagaya("run", "--backend", backend, "--device", "nvidia.com/gpu=5", "bb", "true", env=env)
    assert r.returncode == 2 and "has no device '5'" in r.stderr


@pytest.fixture(scope="module")
def merged_usr(alice: User, rootfs: Path, shared_tmp: Path) -> str:
    """The busybox image with /lib -> usr/lib, as Debian 12, Ubuntu 22.04 and RHEL 9 images have it."""
    d = shared_tmp / "merged-usr"
    subprocess.run(["cp", "-a", str(rootfs), str(d)], check=True)
    (d / "usr/lib").mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", str(d / "lib")], check=True)
    (d / "lib").symlink_to("usr/lib")
    r = alice.nagaya("image", "import", str(d), "--name", "merged-usr")
    assert r.returncode == 0, r.stderr
    return "merged-usr"


def test_firmware_through_a_merged_usr_link(alice: User, backend: str, merged_usr: str) -> None:
    env = layout(L.debian, "merged", alice, count=1)
    r = alice.nagaya("run", "--backend", backend, "--gpus", merged_usr, "sh", "-c",
                     "ls /lib/firmware/nvidia /usr/lib/firmware/nvidia; readlink /lib", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/lib/firmware/nvidia:", V, "/usr/lib/firmware/nvidia:", V, "usr/lib"]
