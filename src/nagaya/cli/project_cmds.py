"""`nagaya project create|ls|member add|rm|ls` and `nagaya repo ls|tags|rm`."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import typer
from rich.table import Table

from nagaya.cli.auth_cmds import REGISTRY, api_client
from nagaya.cli.common import console, print_json
from nagaya.errors import NotFound, UsageError
from nagaya.units import format_size

app = typer.Typer(help="Projects (personal, group, site) and their members.", no_args_is_help=True)
member_app = typer.Typer(help="Members of a project and their roles.", no_args_is_help=True)
app.add_typer(member_app, name="member")
repo_app = typer.Typer(help="Repositories and tags in the site registry (those you may see).",
                       no_args_is_help=True)

JSON = typer.Option(False, "--json", help="machine-readable output")
ROLE_HELP = "owner | maintainer | developer | guest"


def _table(cols: tuple[str, ...], rows: list[list[str]]) -> None:
    t = Table(box=None, header_style="bold")
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    console.print(t)


@app.command()
def create(name: str = typer.Argument(..., help="project name (lowercase)"),
           site_project: bool = typer.Option(False, "--site", help="a site project: everyone pulls, admins push"),
           registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """Create a group project; you become its owner."""
    p = api_client(registry).post("/api/projects", json={"name": name, "kind": "site" if site_project else "group"})
    if json_out:
        print_json(p)
    else:
        console.print(f"created {p['kind']} project {p['name']}", highlight=False)


@app.command("ls")
def ls(registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """List the projects you can see, with your role."""
    rows = api_client(registry).get("/api/projects")
    if json_out:
        print_json(rows)
        return
    _table(("PROJECT", "KIND", "OWNER", "ROLE", "ACCESS"),
           [[p["name"], p["kind"], p["owner"], p["role"] or "-", ",".join(p["actions"])] for p in rows])


@member_app.command("add")
def member_add(project: str = typer.Argument(...), name: str = typer.Argument(..., help="user (or group) name"),
               role: str = typer.Option(..., "--role", "-r", help=ROLE_HELP),
               group: bool = typer.Option(False, "--group", "-g", help="NAME is a Unix/LDAP group"),
               registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """Add a user or group to a project, or change their role (owners only)."""
    m = api_client(registry).post(f"/api/projects/{quote(project, safe='')}/members",
                                  json={"name": name, "kind": "group" if group else "user", "role": role})
    if json_out:
        print_json(m)
    else:
        console.print(f"{m['kind']} {m['name']} is {m['role']} of {project}", highlight=False)


@member_app.command("rm")
def member_rm(project: str = typer.Argument(...), name: str = typer.Argument(...),
              group: bool = typer.Option(False, "--group", "-g", help="NAME is a group"),
              registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """Remove a user or group from a project (owners only; a project keeps at least one owner)."""
    kind = "group" if group else "user"
    r = api_client(registry).delete(f"/api/projects/{quote(project, safe='')}/members/{kind}/"
                                    f"{quote(name, safe='')}")
    if json_out:
        print_json(r)
    else:
        console.print(f"removed {kind} {name} from {project}", highlight=False)


@member_app.command("ls")
def member_ls(project: str = typer.Argument(...), registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """List a project's members (members only)."""
    rows = api_client(registry).get(f"/api/projects/{quote(project, safe='')}/members")
    if json_out:
        print_json(rows)
        return
    _table(("NAME", "KIND", "ROLE"), [[m["name"], m["kind"], m["role"]] for m in rows])


@repo_app.command("ls")
def repo_ls(project: str = typer.Argument(None, help="only this project"), registry: str = REGISTRY,
            json_out: bool = JSON) -> None:
    """List repositories you may pull from."""
    rows = api_client(registry).get("/api/repositories", params={"project": project} if project else None)
    if json_out:
        print_json(rows)
        return
    _table(("REPOSITORY", "TAGS", "UPDATED"), [[r["name"], str(r["tags"]), str(r["updated_at"] or "")[:19]]
                                              for r in rows])


@repo_app.command("tags")
def repo_tags(repository: str = typer.Argument(..., help="PROJECT/NAME"), registry: str = REGISTRY,
              show_all: bool = typer.Option(False, "--all", "-a", help="list attachment tags (sha256-HEX.sig, "
                                            ".sbom, .sqfs) as rows too"),
              json_out: bool = JSON) -> None:
    """List a repository's tags with digests, sizes, who pushed them and what is attached to each image
    (signed, SBOM, lazy-ready)."""
    from nagaya.image.attachments import badges, json_usage

    rows = api_client(registry).get(f"/api/repositories/{quote(repository)}/tags",
                                    params={"all": "true"} if show_all else None)
    if json_out:
        print_json(rows)
        return

    def attached(t: dict[str, Any]) -> str:
        if t.get("attachment_of"):
            return f"{t.get('kind', '')} of {str(t['attachment_of'])[:19]}"
        return badges(t.get("attachments") or [])

    _table(("TAG", "DIGEST", "SIZE", "PUSHED", "BY", "ATTACHED"),
           [[t["tag"], t["digest"][:19], format_size(t["size"]), str(t["pushed_at"])[:19], t["pushed_by"],
             attached(t)] for t in rows])
    count, size = json_usage(rows)
    if count:
        console.print(f"attachments: {count}, {format_size(size)} of the stored bytes (the quota counts them)",
                      highlight=False)


@repo_app.command("rm")
def repo_rm(image: str = typer.Argument(..., help="PROJECT/NAME:TAG or PROJECT/NAME@DIGEST"),
            registry: str = REGISTRY, json_out: bool = JSON) -> None:
    """Delete an image from the site registry: its manifest, so every tag on it (owners and maintainers)."""
    repository, digest = _manifest_of(api_client(registry), image)
    r = api_client(registry).delete(f"/api/repositories/{quote(repository)}/manifests/{quote(digest)}")
    if json_out:
        print_json(r)
        return
    console.print(f"deleted {r['repository']}@{r['digest']} ({r['tags']} tags)", highlight=False)


def _manifest_of(api: Any, image: str) -> tuple[str, str]:
    """PROJECT/NAME@DIGEST as given; PROJECT/NAME:TAG -> the digest the tag points at now."""
    repository, at, digest = image.partition("@")
    if at:
        return repository, digest
    repository, colon, tag = image.rpartition(":")
    if not colon or "/" in tag:
        raise UsageError(f"give PROJECT/NAME:TAG or PROJECT/NAME@DIGEST, not {image!r}")
    for t in api.get(f"/api/repositories/{quote(repository)}/tags", params={"all": "true"}):
        if t["tag"] == tag:
            return repository, str(t["digest"])
    raise NotFound(f"{repository} has no tag {tag}")
