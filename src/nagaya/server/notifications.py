"""The registry's notification sink: pushes and deletes reach the index and the audit trail; a push that
moved an immutable tag is undone at once."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from nagaya.errors import AuthError, NagayaError, UsageError
from nagaya.server import scans
from nagaya.server.base import INTERNAL, Site
from nagaya.sitedb.models import Repository, Tag
from nagaya.sitedb.service import SiteService

log = logging.getLogger("nagaya.server")


def router(site: Site) -> APIRouter:
    settings = site.settings
    r = APIRouter(tags=["registry"])

    @r.post("/api/registry/events", summary="The registry's notification webhook")
    async def registry_events(request: Request) -> dict[str, Any]:
        expected = f"Bearer {settings.notify_secret}"
        if not settings.notify_secret or \
                not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected.encode()):
            raise AuthError("bad notification secret")
        try:
            envelope = json.loads(await request.body())
            events = list(envelope.get("events") or [])
        except (ValueError, AttributeError, TypeError):
            raise UsageError("not a notification envelope") from None
        return await run_in_threadpool(_apply_events, events)

    def _apply_events(events: list[dict[str, Any]]) -> dict[str, Any]:
        applied = 0
        for ev in events:
            if not isinstance(ev, dict) or (ev.get("actor") or {}).get("name") == INTERNAL:
                continue
            target = ev.get("target") or {}
            size = None
            if ev.get("action") == "push" and target.get("tag"):
                size = site.manifest_size(str(target.get("repository")), str(target.get("digest")),
                                          str(target.get("mediaType")))
            if ev.get("action") == "push" and target.get("tag") and _restore_immutable(ev):
                continue
            with site.db.session() as s:
                applied += SiteService(s).apply_registry_event(ev, size)
            pushed = scans.wanted(ev)
            if pushed:
                scans.schedule(site, *pushed)               # in the background: the registry waits for no scan
        return {"applied": applied}

    def _restore_immutable(ev: dict[str, Any]) -> bool:
        """A push that moved an immutable tag (a client other than `nagaya push`, which checks first): put
        the indexed manifest back under the tag at once. The registry cannot refuse it up front: it
        authorizes repositories, not tags."""
        target = ev.get("target") or {}
        repo, tag, digest = str(target.get("repository")), str(target.get("tag")), str(target.get("digest"))
        with site.db.session() as s:
            svc = SiteService(s)
            if not svc.is_immutable(repo, tag):
                return False
            old = s.scalar(select(Tag).join(Repository).where(Repository.name == repo, Tag.name == tag))
            if old is None or old.digest == digest:
                return False                                  # a first push, or the same image again
            old_digest, old_type = old.digest, old.media_type
        try:
            with site.registry(repo, INTERNAL, ["pull", "push"], timeout=10) as registry:
                data, media_type, _d = registry.get_manifest(old_digest)
                registry.put_manifest(tag, data, media_type or old_type)
        except NagayaError as e:
            log.error("cannot restore immutable tag %s:%s: %s", repo, tag, e)
            return False
        with site.db.session() as s:
            SiteService(s).audit("tag.immutable.restored", str((ev.get("actor") or {}).get("name") or ""),
                                 repository=repo, tag=tag, digest=digest, details={"kept": old_digest})
        return True

    return r
