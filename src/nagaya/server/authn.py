"""Password back ends, chosen in config (JupyterHub's Authenticator shape): a small Protocol with a PAM
implementation (real Unix accounts) and an LDAP one. They only check passwords and answer who exists and
in which groups; everything else (projects, roles, tokens) lives in the site database."""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass
from typing import Any, Protocol

from nagaya.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int | None
    groups: frozenset[str]


class Authenticator(Protocol):
    def authenticate(self, username: str, password: str) -> Identity | None:
        """The identity if the password is right, else None (never raises for bad credentials)."""
        ...

    def user(self, name: str) -> Identity | None:
        """Look a user up without a password (to add them to a project before their first login)."""
        ...

    def group_id(self, name: str) -> int | bool | None:
        """The group's gid, True when it exists without a numeric id, False when it does not exist."""
        ...


class PamAuthenticator:
    """Unix accounts: passwords through PAM, users and groups through NSS (so sssd/LDAP-backed NSS works
    too). pam_unix verifies another user's password only for root or the `shadow` group, which is why
    the service account is in that group."""

    def __init__(self, service: str = "nagaya") -> None:
        # Debian ships no /etc/pam.d/nagaya unless deploy/install.sh created it; "login" is always there.
        self.service = service if os.path.exists(f"/etc/pam.d/{service}") else "login"

    def authenticate(self, username: str, password: str) -> Identity | None:
        ident = self.user(username)
        if ident is None or not password:
            return None
        import pam

        p = pam.pam()
        if p.authenticate(username, password, service=self.service, resetcreds=False):
            return ident
        log.info("PAM refused %s: %s", username, p.reason)
        return None

    def user(self, name: str) -> Identity | None:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            return None
        names = set()
        for gid in os.getgrouplist(pw.pw_name, pw.pw_gid):
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:
                continue
        return Identity(name=pw.pw_name, uid=pw.pw_uid, groups=frozenset(names))

    def group_id(self, name: str) -> int | bool | None:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return False


class LdapAuthenticator:
    """LDAP: a simple bind as the user checks the password; posixAccount/posixGroup searches give the uid
    and groups. Filters and DNs come from the [ldap] config section."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        if not cfg.get("uri"):
            raise UsageError("server.auth = ldap needs ldap.uri")
        self.cfg = cfg

    def _server(self) -> Any:
        import ldap3

        return ldap3.Server(self.cfg["uri"], get_info=ldap3.NONE, connect_timeout=5)

    def _conn(self, user: str | None = None, password: str | None = None) -> Any:
        import ldap3

        conn = ldap3.Connection(self._server(), user=user, password=password, receive_timeout=10,
                                raise_exceptions=False)
        if self.cfg.get("start_tls"):
            conn.open()
            conn.start_tls()
        return conn

    def _search_conn(self) -> Any:
        conn = self._conn(self.cfg.get("bind_dn") or None, self.cfg.get("bind_password") or None)
        if not conn.bind():             # "no such user" must never be the answer of a directory that refused us
            raise UsageError(f"cannot search the directory at {self.cfg['uri']}: {conn.result.get('description')}")
        return conn

    @staticmethod
    def _escape(value: str) -> str:
        from ldap3.utils.conv import escape_filter_chars

        return str(escape_filter_chars(value))

    def _lookup(self, conn: Any, name: str) -> Identity | None:
        base = self.cfg.get("base_dn", "")
        if not conn.search(base, self.cfg["user_filter"].format(username=self._escape(name)),
                           attributes=["uid", "uidNumber"]) or not conn.entries:
            return None
        e = conn.entries[0]
        uid = int(e.uidNumber.value) if "uidNumber" in e and e.uidNumber.value is not None else None
        groups: set[str] = set()
        if conn.search(base, self.cfg["group_filter"].format(username=self._escape(name)), attributes=["cn"]):
            groups = {str(g.cn.value) for g in conn.entries}
        return Identity(name=name, uid=uid, groups=frozenset(groups))

    def authenticate(self, username: str, password: str) -> Identity | None:
        if not password:     # an empty password is an anonymous bind in LDAP: never a login
            return None
        dn = self.cfg["user_dn"].format(username=self._escape_dn(username))
        conn = self._conn(dn, password)
        try:
            if not conn.bind():
                return None
            return self._lookup(conn, username)
        finally:
            conn.unbind()

    @staticmethod
    def _escape_dn(value: str) -> str:
        from ldap3.utils.dn import escape_rdn

        return str(escape_rdn(value))

    def user(self, name: str) -> Identity | None:
        conn = self._search_conn()
        try:
            return self._lookup(conn, name)
        finally:
            conn.unbind()

    def group_id(self, name: str) -> int | bool | None:
        conn = self._search_conn()
        try:
            flt = self.cfg["group_lookup_filter"].format(group=self._escape(name))
            if not conn.search(self.cfg.get("base_dn", ""), flt, attributes=["gidNumber"]) or not conn.entries:
                return False
            e = conn.entries[0]
            return int(e.gidNumber.value) if "gidNumber" in e and e.gidNumber.value is not None else True
        finally:
            conn.unbind()


def make_authenticator(kind: str, pam_service: str, ldap: dict[str, Any]) -> Authenticator:
    if kind == "pam":
        return PamAuthenticator(pam_service)
    if kind == "ldap":
        return LdapAuthenticator(ldap)
    raise UsageError(f"server.auth must be pam or ldap, not {kind!r}")
