"""Site lifecycle over one session: the audit trail query and CLI ingestion, per-project storage quotas.

Quota design: the registry cannot be asked "how big will this push be" before it happens, so the token
service refuses the `push` scope once a project's indexed size has reached its quota. That stops every
client (skopeo, docker, `nagaya push`) at its first request, before any blob is uploaded, with a message."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select

from nagaya.errors import NotFound, PermissionDenied, UsageError
from nagaya.store.auditlog import ImageRef, parse_image
from nagaya.store.authz import Principal, split_repository
from nagaya.store.models import AuditEvent, Membership, Project, Repository, Tag, User, utcnow
from nagaya.store.service import SiteService
from nagaya.store.usage import project_used
from nagaya.units import format_size

# Actions a CLI may report; registry.*, admin.*, login and the like are written by the server only.
CLI_ACTION_RE = re.compile(r"^(run|exec|shell|pull|push|submit|build|import|export|reproduce)$")


def _require_admin(principal: Principal) -> None:
    if not (principal.kind == "user" and principal.is_admin):
        raise PermissionDenied("only site admins may do this")


def cli_event_id(actor: str, ev: dict[str, Any]) -> str:
    """One id per CLI record and actor: the copy forwarded at once (`POST /api/audit`) and the copy
    ingested later from the site spool are the same event. Namespaced by the authenticated actor, so a
    user can never pre-empt someone else's record with a chosen id."""
    import hashlib
    import json

    rid = ev.get("id")
    key = str(rid) if isinstance(rid, str) and rid else json.dumps(ev, sort_keys=True, default=str)
    return "cli:" + hashlib.sha256(f"{actor}\0{key}".encode()).hexdigest()[:56]


def ingest_cli_event(svc: SiteService, principal: Principal, ev: dict[str, Any], source: str) -> bool:
    """A record from a user's CLI (run, submit, pull, ...). The actor is the authenticated caller, never
    a name in the body; the server's clock stamps it (the client's time is kept in details)."""
    if principal.kind != "user":
        raise PermissionDenied("only users report their own activity")
    return record_cli_event(svc, principal.name, ev, source)


def record_cli_event(svc: SiteService, actor: str, ev: dict[str, Any], source: str,
                     when: datetime | None = None) -> bool:
    """Store one CLI record for `actor` (already authenticated, or the owner of a spool file). False when
    the same record is already in the trail."""
    action = str(ev.get("action") or "")
    if not CLI_ACTION_RE.match(action):
        raise UsageError(f"action {action!r} cannot be reported by a client")
    event_id = cli_event_id(actor, ev)
    if svc.s.scalar(select(AuditEvent.id).where(AuditEvent.event_id == event_id)):
        return False
    image = str(ev.get("image") or "")[:500]
    ref = parse_image(image) if image else ImageRef("", "", "")
    digest = str(ev.get("digest") or ref.digest)[:100]
    details = {k: ev.get(k) for k in ("id", "image", "command", "cwd", "host", "exit_code", "duration_s", "time",
                                      "uid") if ev.get(k) not in (None, "", [])}
    extra = ev.get("details")
    if isinstance(extra, dict):
        details.update({k: v for k, v in extra.items() if k not in details})
    row = AuditEvent(action=f"cli.{action}", actor=actor, repository=ref.repository[:255], tag=ref.tag[:128],
                     digest=digest, source=source[:64], event_id=event_id, details=details)
    if when is not None:
        row.time = when
    svc.s.add(row)
    return True


def spool_time(ev: dict[str, Any], now: datetime) -> datetime:
    """When a spooled record happened: its own time (it may be ingested days later), never in the future."""
    try:
        t = datetime.fromisoformat(str(ev.get("time") or "").replace("Z", "+00:00"))
    except ValueError:
        return now
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    return min(t, now)


# ---- quotas -------------------------------------------------------------------------------------------

def push_refusal(svc: SiteService, repository: str) -> str | None:
    """Why a push to `repository` must be refused now (None: it may go ahead)."""
    parts = split_repository(repository)
    project = svc.s.scalar(select(Project).where(Project.name == parts[0])) if parts else None
    if project is None:
        return None
    owner = project.owner
    if project.kind == "personal" and owner is not None and owner.expires_at is not None \
            and owner.expires_at <= utcnow():
        return f"project {project.name} is frozen: its owner's account expired on {owner.expires_at:%Y-%m-%d}"
    if project.quota_bytes is None:
        return None
    used = project_used(svc.s, project)
    if used >= project.quota_bytes:
        return (f"project {project.name} is over its storage quota "
                f"({format_size(used)} used of {format_size(project.quota_bytes)}); "
                f"delete tags or ask a site admin to raise it")
    return None


@dataclass
class Quota:
    project: str
    quota_bytes: int | None         # None: no quota
    used_bytes: int                 # store/usage.py: what the quota check counts


@dataclass
class Policy:
    project: str
    keep_newest: int | None
    keep_pattern: str
    immutable_pattern: str
    quota_bytes: int | None


def set_quota(svc: SiteService, principal: Principal, name: str, quota: int | None) -> Quota:
    _require_admin(principal)
    p = svc.s.scalar(select(Project).where(Project.name == name))
    if p is None:
        raise NotFound(f"project {name} not found")
    if quota is not None and quota < 0:
        raise UsageError("a quota cannot be negative")
    p.quota_bytes = quota
    svc.audit("admin.quota", principal.name, details={"project": name, "quota_bytes": quota})
    return quota_info(svc, p)


def quota_info(svc: SiteService, p: Project) -> Quota:
    return Quota(project=p.name, quota_bytes=p.quota_bytes, used_bytes=project_used(svc.s, p))


# ---- retention and immutable tags ---------------------------------------------------------------------

def _globs(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


def matches(patterns: str, tag: str) -> bool:
    return any(fnmatch.fnmatchcase(tag, g) for g in _globs(patterns))


def is_immutable(svc: SiteService, repository: str, tag: str) -> bool:
    parts = split_repository(repository)
    project = svc.s.scalar(select(Project).where(Project.name == parts[0])) if parts else None
    return bool(project and tag and matches(project.immutable_pattern, tag))


def set_policy(svc: SiteService, principal: Principal, name: str, body: dict[str, Any]) -> Policy:
    """Retention and immutability of a project (site admins); keys absent from `body` stay as they are."""
    _require_admin(principal)
    p = svc.s.scalar(select(Project).where(Project.name == name))
    if p is None:
        raise NotFound(f"project {name} not found")
    if "keep_newest" in body:
        n = body["keep_newest"]
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise UsageError("keep_newest must be a non-negative integer or null")
        p.keep_newest = n
    for key in ("keep_pattern", "immutable_pattern"):
        if key in body:
            v = body[key] or ""
            if not isinstance(v, str) or len(v) > 255:
                raise UsageError(f"{key} must be comma-separated globs (at most 255 characters)")
            setattr(p, key, ",".join(_globs(v)))
    policy = policy_info(p)
    svc.audit("admin.policy", principal.name, details=asdict(policy))
    return policy


def policy_info(p: Project) -> Policy:
    return Policy(project=p.name, keep_newest=p.keep_newest, keep_pattern=p.keep_pattern,
                  immutable_pattern=p.immutable_pattern, quota_bytes=p.quota_bytes)


@dataclass
class Removal:
    """One manifest retention removes: every tag of it in the repository is expired."""

    repository: str
    digest: str
    tags: list[str]
    size: int


def retention_plan(svc: SiteService, project: str | None = None) -> list[Removal]:
    """Per repository: keep the newest `keep_newest` tags, tags matching `keep_pattern` and immutable
    tags; a manifest goes only when none of its tags is kept (a registry deletes manifests, not tags)."""
    q = select(Project).where(Project.keep_newest.is_not(None))
    if project:
        q = q.where(Project.name == project)
    out: list[Removal] = []
    for p in svc.s.scalars(q.order_by(Project.name)):
        for repo in svc.s.scalars(select(Repository).where(Repository.project_id == p.id).order_by(Repository.name)):
            tags = sorted(repo.tags, key=lambda t: (t.pushed_at, t.id), reverse=True)
            keep = {t.name for t in tags[:p.keep_newest]}
            keep |= {t.name for t in tags if matches(p.keep_pattern, t.name) or matches(p.immutable_pattern, t.name)}
            kept_digests = {t.digest for t in tags if t.name in keep}
            by_digest: dict[str, list[Tag]] = {}
            for t in tags:
                if t.digest not in kept_digests:
                    by_digest.setdefault(t.digest, []).append(t)
            for digest, ts in by_digest.items():
                out.append(Removal(repo.name, digest, sorted(t.name for t in ts), max(t.size for t in ts)))
    return out


# ---- account expiry -----------------------------------------------------------------------------------

def expiry_warning(user: User, now: datetime, warn_days: int) -> str | None:
    """The warning an account gets in the last `warn_days` before it expires."""
    if user.expires_at is None or user.expires_at <= now or user.expires_at - now > timedelta(days=warn_days):
        return None
    days = max(0, (user.expires_at - now).days)
    return (f"your account {user.name} expires on {user.expires_at:%Y-%m-%d %H:%M} UTC (in {days} days): "
            f"pushes stop then, and your images are archived and removed after the grace period")


def _other_owner(svc: SiteService, p: Project, user: User, now: datetime) -> User | None:
    """A remaining direct owner (not expired) to hand a group project to."""
    q = (select(User).join(Membership, Membership.user_id == User.id)
         .where(Membership.project_id == p.id, Membership.role == "owner", User.id != user.id,
                or_(User.expires_at.is_(None), User.expires_at > now)).order_by(User.name))
    return svc.s.scalars(q).first()


def expiry_effects(svc: SiteService, user: User, expires_at: datetime, grace_days: int) -> dict[str, Any]:
    """What expiring `user` at `expires_at` does (the dry run, and what `maintain` carries out)."""
    personal, handover, flagged = [], [], []
    for p in svc.s.scalars(select(Project).where(Project.owner_id == user.id).order_by(Project.name)):
        if p.kind == "personal":
            tags = svc.s.scalar(select(func.count(Tag.id)).join(Repository).where(Repository.project_id == p.id))
            personal.append({"project": p.name, "tags": int(tags or 0)})
        else:
            heir = _other_owner(svc, p, user, expires_at)
            (handover if heir else flagged).append({"project": p.name, "to": heir.name if heir else None})
    return {"user": user.name, "expires_at": expires_at.isoformat() + "Z",
            "archive_after": (expires_at + timedelta(days=grace_days)).isoformat() + "Z",
            "frozen": [x["project"] for x in personal], "archive": personal, "handover": handover,
            "flagged": flagged}


def set_expiry(svc: SiteService, principal: Principal, name: str, expires_at: datetime | None, grace_days: int,
               dry_run: bool) -> dict[str, Any]:
    _require_admin(principal)
    user = svc.user(name)
    if user is None:
        raise NotFound(f"no such user: {name} (users appear at their first login or project membership)")
    out = expiry_effects(svc, user, expires_at, grace_days) if expires_at else {"user": name, "expires_at": None}
    out["dry_run"] = dry_run
    if not dry_run:
        user.expires_at = expires_at
        svc.audit("admin.user.expires", principal.name,
                  details={"user": name, "expires_at": out["expires_at"]})
    return out


def hand_over(svc: SiteService, now: datetime, dry_run: bool) -> list[dict[str, Any]]:
    """Group projects owned by expired users: to another owner, or flagged for an admin (never deleted)."""
    out = []
    q = (select(Project).join(User, Project.owner_id == User.id)
         .where(Project.kind != "personal", User.expires_at.is_not(None), User.expires_at <= now))
    for p in svc.s.scalars(q.order_by(Project.name)):
        old = p.owner
        assert old is not None
        heir = _other_owner(svc, p, old, now)
        item = {"project": p.name, "from": old.name, "to": heir.name if heir else None,
                "action": "handover" if heir else "flagged"}
        out.append(item)
        if dry_run:
            continue
        if heir:
            p.owner_id = heir.id
            svc.audit("project.handover", "$nagaya-maintain", details=item)
        else:
            svc.audit("project.flagged", "$nagaya-maintain", details={**item, "why": "its only owner expired"})
    return out


def archive_due(svc: SiteService, now: datetime, grace_days: int) -> list[tuple[str, list[TagRow]]]:
    """Personal projects of users expired for longer than the grace period, with their tags."""
    limit = now - timedelta(days=grace_days)
    q = (select(Project).join(User, Project.owner_id == User.id)
         .where(Project.kind == "personal", User.expires_at.is_not(None), User.expires_at <= limit))
    out = []
    for p in svc.s.scalars(q.order_by(Project.name)):
        rows = [TagRow(r.name, t.name, t.digest, t.media_type, t.size)
                for r in svc.s.scalars(select(Repository).where(Repository.project_id == p.id)) for t in r.tags]
        out.append((p.name, sorted(rows, key=lambda x: (x.repository, x.tag))))
    return out


@dataclass(frozen=True)
class TagRow:
    repository: str
    tag: str
    digest: str
    media_type: str
    size: int


# ---- the archive, for `nagaya reproduce` ---------------------------------------------------------------

def archive_root(settings: Any) -> Path:
    """Where maintenance archives expired users' images (`archive_dir`, default STATE_DIR/archive)."""
    return Path(settings.archive_dir) if settings.archive_dir else Path(settings.signing_key).parent.parent / "archive"


def _archive_entries(root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import json

    try:
        projects = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return
    for pdir in projects:
        try:
            index = json.loads((pdir / "index.json").read_text())
        except (OSError, ValueError):
            continue
        for e in index.get("images", []):
            if isinstance(e, dict) and isinstance(e.get("file"), str):
                yield pdir.name, e


def archived(svc: SiteService, principal: Principal, root: Path, digest: str) -> list[dict[str, Any]]:
    """Archived images with this manifest digest that the caller may pull (the project's rules still
    apply after the registry forgot the image: its members with pull, and site admins)."""
    from nagaya.store.authz import authorize

    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise UsageError("give a full sha256: digest")
    out = []
    for project, e in _archive_entries(root):
        if e.get("digest") != digest or not authorize(svc.s, principal, str(e.get("repository", "")), ["pull"]):
            continue
        out.append({"project": project, "repository": e["repository"], "tag": e.get("tag", ""), "digest": digest,
                    "size": e.get("size"), "archived_at": e.get("archived_at"),
                    "url": f"/api/archive/{project}/{e['file']}"})
    return out


def archive_file(svc: SiteService, principal: Principal, root: Path, project: str, name: str) -> Path:
    """The path of one archive the caller may read; anything else is a 404 (never a hint that it exists)."""
    from nagaya.store.authz import authorize

    for p, e in _archive_entries(root):
        if p == project and e["file"] == name and "/" not in name and \
                authorize(svc.s, principal, str(e.get("repository", "")), ["pull"]):
            path = root / project / name
            if path.is_file():
                return path
    raise NotFound(f"no archived image {project}/{name}")
