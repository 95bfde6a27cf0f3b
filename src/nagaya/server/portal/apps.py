"""Sessions: interactive apps (Jupyter, a web app in the user's image) started from a form, listed with
state, node, digest and time left, extended, ended; and the authenticated reverse proxy that connects the
browser to them at /sessions/ID/app/... (HTTP and websockets).

The proxy checks, on every request and every websocket, that the portal login owns the session (anyone
else: 404, like a missing one), refuses cross-site writes and websockets (Origin), drops the portal's own
cookies before the app sees the request and any app cookie that would shadow them, and adds the session's
Jupyter token itself: the token is never in a page. The app is reached only through its unix socket."""

from __future__ import annotations

import asyncio
import ssl
import sys
from typing import Any
from urllib.parse import quote

import anyio.to_thread
import httpx
from fastapi import APIRouter, Form, Request, Response, WebSocket
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.websockets import WebSocketDisconnect

from nagaya.errors import NagayaError, NotFound
from nagaya.server.apps import AppSession, AppSessions
from nagaya.server.offload import job_pool
from nagaya.server.portal.base import Portal, command_words
from nagaya.server.portal.sessions import COOKIE, WebSession

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
       "transfer-encoding", "upgrade", "host", "content-length", "authorization"}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Made once: a transport builds a TLS context by default (the CA bundle loaded: ~30 ms), though a unix socket
# never uses it.
_TLS = ssl.create_default_context()


def _portal_cookie(name: str) -> bool:
    return name.strip().lower().startswith("nagaya")


def _strip_cookies(header: str) -> str:
    return "; ".join(c for c in (x.strip() for x in header.split(";")) if c and not _portal_cookie(c.split("=")[0]))


def router(portal: Portal, apps: AppSessions) -> APIRouter:
    site, sess_of, need_csrf = portal.site, portal.sess_of, portal.need_csrf
    page, back = portal.page, portal.back
    r = portal.router()

    @r.get("/sessions", response_class=HTMLResponse)
    @job_pool
    def sessions_page(request: Request) -> Response:
        s = sess_of(request)
        choices = portal.image_choices(s)
        error, items = "", []
        try:
            items = apps.list(s.user)
        except NagayaError as e:
            error = e.message
        now = apps.clock()
        shown = [dict(x.public(now, apps.idle, apps.warn_before),
                      ready=not x.ended and x.state == "RUNNING" and apps.ready(x)) for x in items]
        return page(request, "sessions.html", s, "sessions", images=choices, sessions=shown, error=error,
                    max_hours=f"{apps.max_hours:g}", idle_minutes=int(apps.idle // 60),
                    warn_minutes=int(apps.warn_before // 60))

    @r.post("/sessions")
    @job_pool
    def start_session(request: Request, kind: str = Form(...), image: str = Form(...), command: str = Form(""),
                      cpus: int = Form(1), mem: str = Form(""), gpus: str = Form(""), hours: float = Form(2.0),
                      csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        words, p = command_words(command), portal.principal_of(s)
        rec = apps.start(p, kind, image, words, cpus, mem, gpus, hours)
        return back("/sessions", s, "ok", f"Session {rec.id[:8]} submitted as job {rec.job}.")

    @r.post("/sessions/{sid}/end")
    @job_pool
    def end_session(request: Request, sid: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        apps.end(s.user, sid)
        return back("/sessions", s, "ok", f"Session {sid[:8]} ended.")

    @r.post("/sessions/{sid}/extend")
    @job_pool
    def extend_session(request: Request, sid: str, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        apps.extend(s.user, sid)
        return back("/sessions", s, "ok", f"Session {sid[:8]} extended.")

    # ---- the proxy: plain routes (not PortalRoute: a stream, a websocket), the same login check ---------
    p = APIRouter(include_in_schema=False)

    def owned(cookie: str | None, sid: str) -> tuple[WebSession, AppSession] | None:
        s = portal.sessions.get(cookie)
        if s is None or site.rights(s.user, s.groups) is None:
            return None
        try:
            rec = apps.get(s.user, sid)
        except NotFound:
            return None
        return s, rec

    def same_origin(origin: str | None, scheme: str, netloc: str) -> bool:
        return origin is None or origin.rstrip("/") == f"{scheme}://{netloc}"

    @p.api_route("/sessions/{sid}/app/{path:path}", methods=METHODS)
    async def proxy(request: Request, sid: str, path: str) -> Response:
        got = await anyio.to_thread.run_sync(owned, request.cookies.get(COOKIE), sid)
        if got is None:
            if COOKIE not in request.cookies and request.method == "GET":
                return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
            return Response("Not found\n", status_code=404, media_type="text/plain")
        _, rec = got
        if rec.ended:
            return Response("This session has ended.\n", status_code=410, media_type="text/plain")
        if request.method not in ("GET", "HEAD", "OPTIONS") and \
                not same_origin(request.headers.get("origin"), request.url.scheme, request.url.netloc):
            return Response("cross-site request refused\n", status_code=403, media_type="text/plain")
        try:
            sock, release = await anyio.to_thread.run_sync(apps.connect_path, rec)
        except OSError:
            return Response("The app is not up yet; try again in a moment.\n", status_code=503,
                            media_type="text/plain")
        await anyio.to_thread.run_sync(apps.touch, rec)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP and k.lower() != "cookie"]
        kept = _strip_cookies(request.headers.get("cookie", ""))
        if kept:
            headers.append(("cookie", kept))
        headers += [("host", request.url.netloc), ("x-forwarded-proto", request.url.scheme)]
        if rec.kind == "jupyter":
            headers.append(("authorization", f"token {rec.token}"))
            headers = [(k, v) for k, v in headers if k.lower() != "accept-encoding"]   # pages are scrubbed below
        client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock, verify=_TLS), timeout=None)
        url = f"http://localhost{request.url.path}" + (f"?{request.url.query}" if request.url.query else "")

        async def close() -> None:
            await client.aclose()
            release()
        # The body whole (forms, notebooks): a plain Content-Length, never chunked to the app.
        body_in = await request.body() if request.method not in ("GET", "HEAD") else b""
        try:
            up = await client.send(client.build_request(request.method, url, headers=headers,
                                                        content=body_in or None), stream=True)
        except httpx.HTTPError as e:
            sys.stderr.write(f"nagaya app proxy: session {sid[:8]}: {type(e).__name__}: {e}\n")
            await close()
            return Response("The app did not answer.\n", status_code=502, media_type="text/plain")
        out = [(k, v) for k, v in up.headers.multi_items() if k.lower() not in HOP | {"content-encoding"}
               and not (k.lower() == "set-cookie" and _portal_cookie(v.split("=")[0]))]

        async def body() -> Any:
            async for chunk in up.aiter_raw():
                yield chunk
        if rec.kind == "jupyter" and up.headers.get("content-type", "").startswith(("text/html", "application/json")):
            # Jupyter writes the token it was reached with into its pages (data-jupyter-api-token): removed, so
            # that no page holds it; the proxy adds it to every request anyway.
            whole = (await up.aread()).replace(rec.token.encode(), b"")

            async def body() -> Any:
                yield whole
        resp = StreamingResponse(body(), status_code=up.status_code, background=BackgroundTask(close))
        for k, v in out:
            resp.headers.append(k, v)
        if "content-encoding" in up.headers:
            resp.headers["content-encoding"] = up.headers["content-encoding"]
        resp.headers["cache-control"] = up.headers.get("cache-control", "no-store")
        return resp

    @p.websocket("/sessions/{sid}/app/{path:path}")
    async def proxy_ws(ws: WebSocket, sid: str, path: str) -> None:
        from websockets.asyncio.client import unix_connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        got = await anyio.to_thread.run_sync(owned, ws.cookies.get(COOKIE), sid)
        scheme = "https" if ws.url.scheme == "wss" else "http"
        if got is None or got[1].ended or not same_origin(ws.headers.get("origin"), scheme, ws.url.netloc):
            await ws.close(code=1008)                      # policy violation: before any upgrade
            return
        rec = got[1]
        try:
            sock, release = await anyio.to_thread.run_sync(apps.connect_path, rec)
        except OSError:
            await ws.close(code=1011)
            return
        await anyio.to_thread.run_sync(apps.touch, rec)
        hdrs = {"Origin": f"{scheme}://{ws.url.netloc}", "Host": ws.url.netloc}
        kept = _strip_cookies(ws.headers.get("cookie", ""))
        if kept:
            hdrs["Cookie"] = kept
        if rec.kind == "jupyter":
            hdrs["Authorization"] = f"token {rec.token}"
        protos = [x.strip() for x in ws.headers.get("sec-websocket-protocol", "").split(",") if x.strip()]
        uri = f"ws://{ws.url.netloc}{ws.url.path}" + (f"?{ws.url.query}" if ws.url.query else "")
        try:
            up = await unix_connect(sock, uri, additional_headers=hdrs,
                                    subprotocols=protos or None, max_size=None, open_timeout=20)  # type: ignore[arg-type]
        except (OSError, InvalidHandshake, TimeoutError):
            release()
            await ws.close(code=1011)
            return
        await ws.accept(subprotocol=up.subprotocol)

        async def down() -> None:
            async for msg in up:
                if isinstance(msg, bytes):
                    await ws.send_bytes(msg)
                else:
                    await ws.send_text(msg)

        async def upward() -> None:
            while True:
                m = await ws.receive()
                if m["type"] == "websocket.disconnect":
                    return
                await up.send(m["bytes"] if m.get("bytes") is not None else m.get("text") or "")
                await anyio.to_thread.run_sync(apps.touch, rec)
        tasks = [asyncio.create_task(down()), asyncio.create_task(upward())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (ConnectionClosed, WebSocketDisconnect):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await up.close()
            release()
            try:
                await ws.close()
            except (RuntimeError, WebSocketDisconnect):
                pass                                        # the browser went first

    r.include_router(p)
    return r
