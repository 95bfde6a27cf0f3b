"""The compose-spec subset nagaya runs: `${VAR}` interpolation, then strict typed models.

Every model forbids unknown keys, so a typo or an unsupported feature (networks, build, ports ranges...)
is an error naming its path (`services.web.ports[0]`), never silently ignored.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nagaya.errors import UsageError

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _duration(v: Any) -> float:
    """Compose durations: a number of seconds or `1m30s`, `500ms`, `2s`."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if not isinstance(v, str):
        raise ValueError("expected a duration such as 2s, 500ms or 1m30s")
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", v.strip())
    if not parts or "".join(a + b for a, b in parts) != v.strip():
        raise ValueError(f"invalid duration {v!r} (e.g. 2s, 500ms, 1m30s)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    return sum(float(a) * scale[b] for a, b in parts)


class Healthcheck(_Strict):
    """Docker's semantics: a check every `interval` (`start_interval` while still starting), each cut off
    after `timeout`; `retries` failures in a row make a replica unhealthy, failures within `start_period`
    not counting; one success makes it healthy again."""

    test: list[str]
    interval: float = 2.0           # compose's 30s default is far too slow for a job's start-up
    timeout: float = 10.0
    retries: int = Field(3, ge=1)
    start_period: float = 0.0
    start_interval: float | None = None
    disable: bool = False

    @field_validator("test", mode="before")
    @classmethod
    def _test(cls, v: Any) -> Any:
        if isinstance(v, str):
            return ["CMD-SHELL", v]
        if isinstance(v, list) and v and v[0] not in ("CMD", "CMD-SHELL", "NONE"):
            raise ValueError("a list test starts with CMD, CMD-SHELL or NONE")
        return v

    @field_validator("interval", "timeout", "start_period", "start_interval", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> float:
        return _duration(v)

    @property
    def argv(self) -> list[str] | None:
        if self.disable or self.test[0] == "NONE":
            return None
        if self.test[0] == "CMD-SHELL":
            return ["/bin/sh", "-c", " ".join(self.test[1:])]
        return self.test[1:]


class Dependency(_Strict):
    condition: Literal["service_started", "service_healthy", "service_completed_successfully"] = "service_started"
    required: bool = True


class Deploy(_Strict):
    replicas: int = Field(1, ge=0)


class XNagaya(_Strict):
    """Placement: `nodes` is how many of the job's nodes to spread over, or their names; `gpus` per replica."""

    nodes: int | list[str] | None = None
    gpus: int = Field(0, ge=0)


class Port(_Strict):
    target: int = Field(ge=1, le=65535)
    published: int | None = Field(None, ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"

    @property
    def host_port(self) -> int:
        # Under host networking the app binds the port it listens on: the published one when both are given
        # (users write "8080:8080"), since that is the port clients on other nodes dial.
        return self.published or self.target


class Volume(_Strict):
    type: Literal["bind"] = "bind"
    source: str
    target: str
    read_only: bool = False


class Service(_Strict):
    image: str
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    env_file: list[str] = Field(default_factory=list)
    working_dir: str | None = None
    volumes: list[Volume] = Field(default_factory=list)
    deploy: Deploy = Field(default_factory=Deploy)
    depends_on: dict[str, Dependency] = Field(default_factory=dict)
    healthcheck: Healthcheck | None = None
    ports: list[Port] = Field(default_factory=list)
    x_nagaya: XNagaya = Field(default_factory=XNagaya, alias="x-nagaya")

    @field_validator("command", "entrypoint", mode="before")
    @classmethod
    def _words(cls, v: Any) -> Any:
        return shlex.split(v) if isinstance(v, str) else v

    @field_validator("environment", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if isinstance(v, list):         # ["K=V", "K"]: a bare K takes the host's value
            out = {}
            for item in v:
                k, eq, val = str(item).partition("=")
                out[k] = val if eq else os.environ.get(k, "")
            return out
        if isinstance(v, dict):
            return {k: "" if x is None else str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()}
        return v

    @field_validator("env_file", mode="before")
    @classmethod
    def _env_file(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("depends_on", mode="before")
    @classmethod
    def _deps(cls, v: Any) -> Any:
        return {k: {} for k in v} if isinstance(v, list) else v

    @field_validator("volumes", mode="before")
    @classmethod
    def _volumes(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out: list[Any] = []
        for item in v:
            if isinstance(item, str):
                parts = item.split(":")
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                    raise ValueError(f"{item!r}: expected SRC:DST[:ro|rw] (bind mounts only)")
                if not parts[0].startswith(("/", ".", "~")):
                    raise ValueError(f"{item!r}: named volumes are not supported, only bind mounts")
                item = {"type": "bind", "source": parts[0], "target": parts[1],
                        "read_only": len(parts) == 3 and parts[2] == "ro"}
            out.append(item)
        return out

    @field_validator("ports", mode="before")
    @classmethod
    def _ports(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out: list[Any] = []
        for item in v:
            if isinstance(item, int) and not isinstance(item, bool):
                item = {"target": item}
            elif isinstance(item, str):
                text, _, proto = item.partition("/")
                nums = text.split(":")
                if len(nums) > 2 or not all(n.isdigit() for n in nums):
                    raise ValueError(f"{item!r}: expected PORT or PUBLISHED:TARGET[/tcp|udp] (no ranges, no IPs)")
                item = {"target": int(nums[-1]), "published": int(nums[0]) if len(nums) == 2 else None,
                        "protocol": proto or "tcp"}
            out.append(item)
        return out

    @property
    def replicas(self) -> int:
        return self.deploy.replicas


class Project(_Strict):
    name: str = ""
    services: dict[str, Service]
    x_nagaya: dict[str, Any] = Field(default_factory=dict, alias="x-nagaya")
    version: str | None = None          # obsolete in the spec, still common: accepted and ignored

    @model_validator(mode="after")
    def _check(self) -> Project:
        if not self.services:
            raise ValueError("no services")
        for name, svc in self.services.items():
            if not _NAME.match(name):
                raise ValueError(f"invalid service name {name!r}")
            for dep in svc.depends_on:
                if dep not in self.services:
                    raise ValueError(f"service {name} depends on unknown service {dep!r}")
                if svc.depends_on[dep].condition == "service_healthy" and (
                        self.services[dep].healthcheck is None or self.services[dep].healthcheck.argv is None):
                    raise ValueError(f"service {name} waits for {dep} to be healthy, but {dep} has no healthcheck")
        self.order()            # refuses cycles
        return self

    def order(self) -> list[str]:
        """Services in start-up order (dependencies first); a cycle is an error."""
        done: list[str] = []
        state: dict[str, int] = {}

        def visit(n: str, path: list[str]) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise ValueError(f"depends_on cycle: {' -> '.join([*path, n])}")
            state[n] = 1
            for d in self.services[n].depends_on:
                visit(d, [*path, n])
            state[n] = 2
            done.append(n)

        for n in self.services:
            visit(n, [])
        return done


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (`#` comments, optional `export `, optional quotes), as compose reads `.env`."""
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, val = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise UsageError(f"{path}:{n}: expected KEY=VALUE")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
            val = val[1:-1]
        out[key] = val
    return out


def interpolate(obj: Any, env: dict[str, str], where: str = "") -> Any:
    """${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR and $$ in every string value."""
    if isinstance(obj, dict):
        return {k: interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        val = env.get(name)
        unset = val is None or (val == "" and op is not None and op.startswith(":"))
        if op and op.endswith("-") and unset:
            return interpolate(arg, env, where)
        if op and op.endswith("?") and unset:
            raise UsageError(f"{where}: variable {name} is required: {arg or 'not set'}")
        return val or ""

    return _VAR.sub(sub, obj)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "tagged-union")) or part in ("str", "int", "list[str]", "float"):
            continue                    # pydantic's internal union branch names
        else:
            out += f".{part}" if out else str(part)
    return out


def parse(data: Any, env: dict[str, str], where: str = "compose file") -> Project:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping at the top level")
    try:
        data = interpolate(data, env)
    except UsageError as e:
        raise UsageError(f"{where}: {e.message}") from None
    try:
        return Project.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown or unsupported key"
        path = _loc(err["loc"])
        raise UsageError(f"{where}: {path}: {msg}" if path else f"{where}: {msg}") from None


def load(path: Path, environ: dict[str, str] | None = None) -> Project:
    """Read compose.yml; `.env` beside it fills variables the environment does not set (as compose does)."""
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    env = dict(environ if environ is not None else os.environ)
    dotenv = path.parent / ".env"
    if dotenv.is_file():
        env = {**read_env_file(dotenv), **env}
    project = parse(data, env, str(path))
    if not project.name:
        name = re.sub(r"[^a-z0-9_-]", "", path.resolve().parent.name.lower()) or "default"
        project = project.model_copy(update={"name": name})
    return project
