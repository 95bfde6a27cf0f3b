"""The site database's one door over one session: `SiteService(session)` is every part at once, so the API,
the portal, the token service, maintenance and the CLI's server-side commands reach each operation by the
same name. Each operation is written once, in the part of its concern:

- users.py         accounts: login record, principal, the admins' user list, account expiry
- projects.py      projects, members and roles, tag policy (retention, immutable tags)
- tokens.py        personal access tokens and robot tokens (create, list, revoke, rotate)
- repositories.py  the repository index (registry notifications, listing, forgetting a deleted image)
- usage.py         storage use and quotas (the quota check's figure)
- auditlog.py      the audit trail's one query and the CLI's records
- archive.py       expired accounts' archived images
- dashboard.py     the portal's at-a-glance figures
Every check goes through `authz`; every audit row through `Part.audit`."""

from __future__ import annotations

from nagaya.sitedb.archive import Archive
from nagaya.sitedb.auditlog import AuditLog
from nagaya.sitedb.dashboard import Dashboard
from nagaya.sitedb.projects import Projects
from nagaya.sitedb.repositories import Repositories
from nagaya.sitedb.tokens import Tokens
from nagaya.sitedb.usage import Usage
from nagaya.sitedb.users import Users


class SiteService(Users, Projects, Tokens, Repositories, Usage, AuditLog, Archive, Dashboard):
    """All parts over one session (they share `s` and `audit` from `Part`; no method is defined twice)."""
