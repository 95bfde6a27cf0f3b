"""Reproduce a past job or `nagaya run` on exactly the image digest it ran on (`nagaya reproduce` is its door).

The record is the caller's own audit log (`~/.local/share/nagaya/audit.jsonl`): every `nagaya submit` and
`nagaya run` wrote one, with the image's manifest digest, the command, the directory and the resources or run
options. The digest comes from the cache if it is still there, else from the registry (by digest: a tag that
moved since changes nothing), else from the site's archive of expired accounts' images, through the server
and the same access rules. Whatever the source, the image must hash to the recorded digest."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nagaya import audit
from nagaya.errors import ImageNotFound, NagayaError, NotFound, UsageError
from nagaya.sched.submit import find_script


@dataclass
class Reproduction:
    """What will run again: `plan` is what --dry-run/--json show; a run has `argv` (for `nagaya run`),
    a job has `spec` (for its scheduler)."""

    record: dict[str, Any]
    plan: dict[str, Any]
    argv: list[str] = field(default_factory=list)
    spec: Any = None
    scheduler: Any = None


def prepare(cfg: Any, job: str | None, run: str | None, backend: str | None, here: bool,
            dry_run: bool) -> Reproduction:
    """Find the record, make sure its image is at hand (unless dry_run) and plan the job or run."""
    if bool(job) == bool(run):
        raise UsageError("give a JOB id or --run ID (see --help)")
    rec = find_record(cfg, job, run, backend)
    digest = str(rec["digest"])
    cwd = _workdir(rec, here)
    name, source = ensure_image(cfg, str(rec.get("image") or digest), digest, dry_run)
    plan: dict[str, Any] = {"reproduces": {"job": job, "submitted": rec.get("time")} if job
                            else {"run": rec.get("id")},
                            "image": rec.get("image"), "digest": digest, "ref": name, "image_source": source,
                            "cwd": cwd, "dry_run": dry_run}
    if run:
        argv = run_argv(rec, name)
        plan["run"] = ["nagaya", "run", *argv]
        return Reproduction(rec, plan, argv=argv)
    from nagaya.sched import get_scheduler

    sched = get_scheduler(cfg, backend or rec["details"].get("backend"))
    spec = job_spec(rec, name, cwd, cfg)
    plan.update({"backend": sched.name, "command": spec.command, "script": spec.script_name or None,
                 "resources": {k: getattr(spec, k) for k in ("nodes", "ntasks", "cpus", "mem", "gpus",
                                                              "time_limit", "partition")}})
    return Reproduction(rec, plan, spec=spec, scheduler=sched)


def submit_again(cfg: Any, r: Reproduction) -> str:
    """Submit the planned job; it is recorded as a submit of its own (reproducible in turn)."""
    new_id = r.scheduler.submit(r.spec)
    r.plan["id"] = new_id
    record(cfg, r.record, r.plan, str(r.record["digest"]), r.plan["cwd"], submitted=r.spec)
    return str(new_id)


def history(cfg: Any) -> list[dict[str, Any]]:
    """The runs and jobs on record that carry an image digest, oldest first."""
    return [r for r in audit.read(cfg.audit_file) if r.get("action") in ("run", "exec", "shell", "submit")
            and str(r.get("digest", "")).startswith("sha256:")]


def find_record(cfg: Any, job: str | None, run: str | None, backend: str | None) -> dict[str, Any]:
    """The newest record of the job (a submit; --backend narrows) or run (by id or an unambiguous prefix)."""
    records = audit.read(cfg.audit_file)
    if run:
        if len(run) < 4:
            raise UsageError("give at least 4 characters of the run id (nagaya reproduce --list)")
        hits = [r for r in records if r.get("action") in ("run", "exec", "shell")
                and str(r.get("id", "")).startswith(run)]
        if len({r["id"] for r in hits}) > 1:
            raise UsageError(f"run id {run!r} is ambiguous: give more of it")
        what = f"run {run}"
    else:
        hits = [r for r in records if r.get("action") == "submit" and isinstance(r.get("details"), dict)
                and str(r["details"].get("job")) == job
                and (backend is None or r["details"].get("backend") == backend)]
        what = f"job {job}"            # ids come round again (a new cluster, another backend): the newest
    if not hits:
        raise NotFound(f"no record of {what} in {cfg.audit_file} (nagaya reproduce --list shows what there is)")
    rec = hits[-1]
    if not str(rec.get("digest", "")).startswith("sha256:"):
        raise UsageError(f"{what} has no image digest on record (a compose stack is reproduced from its file)")
    return rec


def ensure_image(cfg: Any, image: str, digest: str, dry_run: bool) -> tuple[str, str]:
    """Make sure the digest is in the cache: (the reference to run, where the image came from)."""
    from nagaya.image.store import open_store

    store = open_store(cfg)
    from nagaya.image.resolve import pinned_name

    name, ref = pinned_name(image, digest)
    if store.has_image(digest):
        return name, "cache"
    if ref is None or not ref.registry:
        raise ImageNotFound(f"image {digest[:19]} ({image}) is no longer in your cache, and a local image has no "
                            "registry or archive to come back from")
    if dry_run:
        return name, "registry, else the site archive"
    from nagaya.image.pull import pull

    try:
        meta = pull(store, str(ref), cfg, quiet=not sys.stderr.isatty())
        if meta.digest == digest:
            return name, "registry"
        registry_error = f"the registry served {meta.digest[:19]}"
    except NagayaError as e:
        registry_error = e.message
    try:
        from_archive(cfg, store, ref, digest)
    except NagayaError as e:
        raise ImageNotFound(f"image {ref.name}@{digest[:19]} is in neither the registry ({registry_error}) "
                            f"nor the site archive ({e.message})") from None
    return name, "archive"


def from_archive(cfg: Any, store: Any, ref: Any, digest: str) -> None:
    """Fetch the OCI archive the site made when the image's owner expired, and import it (untagged)."""
    import httpx

    from nagaya.client import authfile
    from nagaya.client.api import Api
    from nagaya.image import oci
    from nagaya.image.importer import Importer, finish_image

    login = authfile.current(ref.registry)
    api = Api(login.server, login.username, login.secret)
    hits = api.get("/api/archive", params={"digest": digest})
    if not hits:
        raise NotFound("no archived copy you may read")

    class Untagged(Importer):        # the archive's tag is history: the cache keeps the image by digest only
        def _finish(self, manifest_bytes: bytes, manifest: Any, config_bytes: bytes, layers: list[Any], _ref: Any,
                    work: Path, source: str, sqfs: Path | None, diff_ids: list[str], wait: Any = None) -> Any:
            if oci.sha256_digest(manifest_bytes) != digest:
                raise ImageNotFound(f"the archived image is {oci.sha256_digest(manifest_bytes)[:19]}, "
                                    f"not {digest[:19]}")
            return finish_image(self.store, manifest_bytes, manifest, config_bytes, layers, None, work, source,
                                sqfs, diff_ids, self.compression, self.jobs, self.progress, wait)

    store.ensure_dirs()
    with store.tmpdir("archive-") as tmp:
        path = tmp / "image.tar"
        try:
            with httpx.stream("GET", login.server.rstrip("/") + hits[0]["url"], timeout=300,
                              auth=(login.username, login.secret)) as r, open(path, "wb") as f:
                if r.status_code != 200:
                    raise NotFound(f"the server answered {r.status_code} for the archive")
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
        except httpx.HTTPError as e:
            raise NotFound(f"cannot download the archive: {e}") from None
        Untagged(store, cfg.image.compression, cfg.image.jobs).run(path, ref)


def _workdir(rec: dict[str, Any], here: bool) -> str:
    if here:
        return os.getcwd()
    cwd = str(rec.get("cwd") or "")
    if not cwd or not os.path.isdir(cwd):
        raise UsageError(f"the original directory {cwd or '?'} is gone; run from another one with --here")
    return cwd


def run_argv(rec: dict[str, Any], name: str) -> list[str]:
    """`nagaya run` options for the recorded run: the exact command (entrypoint resolved), its directory
    inside, binds and modes. Environment variables are recorded by name only: their values come from now."""
    d = rec.get("details") if isinstance(rec.get("details"), dict) else {}
    argv = ["--entrypoint", ""]
    if d.get("pwd"):
        argv += ["--pwd", str(d["pwd"])]
    for b in d.get("binds", []):
        argv += ["--bind", str(b)]
    for key, flag in (("writable_tmpfs", "--writable-tmpfs"), ("cleanenv", "--cleanenv"), ("no_home", "--no-home")):
        if d.get(key):
            argv.append(flag)
    if d.get("overlay_dir"):
        argv += ["--overlay", str(d["overlay_dir"])]
    if d.get("gpus"):
        argv += ["--gpus", str(d["gpus"])]
    for dev in d.get("devices") or []:
        argv += ["--device", str(dev)]
    if d.get("backend") in ("bwrap", "runc"):
        argv += ["--backend", str(d["backend"])]
    command = [str(x) for x in rec.get("command") or []]
    if not command:
        raise UsageError("the run record has no command")
    return [*argv, name, *command]


def job_spec(rec: dict[str, Any], name: str, cwd: str, cfg: Any) -> Any:
    """The job as submitted: same command (or script), resources and directory; the image by digest."""
    import pwd

    from nagaya.sched import JobSpec

    d = rec["details"]
    command = [str(x) for x in rec.get("command") or []]
    script, script_name = "", ""
    path = Path(cwd, command[0]) if command else None
    found = find_script([str(path)]) if path is not None else None
    if found:                           # the script form, as `nagaya submit` tells it (its current content)
        script, script_name, command = found[1], found[0].name, command[1:]
    return JobSpec(image=str(rec.get("image") or name), ref=name, digest=str(rec["digest"]), command=command,
                   script=script, script_name=script_name, nodes=int(d.get("nodes") or 1),
                   ntasks=int(d.get("ntasks") or 1), cpus=int(d.get("cpus") or 1), mem=str(d.get("mem") or ""),
                   gpus=str(d.get("gpus") or ""), time_limit=int(d.get("time_limit") or 0),
                   partition=str(d.get("partition") or cfg.sched.partition),
                   name=str(d.get("name") or script_name or Path(command[0] if command else name).name),
                   cwd=cwd, env=dict(os.environ), user=pwd.getpwuid(os.getuid()).pw_name)
def record(cfg: Any, rec: dict[str, Any], plan: dict[str, Any], digest: str, cwd: str,
            submitted: Any = None) -> None:
    """The new job is a submit of its own (reproducible in turn); a run records itself when it ends."""
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    if submitted is not None:
        s = submitted
        ev = audit.AuditEvent(action="submit", user=me, uid=os.getuid(), image=str(rec.get("image") or ""),
                              digest=digest, command=list(rec.get("command") or []), cwd=cwd,
                              details={**rec["details"], "job": plan["id"], "backend": plan["backend"],
                                       "nodes": s.nodes, "ntasks": s.ntasks, "cpus": s.cpus, "mem": s.mem,
                                       "gpus": s.gpus, "time_limit": s.time_limit,
                                       "reproduces": plan["reproduces"], "image_source": plan["image_source"]})
    else:
        ev = audit.AuditEvent(action="reproduce", user=me, uid=os.getuid(), image=str(rec.get("image") or ""),
                              digest=digest, command=list(rec.get("command") or []), cwd=cwd,
                              details={"reproduces": plan["reproduces"], "image_source": plan["image_source"]})
    audit.record(ev, cfg)
    from nagaya.client.site_audit import forward

    forward(ev)


