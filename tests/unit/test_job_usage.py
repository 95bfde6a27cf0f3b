"""The local executor's usage sampler (sched/usage.py) on real processes started here, as this user."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from nagaya.sched.models import UsageSample
from nagaya.sched.slurm import tres
from nagaya.sched.usage import Sampler, append, measure, read

ALLOC = 64 << 20

# A parent that starts a child in a new session (as a container's processes may be): the child burns CPU
# and holds ALLOC bytes resident; the sampler must count it through the parent links, not the group.
CHILD = f"""
import os, time
buf = bytearray(os.urandom(1 << 20)) * {ALLOC >> 20}
print("ready", flush=True)
end = time.time() + 60
while time.time() < end:
    sum(range(10000))
"""
PARENT = f"""
import subprocess, sys
p = subprocess.Popen([sys.executable, "-c", {CHILD!r}], start_new_session=True, stdout=sys.stdout)
p.wait()
"""


def test_sampler_sees_cpu_and_memory_of_the_whole_tree(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        path = tmp_path / "7.usage"
        s = Sampler(proc.pid, path, gpus=2, interval=0.5)
        first = s.tick(0.0)
        assert first is not None and first.processes == 2
        assert s.tick(0.1) is None                          # within the interval: no reading
        deadline = time.monotonic() + 60
        while True:                                         # CPU time rises (however slow the machine is)
            time.sleep(0.5)
            later = s.tick(time.monotonic() + 1e6)
            assert later is not None
            s.next_at = 0.0
            if later.cpu_seconds > first.cpu_seconds + 0.3 or time.monotonic() > deadline:
                break
        assert later.cpu_seconds > first.cpu_seconds
        assert later.cpu_cores > 0
        assert later.rss_bytes > ALLOC
        assert later.gpus == 2
        rows = read(path)
        assert len(rows) >= 2 and rows[0]["cpu_seconds"] == first.cpu_seconds
        assert rows[-1]["rss_bytes"] == later.rss_bytes
        assert [json.loads(x) for x in path.read_text().splitlines()] == rows
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)     # the child, by its parent
        proc.kill()
        proc.wait()


def test_a_gone_process_reads_as_nothing() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    s = measure(p.pid)
    assert s.processes == 0 and s.rss_bytes == 0 and s.cpu_seconds == 0


def test_the_file_is_capped_but_keeps_the_whole_span(tmp_path: Path) -> None:
    path = tmp_path / "1.usage"
    for i in range(400):
        append(path, UsageSample(t=float(i), cpu_seconds=float(i)), cap=4096)
    rows = read(path)
    assert path.stat().st_size <= 4096 + 200
    assert rows[0]["t"] == 0.0 and rows[-1]["t"] == 399.0   # oldest and newest survive thinning
    assert len(rows) < 400
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)


def test_damaged_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "2.usage"
    path.write_text('{"t": 1, "cpu_seconds": 2}\nnot json\n[1]\n{"t": 3, "bogus": 1}\n{"t": "x"}\n'
                    '{"t": 4, "rss_bytes": "<script>"}\n{"t": NaN}\n{"cpu_seconds": 1}\n{"t": 5, "gpus": [1]}\n')
    rows = read(path)
    assert [r["t"] for r in rows] == [1, 3]
    assert all(isinstance(r["rss_bytes"], int) and isinstance(r["cpu_cores"], float) for r in rows)
    assert read(tmp_path / "missing.usage") == []


def test_slurm_tres_strings() -> None:
    assert tres("cpu=00:01:05,mem=1.50M,energy=0") == {"cpu": 65.0, "mem": 1.5 * (1 << 20)}
    assert tres("cpu=1-00:00:01,mem=100K") == {"cpu": 86401.0, "mem": 102400.0}
    assert tres("") == {}
