"""`nagaya admin maintain`: the periodic site job (cron or a systemd timer on the site host, as root or the
service account). Idempotent, and one run at a time (an flock in the state dir; a second run reports that
it skipped). Steps: retention (delete expired manifests through the registry API, so the index and the
registry agree), then the registry's own `garbage-collect` with the registry stopped, as its documentation
requires: its mark phase walks every manifest still present, so no blob a manifest references is removed,
whichever repositories share it. Before retention: expired accounts (group projects handed over or
flagged; personal images archived and removed after the grace period), all judged at `now`. First of all,
as root: the site audit spool is read (ingested into the one audit trail) and the shared node caches are
shrunk to their size cap."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pwd
import re
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from nagaya import safefs
from nagaya.config import Config
from nagaya.errors import ImageError, NagayaError, SiteError
from nagaya.server import audit_spool
from nagaya.server import site as site_mod
from nagaya.server.settings import ServerSettings
from nagaya.sitedb.archive import archive_root
from nagaya.sitedb.models import UserToken
from nagaya.sitedb.service import SiteService
from nagaya.sitedb.users import TagRow

LOCK = "maintain.lock"
ACTOR = "$nagaya-maintain"
GC_TIMEOUT = 1800
log = logging.getLogger("nagaya.server")


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


def _state_fd(cfg: Config, state_dir: Path) -> int:
    """The state dir (the service account's) as an fd, reached without following links: root's steps work
    relative to it, never through a path the service account could redirect."""
    if os.geteuid() != 0:
        return os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return safefs.open_dir(state_dir, (pwd.getpwnam(cfg.server.user).pw_uid,))


def _lock(cfg: Config, dfd: int) -> int:
    """The one-run-at-a-time lock. Root opens it before dropping to the service account (root-only steps
    run first). A new lock file is created exclusively and handed to the service account; an existing one
    must be a regular single-link file of the service account's (or root's, from older versions), so a
    link planted under its name is refused, never followed or chowned."""
    if os.geteuid() != 0:
        fd = safefs.create_at(dfd, LOCK)
        return fd if fd is not None else safefs.open_at(dfd, LOCK, os.O_RDWR, owners=(os.geteuid(),))
    pw = pwd.getpwnam(cfg.server.user)
    fd = safefs.create_at(dfd, LOCK, 0o600, pw.pw_uid, pw.pw_gid)
    return fd if fd is not None else safefs.open_at(dfd, LOCK, os.O_RDWR, owners=(pw.pw_uid, 0))


def maintain(cfg: Config, state_dir: Path | None, *, dry_run: bool, now: datetime, gc: bool = True,
             cache_gc: bool = True) -> dict[str, Any]:
    state_dir = site_mod.find_state_dir(cfg, state_dir).absolute()
    dfd = _state_fd(cfg, state_dir)
    try:
        fd = _lock(cfg, dfd)
    except (OSError, safefs.UnsafePath) as e:
        os.close(dfd)
        raise SiteError(f"{state_dir}/{LOCK}: {safefs.describe(e)}; not running") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"skipped": "another maintenance run holds the lock", "dry_run": dry_run}
        # Root's part: users' spool files are theirs (0600), shared node caches belong to the site admin.
        spool = audit_spool.read(cfg.audit.site_dir, dfd) if cfg.audit.site_dir else None
        caches = gc_shared_caches(cfg, dry_run) if cache_gc else []
        logs = prune_job_logs(dfd, state_dir, cfg.server.job_log_days, now, dry_run)
        become_service_account(cfg)
        from nagaya.server.base import Site

        site = Site(ServerSettings.load(state_dir / "server.json"))
        try:
            report: dict[str, Any] = {"dry_run": dry_run, "now": now.isoformat() + "Z", "skipped": None}
            report["audit_spool"] = audit_spool.ingest(site, spool, dfd, now, dry_run) if spool else None
            with site.db.session() as s:
                report["handover"] = [h.as_dict() for h in SiteService(s).hand_over(now, dry_run)]
            report["archived"] = archive_expired(site, archive_root(site.settings, state_dir), now, dry_run)
            report["retention"] = apply_retention(site, dry_run)
            report["gc"] = garbage_collect(cfg, state_dir, dry_run) if gc else None
            report["cache_gc"] = caches
            report["job_logs"] = logs
            with site.db.session() as s:
                report["tokens_pruned"] = prune_tokens(SiteService(s), cfg.server.expired_token_days, now, dry_run)
            return report
        finally:
            site.db.dispose()
    finally:
        os.close(fd)
        os.close(dfd)


def prune_job_logs(state_fd: int, state_dir: Path, days: int, now: datetime, dry_run: bool) -> dict[str, Any]:
    """Portal job logs (slurmrestd mode: job-logs/USER/slurm-ID.out, written by the users) older than `days`.
    Root's step: the service account may only read those directories. Everything is reached by directory
    fds opened without following links (job-logs and its user directories are the service account's, the
    files in them the users'), and removed with unlinkat, which removes a planted link, never its target."""
    out: dict[str, Any] = {"removed": [], "skipped": None}
    if days <= 0:
        return out
    if os.geteuid() != 0:
        out["skipped"] = "job logs are pruned only when maintain runs as root"
        return out
    trusted = (os.fstat(state_fd).st_uid, 0)        # the service account's (or root's) directories only
    try:
        root = safefs.open_dir_at(state_fd, "job-logs", trusted)
    except FileNotFoundError:
        return out
    except (OSError, safefs.UnsafePath) as e:
        out["skipped"] = f"job-logs: {e}"
        return out
    cutoff = now.replace(tzinfo=UTC).timestamp() - days * 86400
    try:
        for name in sorted(os.listdir(root)):
            try:
                udir = safefs.open_dir_at(root, name, trusted)
            except (OSError, safefs.UnsafePath):
                continue                    # a link or a stranger's entry: never entered
            try:
                for f in sorted(os.listdir(udir)):
                    st = safefs.lstat_at(udir, f)
                    if (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) and st.st_mtime < cutoff:
                        out["removed"].append(str(state_dir / "job-logs" / name / f))
                        if not dry_run:
                            safefs.remove_at(udir, f)
            finally:
                os.close(udir)
    finally:
        os.close(root)
    return out


def prune_tokens(svc: SiteService, days: int, now: datetime, dry_run: bool) -> int:
    """Personal access tokens that expired or were revoked more than `days` ago (e.g. the portal's
    per-job pull tokens): they can never work again and only crowd the users' token lists."""
    if days <= 0:
        return 0
    cutoff = now - timedelta(days=days)
    dead = (UserToken.expires_at < cutoff) | (UserToken.revoked_at < cutoff)
    n = svc.s.scalar(select(func.count()).select_from(UserToken).where(dead)) or 0
    if n and not dry_run:
        svc.s.execute(delete(UserToken).where(dead))
        svc.audit("token.pruned", ACTOR, details={"count": n, "older_than_days": days})
    return int(n)


def gc_shared_caches(cfg: Config, dry_run: bool) -> list[dict[str, Any]]:
    """`nagaya cache gc` for the site's shared node caches, down to `[image] cache_max_size`. An image a
    running container uses is never removed (the container holds a shared flock on its squashfs)."""
    from nagaya.image.cache import gc as cache_gc
    from nagaya.image.store import ImageStore
    from nagaya.units import parse_size

    out: list[dict[str, Any]] = []
    cap = parse_size(cfg.image.cache_max_size) if cfg.image.cache_max_size else None
    for d in cfg.image.shared_cache_dirs:
        item: dict[str, Any] = {"cache": d, "max_size": cap}
        out.append(item)
        if cap is None:
            item["skipped"] = "no [image] cache_max_size configured"
            continue
        try:
            # Root removes files there: only in a cache no other account can write or redirect.
            os.close(safefs.open_dir(d, () if os.geteuid() == 0 else (os.geteuid(),)))
        except (OSError, safefs.UnsafePath) as e:
            item["skipped"] = f"not a site cache only its admins can write: {e}"
            continue
        if not Path(d, "images").is_dir():
            item["skipped"] = "not a nagaya cache"
            continue
        try:
            item.update(cache_gc(ImageStore(Path(d)), max_size=cap, dry_run=dry_run).to_json())
        except (NagayaError, OSError) as e:
            item["error"] = str(e)
    return out


def _delete_manifest(site: Any, repository: str, digest: str) -> bool:
    """Whether the manifest is gone now (deleted, or already gone after an earlier, interrupted run); a
    registry that refuses or does not answer leaves it, and the index, for the next run."""
    try:
        with site.registry(repository, ACTOR, ["delete"]) as reg:
            reg.delete_manifest(digest)
    except NagayaError as e:
        log.warning("cannot delete %s@%s: %s", repository, digest, e)
        return False
    return True


def write_oci_archive(site: Any, row: TagRow, out: Path) -> int:
    """One image as an OCI archive (oci-layout, index.json, blobs), every blob checked against its digest.
    Written to a temporary name and renamed: a half-written archive is never taken for a good one."""
    from nagaya.image import oci

    with site.registry(row.repository, ACTOR, ["pull"], timeout=300) as reg:
        try:
            manifest, _mt, _d = reg.get_manifest(row.digest)         # checked against its digest
        except ImageError as e:
            raise SiteError(f"{row.repository}@{row.digest[:19]}: {e.message}; not archived") from None
        m = json.loads(manifest)
        if "layers" not in m:
            raise SiteError(f"{row.repository}:{row.tag} is an index; archiving multi-platform images is not "
                            "supported")
        tmp = out.with_name(out.name + ".part")
        total = 0
        with tarfile.open(tmp, "w") as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))

            add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            index = {"schemaVersion": 2, "manifests": [{
                "mediaType": row.media_type, "digest": row.digest, "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": row.tag}}]}
            add("index.json", json.dumps(index).encode())
            add(f"blobs/sha256/{row.digest.split(':', 1)[1]}", manifest)
            for desc in [m["config"], *m["layers"]]:
                d = oci.Descriptor.parse(desc, f"{row.repository}: blob")
                # spooled to a temporary file, size-bounded and checked against its digest
                with tempfile.TemporaryFile(dir=out.parent) as f:
                    try:
                        reg.fetch_blob(d, f, f"{row.repository}: blob")
                    except ImageError as e:
                        raise SiteError(f"{e.message}; not archived") from None
                    info = tarfile.TarInfo(f"blobs/sha256/{d.digest.split(':', 1)[1]}")
                    info.size, info.mode, info.mtime = d.size, 0o644, 0
                    f.seek(0)
                    tar.addfile(info, f)
                total += d.size
    os.replace(tmp, out)
    return total


def archive_expired(site: Any, archive_dir: Path, now: datetime, dry_run: bool) -> list[dict[str, Any]]:
    """Images of users expired longer than the grace period: archived (one OCI archive per tag plus an
    index.json per project), then removed from the registry. A failed archive removes nothing."""
    with site.db.session() as s:
        due = SiteService(s).archive_due(now, site.settings.expiry_grace_days)
    out: list[dict[str, Any]] = []
    for project, rows in due:
        pdir = archive_dir / project
        entries: list[dict[str, Any]] = []
        index_path = pdir / "index.json"
        if index_path.exists():
            entries = json.loads(index_path.read_text()).get("images", [])
        for row in rows:
            name = f"{row.repository.split('/', 1)[1].replace('/', '_')}_{row.tag}.tar"
            item: dict[str, Any] = {"project": project, "repository": row.repository, "tag": row.tag,
                                    "digest": row.digest, "file": str(pdir / name), "removed": False}
            out.append(item)
            if dry_run:
                continue
            pdir.mkdir(parents=True, exist_ok=True, mode=0o750)
            try:
                item["size"] = write_oci_archive(site, row, pdir / name)
            except (NagayaError, ValueError) as e:
                item["error"] = str(e)
                continue
            entries = [e for e in entries if (e["repository"], e["tag"]) != (row.repository, row.tag)]
            entries.append({k: item[k] for k in ("repository", "tag", "digest", "size")} | {"file": name,
                           "archived_at": now.isoformat() + "Z"})
            _write_json(index_path, {"project": project, "images": entries})
        # Then remove each manifest once (tags may share one), only when all its tags are archived.
        mine = [i for i in out if i["project"] == project]
        failed = {i["digest"] for i in mine if "error" in i}
        for digest in sorted({i["digest"] for i in mine} - failed):
            items = [i for i in mine if i["digest"] == digest]
            repos = sorted({i["repository"] for i in items})
            if dry_run or not all(_delete_manifest(site, r, digest) for r in repos):
                continue
            with site.db.session() as s:
                svc = SiteService(s)
                for r in repos:
                    svc.forget_manifest(r, digest)
                for i in items:
                    i["removed"] = True
                    svc.audit("expiry.archive", ACTOR, repository=i["repository"], tag=i["tag"], digest=digest,
                              details={"file": i["file"], "size": i["size"]})
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def apply_retention(site: Any, dry_run: bool) -> list[dict[str, Any]]:
    out = []
    with site.db.session() as s:
        plan = SiteService(s).retention_plan()
    for rm in plan:
        item = {"repository": rm.repository, "digest": rm.digest, "tags": rm.tags, "size": rm.size,
                "deleted": False}
        out.append(item)
        if dry_run:
            continue
        if not _delete_manifest(site, rm.repository, rm.digest):
            item["error"] = "the registry refused the delete"
            continue
        item["deleted"] = True
        with site.db.session() as s:
            svc = SiteService(s)
            svc.forget_manifest(rm.repository, rm.digest)
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
