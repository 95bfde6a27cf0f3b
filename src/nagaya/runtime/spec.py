"""What one container run needs, decided before any namespace is made."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Bind:
    src: str            # host path
    dst: str            # container path
    readonly: bool = False
    device: bool = False


@dataclass
class RunSpec:
    image_ref: str                      # what the user typed (for messages and the audit trail)
    digest: str
    squashfs: str                       # path to the image file ("" with `unpacked`)
    unpacked: str = ""                  # unpacked-directory fallback
    argv: list[str] = field(default_factory=list)   # user's command (empty: the image's default)
    entrypoint: list[str] | None = None             # --entrypoint override
    env: dict[str, str] = field(default_factory=dict)
    cleanenv: bool = False
    binds: list[Bind] = field(default_factory=list)
    pwd: str = ""
    writable_tmpfs: bool = False
    overlay_dir: str = ""
    gpus: str = ""                      # "", "all", or "0,1"
    backend: str = "bwrap"
    shell: bool = False                 # `nagaya shell`
    no_home: bool = False
