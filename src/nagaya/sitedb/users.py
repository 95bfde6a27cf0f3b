"""Accounts: the password login's record, the principal a request acts as, the admins' list of users, and
account expiry (warning, freeze, hand-over of group projects, archiving of personal projects)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select

from nagaya.errors import AuthError, NotFound
from nagaya.sitedb.authz import Principal, require_admin
from nagaya.sitedb.models import Membership, Project, Repository, Tag, User, UserToken, utcnow
from nagaya.sitedb.part import Part
from nagaya.sitedb.projects import Projects

MAINTAIN = "$nagaya-maintain"          # the actor of what the periodic maintenance does


@dataclass
class UserInfo:
    name: str
    uid: int | None
    is_admin: bool
    created_at: datetime
    last_login: datetime | None
    expires_at: datetime | None
    projects: int
    tokens: int             # live personal access tokens


@dataclass
class PersonalArchive:
    project: str
    tags: int               # tags archived and removed after the grace period


@dataclass
class Heir:
    project: str
    to: str | None          # the remaining owner it goes to; None: flagged for an admin


@dataclass
class ExpiryPlan:
    """What expiring an account does (the dry run's answer, and what `maintain` carries out)."""

    user: str
    expires_at: datetime | None                 # None: the account never expires
    dry_run: bool = False
    archive_after: datetime | None = None
    frozen: list[str] = field(default_factory=list)
    archive: list[PersonalArchive] = field(default_factory=list)
    handover: list[Heir] = field(default_factory=list)
    flagged: list[Heir] = field(default_factory=list)


@dataclass
class Handover:
    """A group project whose owner expired: handed to another owner, or flagged for an admin."""

    project: str
    owner: str              # the expired owner
    to: str | None
    action: str             # handover | flagged

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["from"] = d.pop("owner")          # the report's and the audit event's key
        return d


@dataclass(frozen=True)
class TagRow:
    repository: str
    tag: str
    digest: str
    media_type: str
    size: int


class Users(Part):
    def user(self, name: str) -> User | None:
        return self.s.scalar(select(User).where(User.name == name))

    def login(self, name: str, uid: int | None, is_admin: bool) -> User:
        """Record a successful password login; the first one creates the user's personal project."""
        user = self.user(name)
        now = utcnow()
        if user is None:
            user = User(name=name, uid=uid, is_admin=is_admin)
            self.s.add(user)
            self.s.flush()
        if user.expires_at is not None and user.expires_at <= now:
            raise AuthError(f"account {name} expired on {user.expires_at:%Y-%m-%d}")
        user.uid, user.is_admin, user.last_login = uid, is_admin, now
        Projects(self.s).ensure_personal_project(user)
        return user

    def principal(self, user: User, groups: Iterable[str]) -> Principal:
        if user.expires_at is not None and user.expires_at <= utcnow():
            raise AuthError(f"account {user.name} expired")
        return Principal(kind="user", name=user.name, user_id=user.id, groups=frozenset(groups),
                         is_admin=user.is_admin)

    def users_overview(self, principal: Principal) -> list[UserInfo]:
        require_admin(principal, "list users")
        now = utcnow()
        owned = dict(self.s.execute(select(Membership.user_id, func.count())
                                    .where(Membership.user_id.is_not(None)).group_by(Membership.user_id)).all())
        live = dict(self.s.execute(select(UserToken.user_id, func.count()).where(
            UserToken.revoked_at.is_(None), or_(UserToken.expires_at.is_(None), UserToken.expires_at > now))
            .group_by(UserToken.user_id)).all())
        return [UserInfo(name=u.name, uid=u.uid, is_admin=u.is_admin, created_at=u.created_at,
                         last_login=u.last_login, expires_at=u.expires_at, projects=int(owned.get(u.id, 0)),
                         tokens=int(live.get(u.id, 0)))
                for u in self.s.scalars(select(User).order_by(User.name))]

    # ---- account expiry ------------------------------------------------------------------------------

    @staticmethod
    def expiry_warning(user: User, now: datetime, warn_days: int) -> str | None:
        """The warning an account gets in the last `warn_days` before it expires."""
        if user.expires_at is None or user.expires_at <= now or user.expires_at - now > timedelta(days=warn_days):
            return None
        days = max(0, (user.expires_at - now).days)
        return (f"your account {user.name} expires on {user.expires_at:%Y-%m-%d %H:%M} UTC (in {days} days): "
                f"pushes stop then, and your images are archived and removed after the grace period")

    def _other_owner(self, p: Project, user: User, now: datetime) -> User | None:
        """A remaining direct owner (not expired) to hand a group project to."""
        q = (select(User).join(Membership, Membership.user_id == User.id)
             .where(Membership.project_id == p.id, Membership.role == "owner", User.id != user.id,
                    or_(User.expires_at.is_(None), User.expires_at > now)).order_by(User.name))
        return self.s.scalars(q).first()

    def _expiry_plan(self, user: User, expires_at: datetime, grace_days: int, dry_run: bool) -> ExpiryPlan:
        plan = ExpiryPlan(user=user.name, expires_at=expires_at, dry_run=dry_run,
                          archive_after=expires_at + timedelta(days=grace_days))
        for p in self.s.scalars(select(Project).where(Project.owner_id == user.id).order_by(Project.name)):
            if p.kind == "personal":
                tags = self.s.scalar(select(func.count(Tag.id)).join(Repository).where(Repository.project_id == p.id))
                plan.frozen.append(p.name)
                plan.archive.append(PersonalArchive(p.name, int(tags or 0)))
            else:
                heir = self._other_owner(p, user, expires_at)
                (plan.handover if heir else plan.flagged).append(Heir(p.name, heir.name if heir else None))
        return plan

    def set_expiry(self, principal: Principal, name: str, expires_at: datetime | None, grace_days: int,
                   dry_run: bool) -> ExpiryPlan:
        require_admin(principal)
        user = self.user(name)
        if user is None:
            raise NotFound(f"no such user: {name} (users appear at their first login or project membership)")
        plan = self._expiry_plan(user, expires_at, grace_days, dry_run) if expires_at \
            else ExpiryPlan(user=name, expires_at=None, dry_run=dry_run)
        if not dry_run:
            user.expires_at = expires_at
            self.audit("admin.user.expires", principal.name,
                       details={"user": name, "expires_at": expires_at.isoformat() + "Z" if expires_at else None})
        return plan

    def hand_over(self, now: datetime, dry_run: bool) -> list[Handover]:
        """Group projects owned by expired users: to another owner, or flagged for an admin (never deleted)."""
        out = []
        q = (select(Project).join(User, Project.owner_id == User.id)
             .where(Project.kind != "personal", User.expires_at.is_not(None), User.expires_at <= now))
        for p in self.s.scalars(q.order_by(Project.name)):
            old = p.owner
            assert old is not None
            heir = self._other_owner(p, old, now)
            item = Handover(project=p.name, owner=old.name, to=heir.name if heir else None,
                            action="handover" if heir else "flagged")
            out.append(item)
            if dry_run:
                continue
            if heir:
                p.owner_id = heir.id
                self.audit("project.handover", MAINTAIN, details=item.as_dict())
            else:
                self.audit("project.flagged", MAINTAIN, details={**item.as_dict(), "why": "its only owner expired"})
        return out

    def archive_due(self, now: datetime, grace_days: int) -> list[tuple[str, list[TagRow]]]:
        """Personal projects of users expired for longer than the grace period, with their tags."""
        limit = now - timedelta(days=grace_days)
        q = (select(Project).join(User, Project.owner_id == User.id)
             .where(Project.kind == "personal", User.expires_at.is_not(None), User.expires_at <= limit))
        out = []
        for p in self.s.scalars(q.order_by(Project.name)):
            rows = [TagRow(r.name, t.name, t.digest, t.media_type, t.size)
                    for r in self.s.scalars(select(Repository).where(Repository.project_id == p.id)) for t in r.tags]
            out.append((p.name, sorted(rows, key=lambda x: (x.repository, x.tag))))
        return out
