"""What one container run needs, decided before any namespace is made."""

from __future__ import annotations

from nagaya.record import Factory, Record

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from typing import Any


class Bind(Record):
    _frozen = True

    src: str            # host path
    dst: str            # container path
    readonly: bool = False
    device: bool = False


class RunSpec(Record):
    image_ref: str                      # what the user typed (for messages and the audit trail)
    digest: str
    squashfs: str                       # path to the image file ("" with `unpacked`)
    squashfs_offset: int = 0            # where the squashfs starts in it (a single-file image: after its header)
    unpacked: str = ""                  # unpacked-directory fallback
    argv: list[str] = Factory(list)   # user's command (empty: the image's default)
    entrypoint: list[str] | None = None             # --entrypoint override
    env: dict[str, str] = Factory(dict)
    cleanenv: bool = False
    binds: list[Bind] = Factory(list)
    pwd: str = ""
    writable_tmpfs: bool = False
    overlay_dir: str = ""
    gpus: str = ""                      # "", "all", or "0,1"
    devices: list[str] = Factory(list)  # CDI device names: vendor.com/class=name
    backend: str = "bwrap"
    shell: bool = False                 # `nagaya shell`
    no_home: bool = False
    hostname: str = ""                  # a UTS namespace of its own with this hostname


class RunConfig(Record):
    """The parts of an image config that `nagaya run` honours."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = Factory(dict)

    @classmethod
    def from_image_config(cls, cfg: dict[str, Any]) -> RunConfig:
        c = cfg.get("config") or {}

        def strs(v: Any) -> tuple[str, ...]:
            return tuple(str(x) for x in v) if isinstance(v, list) else ()

        labels = c.get("Labels") or {}
        return cls(strs(c.get("Env")), strs(c.get("Entrypoint")), strs(c.get("Cmd")),
                   str(c.get("WorkingDir") or ""), str(c.get("User") or ""),
                   {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {})
