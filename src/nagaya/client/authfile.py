"""`~/.config/nagaya/auth.json`: credentials in the Docker/containers auth.json format, so skopeo, podman and
docker can use the file too (`--authfile`), plus a `nagaya` section saying which server issued them.

    {"auths":  {"HOST:PORT": {"auth": base64("user:personal-access-token")}},
     "nagaya": {"HOST:PORT": {"server": "http://HOST:PORT", "username": "alice", "logged_in": "..."}}}

Keys are registry hosts (what image references start with). Stdlib only: the image client reads it too.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nagaya.errors import AuthError, UsageError


def path() -> Path:
    conf = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(os.environ.get("NAGAYA_AUTH_FILE") or Path(conf) / "nagaya" / "auth.json")


@dataclass
class Login:
    registry: str            # HOST:PORT
    server: str              # http://HOST:PORT
    username: str
    secret: str              # the personal access token (or a robot token)


def load(p: Path | None = None) -> dict[str, Any]:
    p = p or path()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {"auths": {}, "nagaya": {}}
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {p}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: not an auth.json object")
    data.setdefault("auths", {})
    data.setdefault("nagaya", {})
    return data


def save(data: dict[str, Any], p: Path | None = None) -> Path:
    """Atomic write, mode 0600 from the first byte (the file holds tokens)."""
    p = p or path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)
    return p


def device(server: str, username: str, p: Path | None = None) -> str | None:
    """The device token the server gave this client at an earlier login as `username` (its own password
    budget: others' wrong guesses cannot lock it out). Kept across logouts."""
    value = load(p).get("nagaya-devices", {}).get(f"{username}@{server}")
    return value if isinstance(value, str) else None


def store(login: Login, p: Path | None = None, device_token: str | None = None) -> Path:
    data = load(p)
    if device_token:
        devices = data.setdefault("nagaya-devices", {})
        if isinstance(devices, dict):
            devices[f"{login.username}@{login.server}"] = device_token
    raw = f"{login.username}:{login.secret}".encode()
    data["auths"][login.registry] = {"auth": base64.b64encode(raw).decode()}
    data["nagaya"][login.registry] = {"server": login.server, "username": login.username,
                                      "logged_in": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return save(data, p)


def remove(registry: str, p: Path | None = None) -> bool:
    data = load(p)
    found = data["auths"].pop(registry, None) is not None
    found = data["nagaya"].pop(registry, None) is not None or found
    if found:
        save(data, p)
    return found


def credentials(registry: str, p: Path | None = None) -> tuple[str, str] | None:
    """(username, secret) stored for a registry host, or None."""
    entry = load(p)["auths"].get(registry) or {}
    raw = entry.get("auth")
    if not raw:
        return None
    try:
        user, _, secret = base64.b64decode(raw).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, secret


def current(registry: str | None = None, p: Path | None = None) -> Login:
    """The login to use: the given registry's, else the most recent one."""
    data = load(p)
    entries = data["nagaya"]
    if registry is None:
        if not entries:
            raise AuthError("not logged in; run `nagaya login SERVER`")
        registry = max(entries, key=lambda r: str(entries[r].get("logged_in", "")))
    meta = entries.get(registry)
    creds = credentials(registry, p)
    if not meta or not creds:
        raise AuthError(f"not logged in to {registry}; run `nagaya login {registry}`")
    return Login(registry=registry, server=str(meta["server"]), username=creds[0], secret=creds[1])
