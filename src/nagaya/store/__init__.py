"""The site database (not the image cache: that is nagaya.image.store.ImageStore, on each node): users,
groups, projects, memberships, tokens, the repository index and audit events.

Front door: `SiteDatabase` (engine + sessions + migrations), `authorize` (the one permission check shared by
the CLI and the server), `SiteService` (service.py), storage use (usage.py), the audit trail's one query
(auditlog.py) and quotas, retention and account expiry (lifecycle.py). SQLAlchemy is imported here, so
nothing on the `nagaya run` path imports this package.
"""

from nagaya.store.authz import ACTIONS, ROLES, Principal, authorize
from nagaya.store.db import SiteDatabase

__all__ = ["ACTIONS", "ROLES", "Principal", "SiteDatabase", "authorize"]
