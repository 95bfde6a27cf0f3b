"""`nagaya admin`: site administration — `subid` needs no server; `audit` and `project quota` call the
site's admin API with the stored login of a site admin."""

from __future__ import annotations

import csv
import pwd
import sys
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer

from nagaya.cli.auth_cmds import REGISTRY, api_client
from nagaya.cli.common import console, print_json
from nagaya.errors import UsageError
from nagaya.runtime import subids
from nagaya.units import format_size, parse_size, parse_when

app = typer.Typer(help="Site administration.", no_args_is_help=True)
project_app = typer.Typer(help="Project settings only site admins change (quotas).", no_args_is_help=True)
app.add_typer(project_app, name="project")

AUDIT_COLUMNS = ("time", "action", "actor", "repository", "tag", "digest", "source", "details")


@app.command("audit")
def audit(user: str = typer.Option("", "--user", help="only this actor"),
          since: str = typer.Option("", "--since", help="ISO date/time or an age (7d, 12h)"),
          until: str = typer.Option("", "--until", help="ISO date/time or an age"),
          image: str = typer.Option("", "--image", help="[HOST/]PROJECT/NAME[:TAG][@DIGEST] or a digest"),
          action: str = typer.Option("", "--action", help="action prefix (cli.run, registry.push, admin, ...)"),
          repository: str = typer.Option("", "--repository", help="repositories whose name contains this"),
          limit: int = typer.Option(1000, "--limit", help="at most this many (newest) events"),
          json_out: bool = typer.Option(False, "--json", help="JSON output"),
          csv_out: bool = typer.Option(False, "--csv", help="CSV output"),
          registry: str = REGISTRY) -> None:
    """Query the site's one audit trail: logins, pushes, pulls, CLI runs and submits, admin actions."""
    params: dict[str, Any] = {"limit": limit}
    if user:
        params["user"] = user
    if since:
        params["since"] = parse_when(since).isoformat()
    if until:
        params["until"] = parse_when(until).isoformat()
    if image:
        params["image"] = image
    if action:
        params["action"] = action
    if repository:
        params["repository"] = repository
    rows = api_client(registry).get("/api/admin/audit", params=params)
    if json_out:
        print_json(rows)
        return
    if csv_out:
        from nagaya.encode import csv_row

        w = csv.writer(sys.stdout)
        w.writerow(AUDIT_COLUMNS)
        for r in rows:               # actors include failed logins' user names: anyone's text, never a formula
            w.writerow(csv_row([r["time"], r["action"], r["actor"], r["repository"], r["tag"], r["digest"],
                                r["source"], _compact(r["details"])]))
        return
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, header_style="bold")
    for c in ("TIME", "ACTION", "ACTOR", "IMAGE", "DIGEST"):
        t.add_column(c)
    for r in rows:
        img = r["repository"] + (f":{r['tag']}" if r["tag"] else "")
        # Text, not str: rich would read `[...]` in a user's text as markup
        t.add_row(*(Text(x) for x in (r["time"][:19], r["action"], r["actor"],
                                      img or str(r["details"].get("project", "")), r["digest"][:19])))
    console.print(t)


def _compact(d: Any) -> str:
    import json

    return json.dumps(d, separators=(",", ":"), sort_keys=True, default=str)


@project_app.command("quota")
def quota(project: str = typer.Argument(...),
          size: str = typer.Argument(None, help="e.g. 500M, 20G; `none` removes the quota; omit to show it"),
          registry: str = REGISTRY, json_out: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Show or set a project's storage quota; pushes are refused once its images reach it."""
    api = api_client(registry)
    url = f"/api/admin/projects/{quote(project, safe='')}/quota"
    if size is None:
        q = api.get(url)
    else:
        q = api.request("PUT", url, json={"quota_bytes": None if size.lower() in ("none", "unlimited")
                                          else parse_size(size)})
    if json_out:
        print_json(q)
        return
    limit = format_size(q["quota_bytes"]) if q["quota_bytes"] is not None else "unlimited"
    console.print(f"{q['project']}: {format_size(q['used_bytes'])} used, quota {limit}", highlight=False)


@project_app.command("usage")
def usage(registry: str = REGISTRY, json_out: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Every project's storage use and quota: the figures the quota check and the admin page use."""
    from rich.table import Table

    rows = api_client(registry).get("/api/admin/usage")
    if json_out:
        print_json(rows)
        return
    t = Table(box=None, header_style="bold")
    for c in ("PROJECT", "KIND", "OWNER", "USED", "QUOTA", "OF USED: ATTACHMENTS"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["kind"], r["owner"] or "-", format_size(r["used"]),
                  format_size(r["quota"]) if r["quota"] is not None else "none",
                  format_size(int(r.get("attachments") or 0)))
    console.print(t)


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
        raise UsageError(f"no such user {user!r}") from None
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


@project_app.command("policy")
def policy(project: str = typer.Argument(...),
           keep: str = typer.Option(None, "--keep", help="keep the newest N tags per repository (`all`: no limit)"),
           keep_pattern: str = typer.Option(None, "--keep-pattern", help="comma-separated globs always kept"),
           immutable: str = typer.Option(None, "--immutable", help="comma-separated globs no push may move"),
           registry: str = REGISTRY, json_out: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Set a project's retention (applied by `nagaya admin maintain`) and immutable tag patterns."""
    body: dict[str, Any] = {}
    if keep is not None:
        if keep.lower() in ("all", "none"):
            body["keep_newest"] = None
        elif keep.isdigit():
            body["keep_newest"] = int(keep)
        else:
            raise UsageError(f"--keep takes a number or `all`, not {keep!r}")
    if keep_pattern is not None:
        body["keep_pattern"] = keep_pattern
    if immutable is not None:
        body["immutable_pattern"] = immutable
    p = api_client(registry).request("PUT", f"/api/admin/projects/{quote(project, safe='')}/policy", json=body)
    if json_out:
        print_json(p)
        return
    keep_n = "all" if p["keep_newest"] is None else p["keep_newest"]
    console.print(f"{p['project']}: keep newest {keep_n}, keep {p['keep_pattern'] or '-'}, "
                  f"immutable {p['immutable_pattern'] or '-'}", highlight=False)


@app.command("maintain")
def maintain(state_dir: Path = typer.Option(None, "--state-dir", help="the site's state dir (default: local)"),
             dry_run: bool = typer.Option(False, "--dry-run", help="report what would happen; change nothing"),
             now: str = typer.Option("", "--now", help="act as if it were this time (ISO; for tests and catch-up)"),
             no_gc: bool = typer.Option(False, "--no-gc", help="skip the registry's garbage collection"),
             no_cache_gc: bool = typer.Option(False, "--no-cache-gc", help="skip the shared node caches' gc"),
             json_out: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """The periodic site job (cron/systemd timer on the site host, as root): ingest the audit spool, shrink
    shared node caches to [image] cache_max_size, expire accounts, apply retention, then registry garbage
    collection with the registry stopped. Idempotent, and safe to run twice at once (the second skips)."""
    from nagaya import config
    from nagaya.server.maintain import maintain as run_maintenance
    from nagaya.sitedb import clock

    # the site clock: real time unless NAGAYA_CLOCK_OFFSET moves it (tests, rehearsals), or --now
    when = parse_when(now, clock.now().replace(tzinfo=UTC)) if now else clock.now().replace(tzinfo=UTC)
    report = run_maintenance(config.load(), state_dir, dry_run=dry_run,
                             now=when.astimezone(UTC).replace(tzinfo=None), gc=not no_gc,
                             cache_gc=not no_cache_gc)
    if json_out:
        print_json(report)
        return
    if report.get("skipped"):
        console.print(f"skipped: {report['skipped']}", highlight=False)
        return
    verb = "would delete" if dry_run else "deleted"
    sp = report.get("audit_spool")
    if sp:
        console.print(f"audit spool: {sp['ingested']} record(s) {'to ingest' if dry_run else 'ingested'}, "
                      f"{sp['duplicates']} already there, {sp['refused'] + sp['malformed']} refused", highlight=False)
        for e in sp["errors"]:
            console.print(f"audit spool: {e}", highlight=False)
    for c in report.get("cache_gc", []):
        if "skipped" in c or "error" in c:
            console.print(f"cache {c['cache']}: {c.get('skipped') or c.get('error')}", highlight=False)
        else:
            console.print(f"cache {c['cache']}: {len(c['removed_images'])} image(s) {verb.split()[-1]}, "
                          f"{format_size(c['size_before'])} -> {format_size(c['size_after'])}, "
                          f"{len(c['kept_in_use'])} kept in use", highlight=False)
    logs = report.get("job_logs") or {}
    if logs.get("removed") or logs.get("skipped"):
        what = logs.get("skipped") or f"{len(logs['removed'])} old file(s) {verb.split()[-1]}"
        console.print(f"job logs: {what}", highlight=False)
    if report.get("tokens_pruned"):
        console.print(f"access tokens expired long ago: {report['tokens_pruned']} {verb.split()[-1]}", highlight=False)
    for h in report.get("handover", []):
        what = f"handed over to {h['to']}" if h["to"] else "flagged: no other owner"
        console.print(f"project {h['project']} of expired {h['from']}: {what}", highlight=False)
    for a in report.get("archived", []):
        state = "archived and removed" if a["removed"] else a.get("error", "would be archived and removed")
        console.print(f"{a['repository']}:{a['tag']} -> {a['file']}: {state}", highlight=False)
    for r in report["retention"]:
        console.print(f"{verb} {r['repository']}@{r['digest'][:19]} ({', '.join(r['tags'])})", highlight=False)
    gc = report.get("gc") or {}
    blobs = gc.get("blobs_removed", gc.get("blobs_eligible", []))
    console.print(f"garbage collection: {len(blobs)} unreferenced blob(s) {'eligible' if dry_run else 'removed'}",
                  highlight=False)


user_app = typer.Typer(help="Accounts: expiry (end of term).", no_args_is_help=True)
app.add_typer(user_app, name="user")


@user_app.command("set")
def user_set(user: str = typer.Argument(...),
             expires: str = typer.Option(..., "--expires", help="ISO date/time (UTC), or `never`"),
             dry_run: bool = typer.Option(False, "--dry-run", help="show the consequences; change nothing"),
             registry: str = REGISTRY, json_out: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Set when an account expires: warnings before, then no login or token and a frozen personal project;
    after the grace period `nagaya admin maintain` archives and removes its images. Group projects it owns
    go to another owner, or are flagged for an admin — never deleted."""
    when = None if expires.lower() in ("never", "none") else parse_when(expires).isoformat()
    out = api_client(registry).request("PUT", f"/api/admin/users/{quote(user, safe='')}/expiry",
                                       json={"expires_at": when, "dry_run": dry_run})
    if json_out:
        print_json(out)
        return
    if out["expires_at"] is None:
        console.print(f"{user}: never expires", highlight=False)
        return
    head = "would expire" if dry_run else "expires"
    console.print(f"{user} {head} at {out['expires_at']}; images archived and removed after {out['archive_after']}",
                  highlight=False)
    for p in out["frozen"]:
        console.print(f"  frozen at expiry: {p}", highlight=False)
    for h in out["handover"]:
        console.print(f"  handed over: {h['project']} -> {h['to']}", highlight=False)
    for f in out["flagged"]:
        console.print(f"  flagged (no other owner): {f['project']}", highlight=False)
