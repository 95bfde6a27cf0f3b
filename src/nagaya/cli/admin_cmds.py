"""`nagaya admin`: site administration helpers that need no server."""

from __future__ import annotations

import pwd

import typer

from nagaya.cli.common import fail, print_json
from nagaya.errors import UsageError
from nagaya.runtime import subids

app = typer.Typer(help="Site administration.", no_args_is_help=True)


@app.command("subid")
def subid(user: str = typer.Argument(..., help="user name"),
          json_out: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Print the /etc/subuid and /etc/subgid lines USER needs for builds and the runc backend.

    Existing ranges are shown as they are; otherwise a free 65536-id range after every range in use.
    For LDAP users, put the same lines in /etc/subuid and /etc/subgid on every node (or serve them
    through SSSD's subid support) — ranges must not overlap between users."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        fail(UsageError(f"no such user {user!r}"))
    have_u = subids.ranges("/etc/subuid", pw.pw_name, pw.pw_uid)
    have_g = subids.ranges("/etc/subgid", pw.pw_name, pw.pw_uid)
    line = subids.suggest_line(pw.pw_name)
    out = {
        "user": pw.pw_name,
        "subuid": [f"{pw.pw_name}:{s}:{c}" for s, c in have_u] or [line],
        "subgid": [f"{pw.pw_name}:{s}:{c}" for s, c in have_g] or [line],
        "configured": bool(have_u and have_g),
    }
    if json_out:
        print_json(out)
        return
    state = "already configured" if out["configured"] else "add these lines"
    print(f"# {pw.pw_name}: {state}")
    print("# /etc/subuid")
    print("\n".join(out["subuid"]))
    print("# /etc/subgid")
    print("\n".join(out["subgid"]))
