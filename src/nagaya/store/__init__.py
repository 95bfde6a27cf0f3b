"""The site database: users, groups, projects, memberships, tokens, the repository index and audit events.

Front door: `Database` (engine + sessions + migrations), `authorize` (the one permission check shared by the
CLI and the server) and the operations in `service`. SQLAlchemy is imported here, so nothing on the
`nagaya run` path imports this package.
"""

from nagaya.store.authz import ACTIONS, ROLES, Principal, authorize
from nagaya.store.db import Database

__all__ = ["ACTIONS", "ROLES", "Database", "Principal", "authorize"]
