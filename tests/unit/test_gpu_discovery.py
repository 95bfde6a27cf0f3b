"""GPU discovery on fake driver layouts modelled on real ones: exactly which files are bound, which are
skipped and why; the ld.so cache read directly; the per-node cache; CDI specs and their trust rules; AMD."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nagaya import config
from nagaya.errors import UsageError
from nagaya.runtime import cdi, elf, gpu, gpudisc, ldcache
from tests.helpers import gpu_layouts as L
from tests.helpers.fake_gpu import tiny_elf

V = L.VERSION
NV_LINKS = {"libcuda.so.1": f"libcuda.so.{V}", "libcuda.so": f"libcuda.so.{V}",
            "libnvidia-ml.so.1": f"libnvidia-ml.so.{V}",
            "libnvidia-ptxjitcompiler.so.1": f"libnvidia-ptxjitcompiler.so.{V}",
            "libnvidia-opencl.so.1": f"libnvidia-opencl.so.{V}", "libGLX_nvidia.so.0": f"libGLX_nvidia.so.{V}",
            "libEGL_nvidia.so.0": f"libEGL_nvidia.so.{V}"}
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="fake device nodes need mknod (root)")


def cfg_for(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> config.GpuConfig:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(config, "SITE_CONFIG", "/nonexistent/nagaya.toml", raising=False)
    return config.load().gpu


def table(p: gpu.GpuPlan, root: Path) -> list[tuple[str, str, str]]:
    return [(b.src.replace(str(root), "R"), b.dst, "dev" if b.device else ("ro" if b.readonly else "rw"))
            for b in p.binds]


# -- the ld.so cache and ELF ------------------------------------------------------------------------
def test_ld_cache_read_directly_matches_ldconfig() -> None:
    if not os.path.exists("/etc/ld.so.cache") or not shutil.which("ldconfig"):
        pytest.skip("no ld.so cache here")
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    want = [(m.group(1), m.group(3)) for line in out.splitlines()
            if (m := re.match(r"\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)", line)) and "x86-64" in m.group(2)]
    if os.uname().machine != "x86_64":
        pytest.skip("compared on x86_64 only")
    assert ldcache.read("/etc/ld.so.cache") == want


def test_ld_cache_round_trip_and_arch_filter() -> None:
    data = ldcache.build([("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1")])
    assert ldcache.parse(data, "x86_64") == [("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1")]
    assert ldcache.parse(data, "aarch64") == []                  # another architecture's entries
    assert ldcache.parse(b"ld.so-1.7.0" + bytes(8) + data, "x86_64")  # after the old format's table
    assert ldcache.parse(data[:60], "x86_64") == []               # truncated: nothing, no exception
    assert ldcache.parse(b"garbage", "x86_64") == []


def test_elf_checks(tmp_path: Path) -> None:
    so = tmp_path / "libcuda.so.580.65.06"
    so.write_bytes(L.fake_so("libcuda.so.1"))
    assert elf.soname(str(so)) == "libcuda.so.1"
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\nexec /usr/local/nvidia/bin/nvidia-smi\n")
    assert not elf.is_elf(str(script)) and elf.soname(str(script)) == ""
    tool = tmp_path / "tool"
    tool.write_bytes(tiny_elf("x\n"))
    assert elf.is_elf(str(tool)) and elf.soname(str(tool)) == ""
    libz = Path("/lib/x86_64-linux-gnu/libz.so.1")
    if libz.exists():
        assert elf.soname(str(libz)) == "libz.so.1"


def test_driver_version_from_proc_then_sys(tmp_path: Path) -> None:
    c = config.GpuConfig(root=str(tmp_path))
    assert gpudisc.driver_version(c) == ""
    (tmp_path / "sys/module/nvidia").mkdir(parents=True)
    (tmp_path / "sys/module/nvidia/version").write_text("550.54.15\n")
    assert gpudisc.driver_version(c) == "550.54.15"
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:20 UTC 2025\n")
    assert gpudisc.driver_version(c) == "580.65.06"


# -- layouts -----------------------------------------------------------------------------------------
@root_only
def test_debian_packages_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "deb"
    c = cfg_for(L.debian(root, 2), monkeypatch)
    p = gpu.plan("all", c, env={"PATH": "/usr/bin"}, cache_root=str(tmp_path / "cache"))
    lib = "R/usr/lib/x86_64-linux-gnu"
    assert table(p, root) == [
        ("R/dev/nvidia0", "/dev/nvidia0", "dev"), ("R/dev/nvidia1", "/dev/nvidia1", "dev"),
        ("R/dev/nvidiactl", "/dev/nvidiactl", "dev"), ("R/dev/nvidia-uvm", "/dev/nvidia-uvm", "dev"),
        # (nvidia-modeset is a regular file in this tree: never bound as a device)
        *[(f"{lib}/{n}.{V}", f"/.nagaya/gpu/lib/{n}.{V}", "ro") for n in
          ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so", "libnvidia-opencl.so",
           "libGLX_nvidia.so", "libEGL_nvidia.so")],
        ("R/usr/bin/nvidia-smi", "/.nagaya/gpu/bin/nvidia-smi", "ro"),
        ("R/usr/bin/nvidia-debugdump", "/.nagaya/gpu/bin/nvidia-debugdump", "ro"),
        (f"R/lib/firmware/nvidia/{V}", f"/lib/firmware/nvidia/{V}", "ro"),     # not the old driver's
        ("R/usr/share/vulkan/icd.d/nvidia_icd.json", "/usr/share/vulkan/icd.d/nvidia_icd.json", "ro"),
        ("R/usr/share/glvnd/egl_vendor.d/10_nvidia.json", "/usr/share/glvnd/egl_vendor.d/10_nvidia.json", "ro"),
        ("R/etc/OpenCL/vendors/nvidia.icd", "/etc/OpenCL/vendors/nvidia.icd", "ro"),
    ]
    assert p.links == {f"/.nagaya/gpu/lib/{k}": v for k, v in NV_LINKS.items()}
    assert p.env == {"NVIDIA_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert p.notes == [] and p.paths


@root_only
def test_runfile_layout_skips_the_previous_drivers_libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "run"
    c = cfg_for(L.runfile(root, 1), monkeypatch)
    p = gpu.plan("0", c, env={"PATH": "/usr/bin"}, cache_root=str(tmp_path / "cache"))
    libs = sorted(d for _s, d, _m in table(p, root) if d.startswith("/.nagaya/gpu/lib/"))
    assert libs == sorted(f"/.nagaya/gpu/lib/{n}.{V}" for n in
                          ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so", "libnvidia-opencl.so",
                           "libGLX_nvidia.so", "libEGL_nvidia.so"))
    assert p.links["/.nagaya/gpu/lib/libcuda.so.1"] == f"libcuda.so.{V}"
    assert p.notes == [f"skipped {root}/usr/lib64/{n}.{L.OLD}: version {L.OLD}, but the loaded driver is {V}"
                       for n in ("libcuda.so", "libnvidia-ml.so")]


@root_only
def test_usr_local_nvidia_with_wrapper_scripts_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "loc"
    c = cfg_for(L.local(root, 2), monkeypatch)
    p = gpu.plan("1", c, env={"PATH": "/usr/bin"}, cache_root=str(tmp_path / "cache"))
    t = table(p, root)
    assert [x for x in t if x[1].startswith("/.nagaya/gpu/bin/")] == [
        ("R/usr/local/nvidia/bin/nvidia-smi", "/.nagaya/gpu/bin/nvidia-smi", "ro")]   # not the wrapper
    assert ("R/dev/nvidia1", "/dev/nvidia1", "dev") in t and ("R/dev/nvidia0", "/dev/nvidia0", "dev") not in t
    assert all(s.startswith("R/usr/local/nvidia/lib64/") for s, d, _m in t if d.startswith("/.nagaya/gpu/lib/"))
    assert p.notes == [
        f"nvidia-smi: passed over the script(s) {root}/usr/bin/nvidia-smi for {root}/usr/local/nvidia/bin/nvidia-smi",
        f"nvidia-debugdump: only script(s) found ({root}/usr/bin/nvidia-debugdump), no ELF binary: not passed through"]
    assert p.env == {"NVIDIA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0"}


@root_only
def test_results_cached_per_node_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "deb"
    c = cfg_for(L.debian(root, 1), monkeypatch)
    cache = str(tmp_path / "cache")
    first = gpudisc.discover(c, "nvidia", cache, "/usr/bin")
    again = gpudisc.discover(c, "nvidia", cache, "/usr/bin")
    assert not first["cached"] and again["cached"]
    assert {k: v for k, v in first.items() if k != "cached"} == {k: v for k, v in again.items() if k != "cached"}
    assert os.listdir(os.path.join(cache, "gpu")) == [f"{os.uname().nodename}-nvidia.marshal"]
    # a new driver: another version in /proc, new libraries, ldconfig rewrites its cache
    (root / "proc/driver/nvidia/version").write_text("NVRM version: NVIDIA UNIX Kernel Module  580.82.07  x\n")
    after = gpudisc.discover(c, "nvidia", cache, "/usr/bin")
    assert not after["cached"] and after["version"] == "580.82.07"
    assert after["libs"] == [] and len(after["notes"]) == 6            # every 580.65.06 library is stale now
    assert gpudisc.discover(c, "nvidia", cache, "/usr/bin")["cached"]
    os.utime(root / "etc/ld.so.cache", ns=(1, 1))
    assert not gpudisc.discover(c, "nvidia", cache, "/usr/bin")["cached"]


@root_only
def test_nvidia_container_cli_list_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "deb"
    env = L.debian(root, 1)
    lib = root / "usr/lib/x86_64-linux-gnu"
    cli = tmp_path / "nvidia-container-cli"
    cli.write_text("#!/bin/sh\n[ \"$1\" = list ] || exit 1\ncat <<EOF\n/dev/nvidiactl\n/dev/nvidia0\n"
                   f"{root}/usr/bin/nvidia-smi\n{lib}/libcuda.so.{V}\n{lib}/libnvidia-ml.so.{V}\n"
                   f"/run/nvidia-persistenced/socket\nEOF\n")
    cli.chmod(0o755)
    c = cfg_for({**env, "NAGAYA_GPU_CONTAINER_CLI": str(cli)}, monkeypatch)
    found = gpudisc.discover(c, "nvidia", str(tmp_path / "cache"), "/usr/bin")
    assert found["source"] == "nvidia-container-cli"
    assert found["libs"] == [(f"{lib}/libcuda.so.{V}", f"libcuda.so.{V}"),
                             (f"{lib}/libnvidia-ml.so.{V}", f"libnvidia-ml.so.{V}")]
    assert found["links"] == [("libcuda.so.1", f"libcuda.so.{V}"), ("libnvidia-ml.so.1", f"libnvidia-ml.so.{V}")]
    assert found["bins"] == [(f"{root}/usr/bin/nvidia-smi", "nvidia-smi")]
    assert ("/run/nvidia-persistenced/socket", "/run/nvidia-persistenced/socket") in found["files"]


@root_only
def test_amd_layout_and_allocations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "amd"
    c = cfg_for(L.amd(root, 2), monkeypatch)
    p = gpu.plan("all", c, env={"PATH": "/usr/bin"}, cache_root=str(tmp_path / "cache"))
    assert table(p, root) == [
        ("R/dev/kfd", "/dev/kfd", "dev"), ("R/dev/dri/renderD128", "/dev/dri/renderD128", "dev"),
        ("R/dev/dri/renderD129", "/dev/dri/renderD129", "dev"),
        ("R/opt/rocm/lib/libamdhip64.so.6.1.40091", "/.nagaya/gpu/lib/libamdhip64.so.6.1.40091", "ro"),
        ("R/opt/rocm/lib/libhsa-runtime64.so.1.13.60100", "/.nagaya/gpu/lib/libhsa-runtime64.so.1.13.60100", "ro"),
        ("R/opt/rocm/lib/librocm_smi64.so.7.2.60100", "/.nagaya/gpu/lib/librocm_smi64.so.7.2.60100", "ro"),
        ("R/opt/rocm/bin/rocm-smi", "/.nagaya/gpu/bin/rocm-smi", "ro")]
    assert p.links["/.nagaya/gpu/lib/libamdhip64.so.6"] == "libamdhip64.so.6.1.40091"
    assert p.env == {"ROCR_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": "0,1"}
    # the scheduler's allocation: Slurm's GPU variables, or ROCR_VISIBLE_DEVICES as a scheduler sets it
    for alloc in ({"SLURM_JOB_GPUS": "1"}, {"ROCR_VISIBLE_DEVICES": "1"}):
        p = gpu.plan("all", c, env={"PATH": "/usr/bin", **alloc}, cache_root=str(tmp_path / "cache"))
        assert [b.dst for b in p.binds if b.device] == ["/dev/kfd", "/dev/dri/renderD129"]
        assert p.env["ROCR_VISIBLE_DEVICES"] == "0"
    with pytest.raises(UsageError, match="allocation of 1 GPU"):
        gpu.plan("1", c, env={"SLURM_STEP_GPUS": "0"}, cache_root=str(tmp_path / "cache"))


# -- CDI ------------------------------------------------------------------------------------------------
def nvidia_spec(root: Path) -> dict:
    return {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
            "devices": [{"name": str(i), "containerEdits": {"deviceNodes": [{"path": f"/dev/nvidia{i}",
                                                                             "hostPath": f"{root}/dev/nvidia{i}"}]}}
                        for i in range(2)] + [{"name": "all", "containerEdits": {"deviceNodes": [
                            {"path": f"/dev/nvidia{i}", "hostPath": f"{root}/dev/nvidia{i}"} for i in range(2)]}}],
            "containerEdits": {
                "env": ["NVIDIA_VISIBLE_DEVICES=void", "FROM_CDI=yes"],
                "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": f"{root}/dev/nvidiactl"},
                                {"path": "/dev/nvidia-modeset", "hostPath": f"{root}/dev/nvidia-modeset"}],
                "mounts": [{"hostPath": f"{root}/usr/bin/nvidia-smi", "containerPath": "/usr/bin/nvidia-smi",
                            "options": ["ro", "nosuid", "nodev", "bind"]},
                           {"hostPath": f"{root}/missing", "containerPath": "/missing", "options": ["ro"]}],
                "hooks": [{"hookName": "createContainer", "path": "/bin/sh", "args": ["sh", "-c", "true"]}]}}


@root_only
def test_cdi_devices_edits_and_gpus_prefers_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "deb"
    env = L.debian(root, 2)
    L.cdi_spec(root, "nvidia.yaml", nvidia_spec(root), yaml_text=True)
    c = cfg_for(env, monkeypatch)
    p = gpu.device_plan(["nvidia.com/gpu=1"], c, str(tmp_path / "cache"))
    assert table(p, root) == [("R/dev/nvidiactl", "/dev/nvidiactl", "dev"),
                              ("R/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi", "ro"),
                              ("R/dev/nvidia1", "/dev/nvidia1", "dev")]
    assert p.notes == [f"CDI device node {root}/dev/nvidia-modeset skipped: not a character device on this host",
                       f"CDI mount source {root}/missing skipped: it does not exist"]
    assert p.env == {"NVIDIA_VISIBLE_DEVICES": "void", "FROM_CDI": "yes"}
    assert [h["hookName"] for h in p.hooks] == ["createContainer"] and not p.paths
    # --gpus uses the site's spec: its device names, the visible-device variables renumbered
    g = gpu.plan("1", c, env={"PATH": "/usr/bin"}, cache_root=str(tmp_path / "cache"))
    assert g.source == f"{root}/etc/cdi/nvidia.yaml" and not g.paths
    assert [b.dst for b in g.binds if b.device] == ["/dev/nvidiactl", "/dev/nvidia1"]
    assert g.env["CUDA_VISIBLE_DEVICES"] == "0" and g.env["NVIDIA_VISIBLE_DEVICES"] == "1"
    g = gpu.plan("all", c, env={"PATH": "/usr/bin"}, cache_root=str(tmp_path / "cache"))
    assert [b.dst for b in g.binds if b.device] == ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia1"]
    with pytest.raises(UsageError, match="has no device '7'"):
        gpu.device_plan(["nvidia.com/gpu=7"], c, str(tmp_path / "cache"))
    with pytest.raises(UsageError, match=r"no CDI spec for amd\.com/gpu"):
        gpu.device_plan(["amd.com/gpu=all"], c, str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="expected a CDI device name"):
        gpu.device_plan(["/dev/nvidia0"], c, str(tmp_path / "cache"))


@root_only
def test_cdi_trust_versions_and_formats(tmp_path: Path) -> None:
    d = tmp_path / "cdi"
    d.mkdir()
    tmp_path.chmod(0o755)
    d.chmod(0o755)
    base = {"kind": "amd.com/gpu", "devices": [{"name": "0", "containerEdits": {"env": ["A=1"]}}]}
    for i, v in enumerate(("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0")):
        (d / f"ok{i}.json").write_text(__import__("json").dumps({**base, "cdiVersion": v}))
    (d / "future.json").write_text(__import__("json").dumps({**base, "cdiVersion": "0.9.0"}))
    (d / "bad.yaml").write_text("kind: [unclosed\n")
    (d / "theirs.json").write_text(__import__("json").dumps({**base, "cdiVersion": "0.5.0"}))
    os.chown(d / "theirs.json", 65534, 65534)                    # not root's: never trusted
    os.symlink(d / "ok0.json", d / "link.json")                  # links are not followed
    specs, notes = cdi.load([str(d)])
    assert sorted(os.path.basename(s["_file"]) for s in specs) == [f"ok{i}.json" for i in range(6)]
    assert any("future.json ignored: cdiVersion '0.9.0'" in n for n in notes)
    assert any("bad.yaml ignored: not valid YAML" in n for n in notes)
    assert any("theirs.json ignored" in n for n in notes)
    assert any("link.json ignored" in n for n in notes)
    # a directory others can write is not trusted at all
    d.chmod(0o777)
    specs, notes = cdi.load([str(d)])
    assert specs == [] and "writable by other accounts" in notes[0]


def test_cdi_device_names() -> None:
    assert cdi.is_device_name("nvidia.com/gpu=0") and cdi.is_device_name("amd.com/gpu=all")
    assert not cdi.is_device_name("gpu=0") and not cdi.is_device_name("nvidia.com/gpu") and \
        not cdi.is_device_name("nvidia/gpu=0")


@root_only
def test_gpus_falls_back_to_discovery_when_the_spec_names_devices_otherwise(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "deb"
    env = L.debian(root, 2)
    uuid = "GPU-4f3a9c2e-0000-1111-2222-333344445555"
    L.cdi_spec(root, "nvidia.json", {"cdiVersion": "0.7.0", "kind": "nvidia.com/gpu", "devices": [
        {"name": uuid, "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0",
                                                           "hostPath": f"{root}/dev/nvidia0"}]}}]})
    c = cfg_for(env, monkeypatch)
    p = gpu.plan("0", c, env={"PATH": "/usr/bin"}, cache_root=str(tmp_path / "cache"))
    assert p.paths and p.source == "nvidia"
    assert p.notes[0] == (f"the CDI spec for nvidia.com/gpu names no device 0 (it has {uuid}): "
                          "--gpus finds the driver itself")
    p = gpu.device_plan([f"nvidia.com/gpu={uuid}"], c, str(tmp_path / "cache"))
    assert [b.dst for b in p.binds] == ["/dev/nvidia0"]
