"""The site database (not the image cache: that is nagaya.image.store.ImageStore, on each node): users,
groups, projects, memberships, tokens, the repository index and audit events.

Front door: `SiteDatabase` (engine + sessions + migrations), `authorize` (the one permission check shared by
the CLI and the server) and `SiteService` (service.py): every operation over one session, each written once
in the part of its concern (users, projects, tokens, repositories, usage, auditlog, archive, dashboard).
SQLAlchemy is imported here, so nothing on the `nagaya run` path imports this package.
"""

from nagaya.sitedb.authz import ACTIONS, ROLES, Principal, authorize
from nagaya.sitedb.db import SiteDatabase

__all__ = ["ACTIONS", "ROLES", "Principal", "SiteDatabase", "authorize"]
