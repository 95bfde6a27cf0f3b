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


def _size(v: Any) -> int:
    """Compose byte values: a number of bytes or `512m`, `1.5g`, `100kb`, `2GiB`."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", str(v).strip().lower())
    if not m:
        raise ValueError(f"invalid size {v!r} (e.g. 512m, 2g)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def _cpus(v: Any) -> float:
    try:
        n = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"invalid number of CPUs {v!r}") from None
    if n < 0:
        raise ValueError("CPUs cannot be negative")
    return n


class Limits(_Strict):
    cpus: float | None = None
    memory: int | None = None

    @field_validator("cpus", mode="before")
    @classmethod
    def _c(cls, v: Any) -> Any:
        return None if v is None else _cpus(v)

    @field_validator("memory", mode="before")
    @classmethod
    def _m(cls, v: Any) -> Any:
        return None if v is None else _size(v)


class GpuRequest(_Strict):
    """A device reservation (`deploy.resources.reservations.devices[]`, `gpus[]`): GPUs only."""

    capabilities: list[str] = Field(default_factory=lambda: ["gpu"])
    count: int | Literal["all"] | None = None
    device_ids: list[str] | None = None

    @field_validator("device_ids", mode="before")
    @classmethod
    def _ids(cls, v: Any) -> Any:
        if isinstance(v, list):
            for x in v:
                if not str(x).isdigit():
                    raise ValueError(f"device id {x!r}: give GPU indices (0, 1, ...)")
            return [str(x) for x in v]
        return v
    driver: str | None = None

    @field_validator("count", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        if isinstance(v, int) and v < -1:
            raise ValueError("count cannot be negative (-1: all)")
        return v

    @model_validator(mode="after")
    def _gpu(self) -> GpuRequest:
        if "gpu" not in self.capabilities:
            raise ValueError(f"refused: device capabilities {self.capabilities}: only GPUs (`gpu`) are passed in")
        if self.driver not in (None, "nvidia", "cdi"):
            raise ValueError(f"refused: device driver {self.driver!r}: only NVIDIA GPUs are supported")
        if self.count is not None and self.device_ids:
            raise ValueError("count and device_ids cannot both be given")
        return self


class DiscreteSpec(_Strict):
    kind: str
    value: int = Field(ge=0)


class GenericResource(_Strict):
    discrete_resource_spec: DiscreteSpec

    @model_validator(mode="after")
    def _gpu(self) -> GenericResource:
        if "gpu" not in self.discrete_resource_spec.kind.lower():
            raise ValueError(f"refused: generic resource {self.discrete_resource_spec.kind!r}: only GPUs are "
                             f"supported")
        return self


class Reservations(Limits):
    devices: list[GpuRequest] = Field(default_factory=list)
    generic_resources: list[GenericResource] = Field(default_factory=list)


class Resources(_Strict):
    limits: Limits = Field(default_factory=Limits)
    reservations: Reservations = Field(default_factory=Reservations)


class RestartPolicy(_Strict):
    condition: Literal["none", "on-failure", "any"] = "any"
    delay: float = 5.0
    max_attempts: int | None = Field(None, ge=0)
    window: float | None = None

    @field_validator("delay", "window", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return None if v is None else _duration(v)


_CONSTRAINT = re.compile(r"^\s*(node\.(?:hostname|id|role|platform\.os|platform\.arch|labels\.[\w.-]+))\s*"
                         r"(==|!=)\s*(\S.*?)\s*$")


class Placement(_Strict):
    constraints: list[str] = Field(default_factory=list)
    max_replicas_per_node: int | None = Field(None, ge=1)

    @field_validator("constraints")
    @classmethod
    def _c(cls, v: list[str]) -> list[str]:
        for c in v:
            if not _CONSTRAINT.match(c):
                raise ValueError(f"{c!r}: expected node.hostname|node.id|node.role|node.labels.KEY|"
                                 f"node.platform.os|node.platform.arch == or != VALUE")
        return v

    def parsed(self) -> list[tuple[str, str, str]]:
        out = []
        for c in self.constraints:
            m = _CONSTRAINT.match(c)
            assert m is not None
            out.append((m.group(1), m.group(2), m.group(3).strip("\"'")))
        return out


class Deploy(_Strict):
    mode: Literal["replicated", "global", "replicated-job", "global-job"] = "replicated"
    replicas: int | None = Field(None, ge=0)
    resources: Resources = Field(default_factory=Resources)
    restart_policy: RestartPolicy | None = None
    placement: Placement = Field(default_factory=Placement)


class XNagaya(_Strict):
    """Placement: `nodes` is how many of the job's nodes to spread over, or their names; `gpus` per replica."""

    nodes: int | list[str] | None = None
    gpus: int = Field(0, ge=0)


class Port(_Strict):
    target: int = Field(ge=1, le=65535)
    published: int | None = Field(None, ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("published", mode="before")
    @classmethod
    def _pub(cls, v: Any) -> Any:
        if isinstance(v, str) and v.isdigit():
            return int(v)
        if v == "":
            return None
        return v

    @property
    def host_port(self) -> int:
        # Under host networking the app binds the port it listens on: the published one when both are given
        # (users write "8080:8080"), since that is the port clients on other nodes dial.
        return self.published or self.target


class BindOpts(_Strict):
    create_host_path: bool = True


class VolumeOpts(_Strict):
    subpath: str | None = None


class Volume(_Strict):
    type: Literal["bind", "volume", "tmpfs"] = "bind"
    source: str | None = None
    target: str
    read_only: bool = False
    bind: BindOpts = Field(default_factory=BindOpts)
    volume: VolumeOpts = Field(default_factory=VolumeOpts)

    @model_validator(mode="after")
    def _src(self) -> Volume:
        if self.type == "bind" and not self.source:
            raise ValueError("a bind mount needs a source")
        if self.type == "bind" and self.source and not self.source.startswith(("/", ".", "~")):
            raise ValueError(f"bind source {self.source!r}: give a path (/abs, ./rel or ~/...)")
        if not self.target.startswith("/"):
            raise ValueError(f"target {self.target!r}: give an absolute path")
        return self


class FileRef(_Strict):
    """A service's use of a top-level secret or config."""

    source: str
    target: str | None = None


class EnvFile(_Strict):
    path: str
    required: bool = True
    format: Literal["raw"] | None = None


class Build(_Strict):
    context: str = "."
    dockerfile: str | None = None
    dockerfile_inline: str | None = None
    args: dict[str, str] = Field(default_factory=dict)
    no_cache: bool = False

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, v: Any) -> Any:
        if isinstance(v, list):
            out = {}
            for item in v:
                k, eq, val = str(item).partition("=")
                out[k] = val if eq else os.environ.get(k, "")
            return out
        if isinstance(v, dict):
            return {k: "" if x is None else str(x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _one(self) -> Build:
        if self.dockerfile and self.dockerfile_inline:
            raise ValueError("dockerfile and dockerfile_inline cannot both be given")
        return self


_RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(?::(\d+))?)$")


class Service(_Strict):
    image: str | None = None
    build: Build | None = None
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    env_file: list[EnvFile] = Field(default_factory=list)
    working_dir: str | None = None
    volumes: list[Volume] = Field(default_factory=list)
    tmpfs: list[str] = Field(default_factory=list)
    deploy: Deploy = Field(default_factory=Deploy)
    scale: int | None = Field(None, ge=0)
    depends_on: dict[str, Dependency] = Field(default_factory=dict)
    healthcheck: Healthcheck | None = None
    ports: list[Port] = Field(default_factory=list)
    hostname: str | None = None
    container_name: str | None = None
    restart: str | None = None
    user: str | None = None
    extra_hosts: dict[str, str] = Field(default_factory=dict)
    stop_signal: str | None = None
    stop_grace_period: float = 10.0
    secrets: list[FileRef] = Field(default_factory=list)
    configs: list[FileRef] = Field(default_factory=list)
    profiles: list[str] = Field(default_factory=list)
    pull_policy: str | None = None
    read_only: bool = True
    privileged: bool = False
    cpus: float | None = None
    mem_limit: int | None = None
    mem_reservation: int | None = None
    gpus: Literal["all"] | list[GpuRequest] | None = None
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
        v = [v] if isinstance(v, str) else v
        return [{"path": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @field_validator("tmpfs", "profiles", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("build", mode="before")
    @classmethod
    def _build(cls, v: Any) -> Any:
        return {"context": v} if isinstance(v, str) else v

    @field_validator("depends_on", mode="before")
    @classmethod
    def _deps(cls, v: Any) -> Any:
        return {k: {} for k in v} if isinstance(v, list) else v

    @field_validator("secrets", "configs", mode="before")
    @classmethod
    def _refs(cls, v: Any) -> Any:
        return [{"source": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @field_validator("extra_hosts", mode="before")
    @classmethod
    def _hosts(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: str(x[0] if isinstance(x, list) and x else x) for k, x in v.items()}
        if not isinstance(v, list):
            return v
        out = {}
        for item in v:
            text = str(item)
            if "=" in text:
                name, _, addr = text.partition("=")
            else:
                name, _, addr = text.partition(":")
            if not name or not addr:
                raise ValueError(f"{text!r}: expected HOST:IP or HOST=IP")
            out[name.strip()] = addr.strip().strip("[]")
        return out

    @field_validator("stop_grace_period", mode="before")
    @classmethod
    def _grace(cls, v: Any) -> Any:
        return _duration(v)

    @field_validator("stop_signal")
    @classmethod
    def _sig(cls, v: str | None) -> str | None:
        if v is not None:
            signal_number(v)
        return v

    @field_validator("restart")
    @classmethod
    def _restart(cls, v: str | None) -> str | None:
        if v is not None and not _RESTART.match(v):
            raise ValueError(f"{v!r}: expected no, always, unless-stopped or on-failure[:N]")
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})", v):
            raise ValueError(f"invalid hostname {v!r}")
        return v

    @field_validator("container_name")
    @classmethod
    def _cname(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", v):
            raise ValueError(f"invalid container name {v!r} (letters, digits, _ . -)")
        return v

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> Any:
        return None if v is None else _cpus(v)

    @field_validator("mem_limit", "mem_reservation", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> Any:
        return None if v is None else _size(v)

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None:
            check_user(v)
        return v

    @field_validator("volumes", mode="before")
    @classmethod
    def _volumes(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out: list[Any] = []
        for item in v:
            if isinstance(item, str):
                parts = item.split(":")
                if len(parts) == 1:             # an anonymous volume
                    item = {"type": "volume", "target": parts[0]}
                elif len(parts) not in (2, 3):
                    raise ValueError(f"{item!r}: expected SRC:DST[:OPTIONS]")
                else:
                    opts = parts[2].split(",") if len(parts) == 3 else []
                    bad = [o for o in opts if o not in ("ro", "rw", "z", "Z", "cached", "delegated", "consistent",
                                                        "nocopy")]
                    if bad:
                        raise ValueError(f"{item!r}: unsupported mount option {bad[0]!r}")
                    kind = "bind" if parts[0].startswith(("/", ".", "~")) else "volume"
                    item = {"type": kind, "source": parts[0], "target": parts[1], "read_only": "ro" in opts}
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
                out += _short_port(item)
                continue
            elif isinstance(item, dict) and isinstance(item.get("published"), str) and "-" in item["published"]:
                a, _, b = item["published"].partition("-")
                if not (a.isdigit() and b.isdigit()) or int(b) < int(a):
                    raise ValueError(f"published {item['published']!r}: expected PORT or FIRST-LAST")
                if int(b) != int(a):
                    raise ValueError(f"published {item['published']!r}: a range needs the short syntax "
                                     f"FIRST-LAST:FIRST-LAST")
                item = {**item, "published": int(a)}
            out.append(item)
        return out

    @model_validator(mode="after")
    def _check(self) -> Service:
        if self.image is None and self.build is None:
            raise ValueError("give image or build")
        if self.privileged:
            raise ValueError("refused: containers run with your own rights: nothing privileged can be granted")
        return self

    @property
    def replicas(self) -> int:
        if self.deploy.replicas is not None:
            return self.deploy.replicas
        return self.scale if self.scale is not None else 1

    @property
    def is_global(self) -> bool:
        return self.deploy.mode in ("global", "global-job")

    @property
    def gpu_request(self) -> tuple[int | str, list[int] | None]:
        """GPUs per replica: (count or "all", device ids or None), from every way a file may say it. A device
        reservation with neither count nor device_ids means all of them, as in Docker."""
        if self.gpus == "all":
            return "all", None
        count: int | str = self.x_nagaya.gpus
        ids: list[int] | None = None
        for g in self.deploy.resources.reservations.generic_resources:
            count = max(int(count), g.discrete_resource_spec.value)
        for r in [*self.deploy.resources.reservations.devices, *(self.gpus or [])]:
            if r.device_ids:
                ids = sorted({*(ids or []), *(int(x) for x in r.device_ids)})
            elif r.count is None or r.count in ("all", -1):
                count = "all"
            elif count != "all":
                count = max(int(count), int(r.count))
        if ids is not None:
            return len(ids), ids
        return count, None

    @property
    def cpu_need(self) -> float:
        """CPUs a replica is placed by: its reservation, else its limit; 0: not counted."""
        r = self.deploy.resources
        return r.reservations.cpus or r.limits.cpus or self.cpus or 0.0

    @property
    def cpu_limit(self) -> float:
        r = self.deploy.resources
        return r.limits.cpus or self.cpus or r.reservations.cpus or 0.0

    @property
    def mem_need(self) -> int:
        r = self.deploy.resources
        return r.reservations.memory or self.mem_reservation or r.limits.memory or self.mem_limit or 0

    @property
    def mem_limit_bytes(self) -> int:
        r = self.deploy.resources
        return r.limits.memory or self.mem_limit or r.reservations.memory or self.mem_reservation or 0

    @property
    def restart_rule(self) -> RestartPolicy | None:
        """deploy.restart_policy, else `restart:` (Docker's 0.1 s back-off); None: never restarted."""
        if self.deploy.restart_policy is not None:
            rp = self.deploy.restart_policy
            return None if rp.condition == "none" else rp
        if self.restart in (None, "no"):
            return None
        m = _RESTART.match(self.restart)
        assert m is not None
        if self.restart.startswith("on-failure"):
            return RestartPolicy(condition="on-failure", delay=0.1,
                                 max_attempts=int(m.group(2)) if m.group(2) else None)
        return RestartPolicy(condition="any", delay=0.1)


def _short_port(text: str) -> list[dict[str, Any]]:
    """`[IP:][PUBLISHED[-LAST]:]TARGET[-LAST][/PROTO]` -> one entry per port (the IP is the app's business)."""
    body, _, proto = text.partition("/")
    m = re.fullmatch(r"(?:(\[[0-9a-fA-F:]*\]|\d+\.\d+\.\d+\.\d+):)?(?:(\d+)(?:-(\d+))?:)?(\d+)(?:-(\d+))?", body)
    if not m:
        raise ValueError(f"{text!r}: expected [IP:][PUBLISHED:]TARGET[/tcp|udp], ranges as FIRST-LAST")
    t0, t1 = int(m.group(4)), int(m.group(5) or m.group(4))
    if m.group(2) is None:
        pubs: list[int | None] = [None] * (t1 - t0 + 1)
    else:
        p0, p1 = int(m.group(2)), int(m.group(3) or m.group(2))
        if p1 - p0 != t1 - t0 and not (p0 != p1 and t0 == t1):
            raise ValueError(f"{text!r}: the published and target ranges differ in length")
        if p1 - p0 != t1 - t0:
            raise ValueError(f"{text!r}: a published range for one target port is not supported")
        pubs = list(range(p0, p1 + 1))
    if t1 < t0:
        raise ValueError(f"{text!r}: empty port range")
    return [{"target": t, "published": p, "protocol": proto or "tcp"}
            for t, p in zip(range(t0, t1 + 1), pubs, strict=True)]


def signal_number(name: str | int) -> int:
    import signal

    text = str(name).strip().upper()
    if text.isdigit():
        n = int(text)
    else:
        try:
            n = int(getattr(signal.Signals, text if text.startswith("SIG") else "SIG" + text))
        except AttributeError:
            raise ValueError(f"unknown signal {name!r}") from None
    if not 0 < n < 65:
        raise ValueError(f"unknown signal {name!r}")
    return n


def check_user(text: str) -> None:
    """`user:` may only name the caller: replicas always run as the caller (uid and primary gid)."""
    import grp
    import pwd

    uid, gid = os.getuid(), os.getgid()
    u, _, g = str(text).partition(":")
    try:
        me = pwd.getpwuid(uid).pw_name
    except KeyError:
        me = str(uid)
    if u not in (str(uid), me):
        raise ValueError(f"refused: user {u!r}: replicas run as you ({me}, uid {uid}), never as another user")
    if g:
        try:
            gname = grp.getgrgid(gid).gr_name
        except KeyError:
            gname = str(gid)
        if g not in (str(gid), gname):
            raise ValueError(f"refused: group {g!r}: replicas run with your group ({gname}, gid {gid})")


class TopFile(_Strict):
    """A top-level secret or config."""

    file: str | None = None
    environment: str | None = None
    content: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TopFile:
        if sum(x is not None for x in (self.file, self.environment, self.content)) != 1:
            raise ValueError("give exactly one of file, environment" + (", content" if self.content else ""))
        return self


class TopSecret(TopFile):
    @model_validator(mode="after")
    def _nocontent(self) -> TopSecret:
        if self.content is not None:
            raise ValueError("content is for configs; a secret comes from a file or a variable")
        return self


class TopVolume(_Strict):
    name: str | None = None
    driver: str | None = None


class Project(_Strict):
    name: str = ""
    services: dict[str, Service]
    volumes: dict[str, TopVolume | None] = Field(default_factory=dict)
    secrets: dict[str, TopSecret] = Field(default_factory=dict)
    configs: dict[str, TopFile] = Field(default_factory=dict)
    x_nagaya: dict[str, Any] = Field(default_factory=dict, alias="x-nagaya")

    @model_validator(mode="after")
    def _check(self) -> Project:
        if not self.services:
            raise ValueError("no services")
        names: dict[str, str] = {}
        for name, svc in self.services.items():
            if not _NAME.match(name):
                raise ValueError(f"invalid service name {name!r}")
            if svc.container_name:
                if svc.replicas > 1 or svc.is_global:
                    raise ValueError(f"services.{name}.container_name: a container name is unique: the service "
                                     f"cannot have {svc.replicas if not svc.is_global else 'global'} replicas")
                if svc.container_name in names:
                    raise ValueError(f"services.{name}.container_name: {svc.container_name!r} is also "
                                     f"{names[svc.container_name]}'s")
                names[svc.container_name] = name
            for dep in svc.depends_on:
                if dep not in self.services:
                    raise ValueError(f"service {name} depends on unknown service {dep!r}")
                if svc.depends_on[dep].condition == "service_healthy" and (
                        self.services[dep].healthcheck is None or self.services[dep].healthcheck.argv is None):
                    raise ValueError(f"service {name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            for kind, refs, top in (("secrets", svc.secrets, self.secrets), ("configs", svc.configs, self.configs)):
                for i, ref in enumerate(refs):
                    if ref.source not in top:
                        raise ValueError(f"services.{name}.{kind}[{i}]: {ref.source!r} is not in the file's "
                                         f"top-level {kind}")
            for i, v in enumerate(svc.volumes):
                if v.type == "volume" and v.source and v.source not in self.volumes:
                    raise ValueError(f"services.{name}.volumes[{i}]: named volume {v.source!r} is not in the "
                                     f"file's top-level volumes")
        self.order()            # refuses cycles
        return self

    def image_of(self, service: str) -> str:
        """The service's image; built ones without `image:` are PROJECT-SERVICE, as Compose names them."""
        svc = self.services[service]
        return svc.image or f"{self.name or 'default'}-{service}".lower()

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


def active_profiles(profiles: list[str] | None = None, environ: dict[str, str] | None = None) -> set[str]:
    env = environ if environ is not None else os.environ
    out = {p.strip() for p in env.get("COMPOSE_PROFILES", "").split(",") if p.strip()}
    return out | set(profiles or [])


def _apply_profiles(data: dict[str, Any], active: set[str], where: str) -> dict[str, Any]:
    """Drop the services whose profiles are all disabled (`*` enables every one), and optional dependencies
    on them; a required dependency on a disabled service is an error."""
    services = data.get("services")
    if not isinstance(services, dict):
        return data
    on = {}
    for name, svc in services.items():
        profs = svc.get("profiles") if isinstance(svc, dict) else None
        profs = [profs] if isinstance(profs, str) else profs
        if not profs or "*" in active or set(map(str, profs)) & active:
            on[name] = svc
    for name, svc in on.items():
        deps = svc.get("depends_on") if isinstance(svc, dict) else None
        if not deps:
            continue
        keep: Any
        if isinstance(deps, list):
            keep = [d for d in deps if d in on or d not in services]
            gone = [d for d in deps if d not in keep]
        else:
            keep, gone = {}, []
            for d, cond in deps.items():
                if d in on or d not in services:
                    keep[d] = cond
                elif isinstance(cond, dict) and cond.get("required") is False:
                    continue
                else:
                    gone.append(d)
        if gone:
            profs = services[gone[0]].get("profiles")
            raise UsageError(f"{where}: services.{name}.depends_on: {gone[0]} is not enabled (its profiles: "
                             f"{profs}); enable one with --profile or COMPOSE_PROFILES")
        on[name] = {**svc, "depends_on": keep}
    return {**data, "services": on}


def parse(data: Any, env: dict[str, str], where: str = "compose file", profiles: set[str] | None = None,
          report: Any = None) -> Project:
    """Interpolate, answer every key (keys.py: refused and unknown keys raise, ignored ones are reported
    through `report(line)` once each), drop disabled profiles, then build the typed models."""
    from nagaya.compose import keys

    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping at the top level")
    try:
        data = interpolate(data, env)
    except UsageError as e:
        raise UsageError(f"{where}: {e.message}") from None
    ignored = keys.check(data, where)
    data = keys.strip(data, ignored)
    data = _apply_profiles(data, profiles if profiles is not None else active_profiles(environ=env), where)
    try:
        project = Project.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown or unsupported key"
        path = _loc(err["loc"])
        if msg.startswith("services.") or msg.startswith("volumes"):
            path = ""                   # the message names its own path
        raise UsageError(f"{where}: {path}: {msg}" if path else f"{where}: {msg}") from None
    if report is not None:
        for a in ignored:
            report(f"{where}: {a.path}: ignored: {a.reason or _reason_of(a.pattern)}")
    return project


def _reason_of(pattern: str) -> str:
    from nagaya.compose import keys

    while "." in pattern:
        pattern = pattern.rsplit(".", 1)[0]
        if keys.KEYS.get(pattern, ("", ""))[1]:
            return keys.KEYS[pattern][1]
    return "not used under nagaya"


def _stderr(line: str) -> None:
    import sys

    sys.stderr.write(f"nagaya: {line}\n")
    sys.stderr.flush()


def load(path: Path, environ: dict[str, str] | None = None, profiles: list[str] | None = None,
         report: Any = _stderr) -> Project:
    """Read compose.yml; `.env` beside it fills variables the environment does not set (as compose does).
    Every ignored key is reported once (one line on stderr, by default)."""
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
    project = parse(data, env, str(path), active_profiles(profiles, env), report)
    if not project.name:
        name = re.sub(r"[^a-z0-9_-]", "", path.resolve().parent.name.lower()) or "default"
        project = project.model_copy(update={"name": name})
    return project
