"""The registry's token service (`GET /token`, the distribution token auth spec): credentials -> a short-lived
registry token for what `authorize` grants, with pushes refused up front for frozen or full projects."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request

from nagaya.errors import PermissionDenied, UsageError
from nagaya.server.base import Site, credentials
from nagaya.server.offload import quick
from nagaya.server.tokens import Scope
from nagaya.sitedb import authorize
from nagaya.sitedb.service import SiteService
from nagaya.sitedb.tokens import ROBOT_RE


def router(site: Site) -> APIRouter:
    settings = site.settings
    r = APIRouter(tags=["registry"])

    @r.get("/token", summary="Docker registry token (distribution token auth spec)")
    async def token(request: Request, service: str = "", scope: list[str] = Query(default_factory=list),
                    account: str = "") -> dict[str, Any]:
        if service and service != settings.service:
            raise UsageError(f"unknown service {service!r}")
        creds = credentials(request)
        if creds is not None and not ROBOT_RE.match(creds[0]) and not creds[1].startswith("nyp_"):
            # A password: PAM or LDAP may take seconds (failure delays). The default pool, so that a few
            # wrong passwords never hold up the token requests of the small pool.
            ip = request.client.host if request.client else ""
            return await anyio.to_thread.run_sync(issue_token, creds, scope, ip)
        return await quick(issue_token, creds, scope)

    def issue_token(creds: tuple[str, str] | None, scope: list[str], ip: str = "") -> dict[str, Any]:
        with site.db.session() as s:
            svc = SiteService(s)
            principal = site.principal(svc, creds, ip=ip)
            access = []
            for text in scope:
                for part in text.split(" "):                 # some clients join several scopes with spaces
                    sc = Scope.parse(part)
                    if sc is None:
                        continue
                    if sc.type == "repository":
                        granted = authorize(s, principal, sc.name, sc.actions)
                        if "push" in granted and (why := svc.push_refusal(sc.name)):
                            # refuse the whole request: a token without `push` gives clients no reason
                            svc.audit("quota.refused", principal.name, repository=sc.name, details={"why": why})
                            s.commit()
                            raise PermissionDenied(why)
                        actions = [a for a in ("pull", "push", "delete") if a in granted]
                        if "*" in sc.actions and granted >= {"pull", "push", "delete"}:
                            actions = ["*"]
                    elif sc.type == "registry" and sc.name == "catalog":
                        actions = ["*"] if principal.kind == "user" and principal.is_admin else []
                    else:
                        actions = []
                    access.append({"type": sc.type, "name": sc.name, "actions": actions})
            return site.issuer.issue(principal.name, access)

    return r
