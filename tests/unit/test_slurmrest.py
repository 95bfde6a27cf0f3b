"""The slurmrestd backend's pure parts: the JWT it mints, the refusals before any request, memory forms,
and the batch script it shares with the CLI's slurm backend."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from nagaya.errors import PermissionDenied, UsageError
from nagaya.sched.models import JobSpec
from nagaya.sched.onbehalf import JobsUnavailable
from nagaya.sched.slurm import batch_script, job_info
from nagaya.sched.slurmrest import SlurmRest, check_key, mem_mb, mint


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_mint_is_an_hs256_token_for_the_user() -> None:
    key = os.urandom(32)
    tok = mint("alice", key, ttl=60, now=1000)
    head, body, sig = tok.split(".")
    assert json.loads(_b64decode(head)) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(_b64decode(body)) == {"iat": 1000, "exp": 1060, "sun": "alice"}
    assert _b64decode(sig) == hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert mint("alice", os.urandom(32), now=1000) != tok


def test_mem_forms() -> None:
    assert mem_mb("500") == 500 and mem_mb("500M") == 500 and mem_mb("4G") == 4096 and mem_mb("2gb") == 2048
    assert mem_mb("1T") == 1024 * 1024 and mem_mb("2048K") == 2
    for bad in ("", "G", "lots", "-1G", "1.5G"):
        with pytest.raises(UsageError):
            mem_mb(bad)


def test_key_readable_by_everyone_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "jwt.key"
    key.write_bytes(b"secret")
    key.chmod(0o644)
    with pytest.raises(JobsUnavailable, match="readable by every user"):
        check_key(key)
    key.chmod(0o600)
    assert check_key(key) == b"secret"
    with pytest.raises(JobsUnavailable, match="cannot read"):
        check_key(tmp_path / "missing")


@pytest.mark.parametrize("who", ["root", "daemon", "nobody", "no-such-user-xyz", "svc"])
def test_no_token_for_root_system_or_service_accounts(tmp_path: Path, who: str) -> None:
    # Refused before any request: the URL leads nowhere and the key does not exist.
    gw = SlurmRest("http://127.0.0.1:9", tmp_path / "none", tmp_path, service_account="svc")
    with pytest.raises(PermissionDenied):
        gw.for_user(who).list()


def test_portal_script_pulls_before_the_step() -> None:
    spec = JobSpec(image="r:5000/p/bb:1", ref="r:5000/p/bb@sha256:ab", digest="sha256:ab", command=["id", "-u"])
    script = batch_script(spec, "/usr/local/bin/nagaya", ("echo first",))
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh" and lines[-1] == "exec srun /usr/local/bin/nagaya run r:5000/p/bb@sha256:ab id -u"
    assert lines.index("echo first") < len(lines) - 1
    assert batch_script(spec, "nagaya") == script.replace("echo first\n", "").replace("/usr/local/bin/", "")


def test_job_info_from_slurm_json() -> None:
    j = {"job_id": 7, "user_name": "alice", "job_state": "COMPLETED", "name": "x", "exit_code": 0,
         "comment": "nagaya sha256:ab r:5000/p/bb@sha256:ab", "nodes": "n1", "time_limit": 5, "cpus": 2,
         "state_reason": "None", "standard_output": "/logs/slurm-%j.out", "submit_time": 0}
    info = job_info(j)
    assert (info.id, info.user, info.state, info.digest, info.image) == \
        ("7", "alice", "COMPLETED", "sha256:ab", "r:5000/p/bb@sha256:ab")
    assert (info.time_limit, info.cpus, info.reason, info.exit_code, info.log) == (300, 2, "", 0, "/logs/slurm-%j.out")
    assert job_info({**j, "job_state": "RUNNING"}).exit_code is None
    assert job_info({**j, "job_state": "FAILED", "exit_code": 768}).exit_code == 3         # a raw wait status
    assert job_info({**j, "job_state": "CANCELLED", "exit_code": 15}).exit_code == 128 + 15
