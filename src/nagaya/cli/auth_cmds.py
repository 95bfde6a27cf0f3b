"""`nagaya login` / `nagaya logout`, and the API client every site command uses."""

from __future__ import annotations

import getpass
import os
import pwd
import sys
from typing import Any

import typer

from nagaya import config
from nagaya.cli.common import console, print_json
from nagaya.errors import NagayaError, UsageError

REGISTRY = typer.Option(None, "--registry", envvar="NAGAYA_REGISTRY",
                        help="which login to use (HOST:PORT); default: the most recent")


def api_client(registry: str | None = None) -> Any:
    """An API client authenticated with the stored personal access token."""
    from nagaya.client import authfile
    from nagaya.client.api import Api

    login = authfile.current(registry)
    return Api(login.server, login.username, login.secret)


def _default_server() -> str:
    cfg = config.load()
    if cfg.server.url:
        return cfg.server.url
    from nagaya.server import site

    try:
        return site.status(cfg).server
    except NagayaError:
        raise UsageError("no SERVER given and no local site found; `nagaya login http://HOST:PORT`") from None


def login(server: str = typer.Argument(None, help="server URL (http://HOST:PORT) or registry HOST:PORT; "
                                       "default: the configured or local site"),
          username: str = typer.Option(None, "--username", "-u", help="default: your Unix user name"),
          password_stdin: bool = typer.Option(False, "--password-stdin", help="read the password from stdin"),
          json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Log in with your Unix (or LDAP) password; stores a personal access token, never the password."""
    from nagaya.client import authfile
    from nagaya.client.api import Api, discover

    registry, server_url = discover(server or _default_server())
    user = username or pwd.getpwuid(os.getuid()).pw_name
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
    else:
        raise UsageError("no terminal to ask for a password; use --password-stdin")
    if not password:
        raise UsageError("empty password")
    dev = authfile.device(server_url, user)
    res = Api(server_url, user, password).post("/api/login", json={"token_name": f"nagaya-login@{os.uname()[1]}"},
                                               headers={"X-Nagaya-Device": dev} if dev else None)
    path = authfile.store(authfile.Login(registry=registry, server=server_url, username=res["username"],
                                         secret=res["token"]), device_token=res.get("device"))
    if json_out:
        print_json({"registry": registry, "server": server_url, "username": res["username"],
                    "personal_project": res.get("personal_project"), "expires_at": res.get("expires_at"),
                    "auth_file": str(path)})
    else:
        console.print(f"Login Succeeded: {res['username']} at {registry} (token until "
                      f"{str(res.get('expires_at'))[:10]}, saved in {path})", highlight=False)


def logout(registry: str = typer.Argument(None, help="registry HOST:PORT; default: the most recent login"),
           json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Revoke the stored personal access token and forget it."""
    from nagaya.client import authfile
    from nagaya.client.api import Api

    login_ = authfile.current(registry)
    revoked = True
    try:
        Api(login_.server, login_.username, login_.secret).post("/api/logout")
    except NagayaError:
        revoked = False            # server gone or token already invalid: still forget it locally
    authfile.remove(login_.registry)
    if json_out:
        print_json({"registry": login_.registry, "revoked": revoked})
    else:
        console.print(f"Removed login credentials for {login_.registry}", highlight=False)
