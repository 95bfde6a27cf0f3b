"""A terminal into one of the user's running jobs, in the browser: the page (xterm.js) and its websocket.

The websocket is checked like the apps' proxy (portal/apps.py): the login (cookie), the same origin, and the
job asked for as the user (someone else's job is NotFound, like a missing one: the websocket is refused
before any upgrade). Then the root dispatcher starts `nagaya job shell JOB` as the user on a host-side pty
(server/job_terminal.py) and the bytes flow between the browser and that pty. The server never runs the
user's process, and closing the page hangs the terminal's whole session up."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from urllib.parse import quote

import anyio.to_thread
from fastapi import APIRouter, Request, Response, WebSocket
from fastapi.responses import HTMLResponse
from starlette.websockets import WebSocketDisconnect

from nagaya.errors import Conflict, NagayaError, NotFound
from nagaya.server.job_terminal import frame, resize_frame
from nagaya.server.offload import job_pool
from nagaya.server.portal.base import Portal
from nagaya.server.portal.sessions import COOKIE

LIVE = ("RUNNING", "SUSPENDED")


def router(portal: Portal) -> APIRouter:
    site, jobs, sess_of, page = portal.site, portal.jobs, portal.sess_of, portal.page
    r = portal.router()

    @r.get("/jobs/{job_id}/terminal", response_class=HTMLResponse)
    @job_pool
    def terminal_page(request: Request, job_id: str) -> Response:
        s = sess_of(request)
        info = jobs.status(s.user, job_id)                          # NotFound for anyone else's
        if info.state not in LIVE:
            raise Conflict(f"job {job_id} is not running ({info.state}): there is nothing to enter")
        return page(request, "job_terminal.html", s, "jobs", job=info,
                    ws_path=f"/jobs/{quote(job_id)}/terminal/ws")

    p = APIRouter(include_in_schema=False)

    def open_terminal(cookie: str | None, job_id: str, rows: int, cols: int) -> tuple[Path, str] | str | None:
        """(socket path, secret); a one-line reason the job has no terminal; None: not this login's job."""
        s = portal.sessions.get(cookie)
        if s is None or site.rights(s.user, s.groups) is None:
            return None
        try:
            info = jobs.status(s.user, job_id)
        except NotFound:
            return None
        except NagayaError as e:
            return e.message
        if info.state not in LIVE:
            return f"job {job_id} is not running ({info.state})"
        terms = jobs.terms_dir()
        if terms is None:
            return "terminals need the site's job dispatcher (this site submits through slurmrestd)"
        try:
            name, secret = jobs.terminal(s.user, job_id, rows, cols)
        except NagayaError as e:
            return e.message
        return terms / name, secret

    @p.websocket("/jobs/{job_id}/terminal/ws")
    async def terminal_ws(ws: WebSocket, job_id: str) -> None:
        scheme = "https" if ws.url.scheme == "wss" else "http"
        origin = ws.headers.get("origin")
        if origin is not None and origin.rstrip("/") != f"{scheme}://{ws.url.netloc}":
            await ws.close(code=1008)                          # cross-site: refused before any upgrade
            return
        size = [_int(ws.query_params.get(k), d) for k, d in (("rows", 24), ("cols", 80))]
        got = await anyio.to_thread.run_sync(open_terminal, ws.cookies.get(COOKIE), job_id, *size)
        if got is None:
            await ws.close(code=1008)                          # not logged in, or not this user's job
            return
        await ws.accept()
        if isinstance(got, str):
            await ws.send_bytes(f"nagaya: {got}\r\n".encode())
            await ws.close(code=1011)
            return
        path, secret = got
        try:
            # through an fd of the directory: a long state directory never meets sun_path's 108 bytes
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                reader, writer = await asyncio.open_unix_connection(f"/proc/self/fd/{dfd}/{path.name}")
            finally:
                os.close(dfd)
            writer.write(secret.encode() + b"\n")
            await writer.drain()
        except OSError:
            await ws.send_bytes(b"nagaya: the job service did not open the terminal\r\n")
            await ws.close(code=1011)
            return

        async def down() -> None:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                await ws.send_bytes(chunk)

        async def up() -> None:
            while True:
                m = await ws.receive()
                if m["type"] == "websocket.disconnect":
                    return
                if m.get("bytes") is not None:
                    writer.write(frame(b"d", m["bytes"]))
                elif m.get("text"):
                    try:                                   # text messages are control: {"resize": [rows, cols]}
                        rows, cols = json.loads(m["text"])["resize"]
                        writer.write(resize_frame(int(rows), int(cols)))
                    except (ValueError, KeyError, TypeError):
                        continue
                await writer.drain()
        tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            writer.close()                                 # the dispatcher hangs the terminal's session up
            try:
                await ws.close()
            except (RuntimeError, WebSocketDisconnect):
                pass

    r.include_router(p)
    return r


def _int(v: str | None, default: int) -> int:
    try:
        return max(1, min(int(v or default), 1000))
    except ValueError:
        return default
