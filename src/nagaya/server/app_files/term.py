"""nagaya's web terminal, run INSIDE the user's own image as the user (a batch job; never in the server): a
shell on a pty, served over a websocket on the session's unix socket, with a page that draws it with
xterm.js (the portal's /static/xterm.js: the page is reached through the portal's proxy, same origin).
Python's standard library only, so that any image with python3 can serve it. Usage: term.py SOCKET BASE_URL"""

import base64
import hashlib
import os
import pty
import select
import signal
import socket
import struct
import sys
import threading

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Terminal · nagaya</title>
<link rel="stylesheet" href="/static/xterm.css"><script src="/static/xterm.js"></script>
<style>html,body{margin:0;height:100%;background:#000}#t{height:100%}</style></head>
<body><div id="t"></div><script>
const term = new Terminal({cursorBlink: true, rows: 40, cols: 120});
term.open(document.getElementById("t"));
const ws = new WebSocket((location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + "BASEws");
ws.binaryType = "arraybuffer";
ws.onmessage = (e) => term.write(new Uint8Array(e.data));
ws.onclose = () => term.write("\\r\\n[the session has ended]\\r\\n");
const enc = new TextEncoder();
term.onData((d) => ws.send(enc.encode(d)));
window.nagayaTerm = term; window.nagayaWs = ws;
</script></body></html>"""


def frame(data: bytes, op: int = 2) -> bytes:
    n = len(data)
    if n < 126:
        head = bytes([0x80 | op, n])
    elif n < 65536:
        head = bytes([0x80 | op, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | op, 127]) + struct.pack(">Q", n)
    return head + data


def parse(buf: bytes):
    """One frame from the front of buf: (payload, rest, opcode), or (None, buf, 0) while incomplete."""
    if len(buf) < 2:
        return None, buf, 0
    op, masked, n, i = buf[0] & 15, buf[1] & 128, buf[1] & 127, 2
    if n == 126:
        if len(buf) < 4:
            return None, buf, 0
        n, i = struct.unpack(">H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None, buf, 0
        n, i = struct.unpack(">Q", buf[2:10])[0], 10
    mask = b""
    if masked:
        if len(buf) < i + 4:
            return None, buf, 0
        mask, i = buf[i:i + 4], i + 4
    if len(buf) < i + n:
        return None, buf, 0
    payload = buf[i:i + n]
    if masked:
        payload = bytes(b ^ mask[j % 4] for j, b in enumerate(payload))
    return payload, buf[i + n:], op


def shell() -> None:
    sh = os.environ.get("SHELL", "")
    for cand in (sh, "/bin/bash", "/bin/sh"):
        if cand and os.access(cand, os.X_OK):
            os.execv(cand, [cand, "-l"])
    os._exit(127)


def serve(conn: socket.socket, base: str) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > 65536:
            conn.close()
            return
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    hdr = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
    if hdr.get("upgrade", "").lower() != "websocket":
        body = PAGE.replace("BASE", base).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        conn.close()
        return
    accept = base64.b64encode(hashlib.sha1((hdr.get("sec-websocket-key", "") + GUID).encode()).digest()).decode()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    pid, fd = pty.fork()
    if pid == 0:
        shell()
    buf = b""
    try:
        while True:
            ready, _, _ = select.select([conn, fd], [], [])
            if fd in ready:
                try:
                    out = os.read(fd, 65536)
                except OSError:
                    break
                if not out:
                    break
                conn.sendall(frame(out))
            if conn in ready:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while True:
                    msg, buf, op = parse(buf)
                    if msg is None:
                        break
                    if op == 8:
                        raise EOFError
                    if op == 9:
                        conn.sendall(frame(msg, 10))
                    elif op in (0, 1, 2):
                        os.write(fd, msg)
    except (EOFError, OSError):
        pass
    finally:
        try:
            os.kill(pid, signal.SIGHUP)
            os.waitpid(pid, 0)
        except OSError:
            pass
        os.close(fd)
        conn.close()


def main() -> None:
    path, base = sys.argv[1], sys.argv[2]
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, base), daemon=True).start()


if __name__ == "__main__":
    main()
