"""`nagaya admin maintain`: the periodic site job (cron or a systemd timer on the site host, as root or the
service account). Idempotent, and one run at a time (an flock in the state dir; a second run reports that
it skipped). Steps: retention (delete expired manifests through the registry API, so the index and the
registry agree), then the registry's own `garbage-collect` with the registry stopped, as its documentation
requires: its mark phase walks every manifest still present, so no blob a manifest references is removed,
whichever repositories share it."""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from nagaya.config import Config
from nagaya.errors import SiteError
from nagaya.server import site as site_mod
from nagaya.server.settings import ServerSettings
from nagaya.store import lifecycle
from nagaya.store.service import SiteService, forget_manifest

LOCK = "maintain.lock"
ACTOR = "$nagaya-maintain"
GC_TIMEOUT = 1800


def become_service_account(cfg: Config) -> None:
    """Root drops to the service account first: the database, keys and registry storage are its files,
    and anything this job creates must stay readable by the daemons."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(cfg.server.user)
    if pw.pw_uid == 0:
        raise SiteError(f"service account {cfg.server.user!r} is root; refusing to run as root")
    os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


def maintain(cfg: Config, state_dir: Path | None, *, dry_run: bool, now: datetime, gc: bool = True) -> dict[str, Any]:
    state_dir = site_mod.find_state_dir(cfg, state_dir).absolute()
    become_service_account(cfg)
    fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"skipped": "another maintenance run holds the lock", "dry_run": dry_run}
        from nagaya.server.app import Site

        site = Site(ServerSettings.load(state_dir / "server.json"))
        try:
            report: dict[str, Any] = {"dry_run": dry_run, "now": now.isoformat() + "Z", "skipped": None}
            report["retention"] = apply_retention(site, dry_run)
            report["gc"] = garbage_collect(cfg, state_dir, dry_run) if gc else None
            return report
        finally:
            site.db.dispose()
    finally:
        os.close(fd)


def apply_retention(site: Any, dry_run: bool) -> list[dict[str, Any]]:
    out = []
    with site.db.session() as s:
        plan = lifecycle.retention_plan(SiteService(s))
    for rm in plan:
        item = {"repository": rm.repository, "digest": rm.digest, "tags": rm.tags, "size": rm.size,
                "deleted": False}
        out.append(item)
        if dry_run:
            continue
        tok = site.issuer.issue(ACTOR, [{"type": "repository", "name": rm.repository, "actions": ["delete"]}])
        r = httpx.delete(f"http://{site.settings.registry}/v2/{rm.repository}/manifests/{rm.digest}",
                         headers={"Authorization": f"Bearer {tok['token']}"}, timeout=30)
        if r.status_code not in (202, 404):        # 404: already gone (an earlier, interrupted run)
            item["error"] = f"registry answered HTTP {r.status_code}"
            continue
        item["deleted"] = True
        with site.db.session() as s:
            svc = SiteService(s)
            forget_manifest(svc, rm.repository, rm.digest)
            svc.audit("retention.delete", ACTOR, repository=rm.repository, digest=rm.digest,
                      details={"tags": rm.tags, "size": rm.size})
    return out


def _stop_registry(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + site_mod.STOP_TIMEOUT
    while site_mod._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if site_mod._alive(pid):
        os.killpg(pid, signal.SIGKILL)
        while site_mod._alive(pid):
            time.sleep(0.05)


def garbage_collect(cfg: Config, state_dir: Path, dry_run: bool) -> dict[str, Any]:
    """The registry's garbage-collect, with the registry stopped (and restarted even if gc fails).
    Never `--delete-untagged`: a manifest kept by digest only (a job's image) must survive."""
    reg_cfg = state_dir / "registry.yml"
    argv = [cfg.server.registry_bin, "garbage-collect", str(reg_cfg)] + (["--dry-run"] if dry_run else [])
    st = site_mod.read_status(state_dir)
    pid = st.pids.get("registry")
    running = bool(pid and site_mod._alive(pid) and site_mod._ours(pid, str(reg_cfg)))
    if running and not dry_run:            # a dry run deletes nothing: the registry may keep serving
        assert pid is not None
        _stop_registry(pid)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=GC_TIMEOUT, cwd=state_dir)
    finally:
        if running and not dry_run:
            acct = site_mod._account(cfg)
            st.pids["registry"] = site_mod._spawn("registry", [cfg.server.registry_bin, "serve", str(reg_cfg)],
                                                  state_dir, acct)
            site_mod._write_status(state_dir, st)
            _wait_registry(st.registry)
    if r.returncode != 0:
        raise SiteError(f"registry garbage-collect failed: {(r.stderr or r.stdout).strip()[-300:]}")
    text = r.stdout + r.stderr
    eligible = sorted(set(re.findall(r"blob eligible for deletion: (sha256:[0-9a-f]{64})", text)))
    key = "blobs_eligible" if dry_run else "blobs_removed"
    return {key: eligible, "registry_restarted": running and not dry_run}


def _wait_registry(addr: str) -> None:
    deadline = time.monotonic() + site_mod.START_TIMEOUT
    while time.monotonic() < deadline:
        if site_mod._http_status(f"http://{addr}/v2/") == 401:
            return
        time.sleep(0.1)
    raise SiteError(f"the registry did not come back on {addr} after garbage collection")
