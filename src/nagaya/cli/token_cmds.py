"""`nagaya token create|ls|revoke`: robot tokens for CI, scoped to one project, expiring, shown once."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote

import typer
from rich.table import Table

from nagaya.cli.auth_cmds import REGISTRY, api_client
from nagaya.cli.common import console, err_console, print_json
from nagaya.errors import UsageError
from nagaya.units import parse_expiry

app = typer.Typer(help="Robot tokens for CI: project-scoped, expiring, stored hashed.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="machine-readable output")


@app.command()
def create(project: str = typer.Option(..., "--project", "-p"),
           scope: str = typer.Option(..., "--scope", "-s", help="pull | push (push includes pull)"),
           expires: str = typer.Option(..., "--expires", "-e", help="lifetime: 30d, 12h, 2w, or never"),
           name: str = typer.Option(None, "--name", "-n", help="default: robot-<random>"),
           registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """Create a robot token; its secret is printed once and cannot be shown again."""
    ttl = parse_expiry(expires)
    body = {"name": name or f"robot-{secrets.token_hex(3)}", "scope": scope,
            "expires_in": int(ttl.total_seconds()) if ttl else None}
    t = api_client(registry).post(f"/api/projects/{quote(project, safe='')}/tokens", json=body)
    _show_secret(t, json_out)


def _show_secret(t: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(t)
        return
    console.print(f"username  {t['username']}\nsecret    {t['secret']}\nscope     {t['scope']} on {t['project']}\n"
                  f"expires   {t['expires_at'] or 'never'}", highlight=False)
    err_console.print("The secret is shown only now; store it in your CI's secret store.", highlight=False)


def _token_path(token: str, project: str | None) -> str:
    """robot$PROJECT+NAME, or NAME with --project -> the token's API path."""
    if token.startswith("robot$"):
        proj, _, name = token[len("robot$"):].partition("+")
        if not name or (project and project != proj):
            raise UsageError(f"invalid robot token name {token!r}")
    elif project:
        proj, name = project, token
    else:
        raise UsageError("give robot$PROJECT+NAME, or NAME with --project")
    return f"/api/projects/{quote(proj, safe='')}/tokens/{quote(name, safe='')}"


@app.command("ls")
def ls(project: str = typer.Option(None, "--project", "-p", help="only this project"),
       registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """List robot tokens of the projects you own or maintain (never their secrets)."""
    rows = api_client(registry).get("/api/tokens", params={"project": project} if project else None)
    if json_out:
        print_json(rows)
        return
    t = Table(box=None, header_style="bold")
    for c in ("USERNAME", "SCOPE", "STATE", "EXPIRES", "LAST USED", "CREATED BY"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["username"], r["scope"], r["state"], str(r["expires_at"] or "never")[:19],
                  str(r["last_used"] or "-")[:19], r["created_by"])
    console.print(t)


@app.command()
def revoke(token: str = typer.Argument(..., help="robot$PROJECT+NAME, or NAME with --project"),
           project: str = typer.Option(None, "--project", "-p"),
           registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """Revoke a robot token at once (its registry tokens die within their few minutes' lifetime)."""
    r = api_client(registry).delete(_token_path(token, project))
    if json_out:
        print_json(r)
    else:
        console.print(f"revoked {r['username']}", highlight=False)


@app.command()
def rotate(token: str = typer.Argument(..., help="robot$PROJECT+NAME, or NAME with --project"),
           project: str = typer.Option(None, "--project", "-p"),
           registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """A new secret for a robot token (same name, scope and expiry); the old secret stops working at once."""
    t = api_client(registry).post(_token_path(token, project) + "/rotate")
    _show_secret(t, json_out)
