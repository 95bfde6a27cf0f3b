"""SQLAlchemy 2 models. Times are naive UTC (`utcnow()`): SQLite and PostgreSQL then compare alike."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, Float, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from nagaya.sitedb import clock


def utcnow() -> datetime:
    """The site clock (sitedb/clock.py): real UTC except on a server started with the clock moved."""
    return clock.now()


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    uid: Mapped[int | None] = mapped_column(BigInteger)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]          # an admin-set end of access (e.g. end of term)


class Group(Base):
    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    gid: Mapped[int | None] = mapped_column(BigInteger)


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (CheckConstraint("kind IN ('personal', 'group', 'site')", name="ck_projects_kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger)   # None: unlimited
    # Retention per repository: keep the newest N tags (None: keep all) and tags matching these globs
    # (comma-separated, fnmatch); immutable tags are never moved nor removed.
    keep_newest: Mapped[int | None]
    keep_pattern: Mapped[str] = mapped_column(String(255), default="", server_default="")
    immutable_pattern: Mapped[str] = mapped_column(String(255), default="", server_default="")

    owner: Mapped[User | None] = relationship()
    memberships: Mapped[list[Membership]] = relationship(back_populates="project", cascade="all, delete-orphan",
                                                         passive_deletes=True)


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (
        CheckConstraint("(user_id IS NULL) <> (group_id IS NULL)", name="ck_memberships_principal"),
        CheckConstraint("role IN ('owner', 'maintainer', 'developer', 'guest')", name="ck_memberships_role"),
        UniqueConstraint("project_id", "user_id", name="uq_memberships_user"),
        UniqueConstraint("project_id", "group_id", name="uq_memberships_group"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    project: Mapped[Project] = relationship(back_populates="memberships")
    user: Mapped[User | None] = relationship()
    group: Mapped[Group | None] = relationship()


class RobotToken(Base):
    """A project-scoped credential for CI. Only sha256(secret) is kept: the secret is 32 random bytes,
    so a slow KDF would add nothing against guessing and cost every registry request."""

    __tablename__ = "robot_tokens"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_robot_tokens_name"),
        CheckConstraint("scope IN ('pull', 'push')", name="ck_robot_tokens_scope"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(8))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used: Mapped[datetime | None]
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))

    project: Mapped[Project] = relationship()
    created_by: Mapped[User | None] = relationship()


class UserToken(Base):
    """A personal access token, issued by a password login; what `nagaya login` stores instead of the password."""

    __tablename__ = "user_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used: Mapped[datetime | None]

    user: Mapped[User] = relationship()


class Repository(Base):
    __tablename__ = "repositories"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)     # full name: project/path
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    project: Mapped[Project] = relationship()
    tags: Mapped[list[Tag]] = relationship(back_populates="repository", cascade="all, delete-orphan",
                                           passive_deletes=True)


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("repository_id", "name", name="uq_tags_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(100), index=True)
    media_type: Mapped[str] = mapped_column(String(100), default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    pushed_at: Mapped[datetime] = mapped_column(default=utcnow)
    pushed_by: Mapped[str] = mapped_column(String(128), default="")

    repository: Mapped[Repository] = relationship(back_populates="tags")


class AuditEvent(Base):
    """Append-only: rows are only ever inserted."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_time", "time"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128), default="")
    repository: Mapped[str] = mapped_column(String(255), default="")
    tag: Mapped[str] = mapped_column(String(128), default="")
    digest: Mapped[str] = mapped_column(String(100), default="")
    source: Mapped[str] = mapped_column(String(64), default="")
    event_id: Mapped[str | None] = mapped_column(String(64), unique=True)  # the registry's id: retries dedupe
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class PortalSession(Base):
    """A portal login. In the database, not in a server process's memory: every server process sees a login
    and a logout at once. The key is the sha256 of the cookie's id, so a copy of the table opens nothing."""

    __tablename__ = "portal_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(64))
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    is_admin: Mapped[bool] = mapped_column(default=False)
    csrf: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)      # epoch seconds: idle and absolute expiry are plain arithmetic
    seen: Mapped[float] = mapped_column(Float, index=True)
    flash: Mapped[list[Any]] = mapped_column(JSON, default=list)     # messages for the next page


class LoginFailure(Base):
    """A failed portal password login, for the per user+address rate limit (shared by all server processes)."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_who", "username", "address", "time"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(128))
    address: Mapped[str] = mapped_column(String(64))
    time: Mapped[float] = mapped_column(Float)


class ImageScan(Base):
    """The latest vulnerability scan (and SBOM) of a manifest, made by the server when it was pushed
    (nagaya.server.scans); one row per digest, replaced by a rescan."""

    __tablename__ = "image_scans"

    digest: Mapped[str] = mapped_column(String(100), primary_key=True)
    repository: Mapped[str] = mapped_column(String(255), default="")
    scanned: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="done")      # done | failed
    error: Mapped[str] = mapped_column(String(500), default="")
    fixable: Mapped[int] = mapped_column(default=0)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sbom: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
