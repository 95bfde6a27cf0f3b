"""The bloat report (nagaya/image/bloat.py, as `nagaya image inspect --size`) as a picture on an image's page.

The layers are streamed from the registry with a token for the viewer (so the access rules are the
registry's: no pull right, no bytes), each checked against its digest; the report of a manifest digest never
changes, so it is computed once per server process and kept (a small LRU). Loaded on request (a button on
the repository page, htmx), since it reads every layer.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import IO, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from nagaya.errors import UsageError
from nagaya.image import bloat, oci
from nagaya.image.registry import Registry
from nagaya.server.offload import offload
from nagaya.server.portal.base import Portal, check_ref
from nagaya.server.registry_client import as_site_errors

KEEP = 64
MAX_BYTES = 8 << 30                 # images larger than this (compressed) are not read for a picture
_reports: OrderedDict[str, dict[str, Any]] = OrderedDict()
_lock = threading.Lock()


def _layers(registry: Registry, manifest: dict[str, Any]) -> list[tuple[str, int, bloat.LayerOpener]]:
    def opener(digest: str, size: int) -> bloat.LayerOpener:
        @contextlib.contextmanager
        def op() -> Iterator[IO[bytes]]:
            # size-bounded, and checked against the digest once the last chunk is read
            it = registry.iter_blob(oci.Descriptor("application/octet-stream", digest, size), "layer")
            try:
                yield bloat.from_chunks(it)
                for _rest in it:                # the tar's end padding: the digest covers every byte
                    pass
            finally:
                it.close()                      # a reader that stopped early: the connection goes back
        return op

    return [(str(x["digest"]), int(x["size"]), opener(str(x["digest"]), int(x["size"])))
            for x in manifest.get("layers") or []]


def report_for(site: Any, repository: str, user: str, ref: str) -> dict[str, Any]:
    with as_site_errors(f"{repository}@{ref}"), site.registry(repository, user, ["pull"], timeout=60) as registry:
        data, _mt, digest = registry.get_manifest(ref)          # a digest ref is verified
        with _lock:
            if digest in _reports:
                _reports.move_to_end(digest)
                return _reports[digest]
        manifest = json.loads(data)
        if "layers" not in manifest:
            raise UsageError("this is a multi-platform index: open one platform's image to see its sizes")
        if sum(int(x.get("size", 0)) for x in manifest["layers"]) > MAX_BYTES:
            raise UsageError("the image is too large to be read for a picture here; use `nagaya image inspect --size`")
        rep = {"digest": digest, **bloat.analyze(_layers(registry, manifest), 12)}
    with _lock:
        _reports[digest] = rep
        while len(_reports) > KEEP:
            _reports.popitem(last=False)
    return rep


def router(portal: Portal) -> APIRouter:
    site, sess_of, page = portal.site, portal.sess_of, portal.page
    r = portal.router()

    @r.get("/image-size/{repository:path}", response_class=HTMLResponse)
    @offload
    def image_size(request: Request, repository: str, ref: str) -> Response:
        s = sess_of(request)
        check_ref(ref)
        portal.may_pull(s, repository)
        rep = report_for(site, repository, s.user, ref)
        fragment = request.headers.get("HX-Request") == "true"
        return page(request, "_image_size.html" if fragment else "image_size.html", s, "images",
                    repository=repository, r=rep)

    return r
