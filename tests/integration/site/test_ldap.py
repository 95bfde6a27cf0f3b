"""The LDAP password back end against a real slapd (Debian's, started here as `openldap` on a private port):
the authenticator alone, then a whole site with `server.auth = ldap` and a login through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.ports import free_port
from tests.integration.site.conftest import SiteUser, require, run_root, site_down, site_up

pytestmark = pytest.mark.integration

SUFFIX = "dc=nagaya,dc=test"
ROOT_DN, ROOT_PW = f"cn=admin,{SUFFIX}", "root-secret"
USER, PASSWORD = "ldapuser", "ldap-pass-1"


@dataclass
class Ldap:
    uri: str

    def config(self) -> dict[str, str]:
        return {"uri": self.uri, "user_dn": f"uid={{username}},ou=people,{SUFFIX}", "base_dn": SUFFIX,
                "user_filter": "(&(objectClass=posixAccount)(uid={username}))",
                "group_filter": "(&(objectClass=posixGroup)(memberUid={username}))",
                "group_lookup_filter": "(&(objectClass=posixGroup)(cn={group}))",
                "bind_dn": ROOT_DN, "bind_password": ROOT_PW, "start_tls": False}


@pytest.fixture(scope="module")
def ldap(site_system: None) -> Iterator[Ldap]:
    require(shutil.which("slapd") is not None or Path("/usr/sbin/slapd").exists(),
            "slapd is not installed (apt-get install slapd ldap-utils)")
    require(shutil.which("ldapadd") is not None, "ldap-utils is not installed")
    d = Path(tempfile.mkdtemp(prefix="nagaya-ldap-"))
    d.chmod(0o755)
    (d / "db").mkdir()
    (d / "slapd.conf").write_text(f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {d}/db/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {d}/db
""")
    shutil.chown(d / "db", "openldap", "openldap")
    port = free_port()
    uri = f"ldap://127.0.0.1:{port}"
    # -d 0: stay in the foreground, so this fixture owns (and stops) the daemon
    proc = subprocess.Popen(["/usr/sbin/slapd", "-d", "0", "-f", str(d / "slapd.conf"), "-h", uri + "/",
                             "-u", "openldap", "-g", "openldap"], stdout=subprocess.DEVNULL,
                            stderr=open(d / "slapd.log", "wb"))
    try:
        deadline = time.monotonic() + 20
        while True:
            if run_root(["ldapsearch", "-x", "-H", uri, "-b", "", "-s", "base"]).returncode in (0, 32):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (d / "slapd.log").read_text()
            time.sleep(0.1)
        hashed = run_root(["slappasswd", "-s", PASSWORD]).stdout.strip()
        ldif = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: nagaya test
dc: nagaya

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups

dn: uid={USER},ou=people,{SUFFIX}
objectClass: inetOrgPerson
objectClass: posixAccount
uid: {USER}
cn: LDAP User
sn: User
uidNumber: 70001
gidNumber: 70001
homeDirectory: /nonexistent
userPassword: {hashed}

dn: cn=ldaplab,ou=groups,{SUFFIX}
objectClass: posixGroup
cn: ldaplab
gidNumber: 70100
memberUid: {USER}
"""
        r = run_root(["ldapadd", "-x", "-H", uri, "-D", ROOT_DN, "-w", ROOT_PW], input=ldif)
        assert r.returncode == 0, r.stderr
        yield Ldap(uri)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_ldap_authenticator(ldap: Ldap) -> None:
    from nagaya.server.authn import LdapAuthenticator, make_authenticator

    a = make_authenticator("ldap", "nagaya", ldap.config())
    assert isinstance(a, LdapAuthenticator)
    ident = a.authenticate(USER, PASSWORD)
    assert ident is not None and ident.uid == 70001 and ident.groups == frozenset({"ldaplab"})
    assert a.authenticate(USER, "wrong") is None
    assert a.authenticate(USER, "") is None                      # never an anonymous bind
    assert a.authenticate("nosuch", PASSWORD) is None
    assert a.authenticate("*", PASSWORD) is None                 # filter/DN injection
    assert a.user(USER) == ident and a.user("nosuch") is None
    assert a.group_id("ldaplab") == 70100 and a.group_id("nogroup") is False


def test_site_with_ldap_login(ldap: Ldap, base_dir: Path, people: dict[str, SiteUser]) -> None:
    cfg = ldap.config()
    env = {"NAGAYA_SERVER_AUTH": "ldap", **{f"NAGAYA_LDAP_{k.upper()}": str(v) for k, v in cfg.items()}}
    d = base_dir / "ldap-site"
    s = site_up(d, env=env)
    try:
        runner = people["outsider"]          # any unprivileged Unix account runs the client
        r = runner.nagaya("login", "--username", USER, "--password-stdin", "--json", s.server,
                          input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["personal_project"] == USER
        r = runner.nagaya("login", "--username", USER, "--password-stdin", s.server, input="nope\n")
        assert r.returncode == 5
        r = runner.nagaya("project", "create", "ldap-proj", "--registry", s.registry, "--json")
        assert r.returncode == 0, r.stderr
        r = runner.nagaya("project", "member", "add", "ldap-proj", "ldaplab", "--group", "--role", "guest",
                          "--registry", s.registry)
        assert r.returncode == 0, r.stderr
        r = runner.nagaya("project", "member", "add", "ldap-proj", "nosuch", "--role", "guest",
                          "--registry", s.registry)
        assert r.returncode == 3
    finally:
        site_down(d)
        people["outsider"].nagaya("logout", s.registry)
