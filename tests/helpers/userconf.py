"""A user's nagaya settings in their config file (~/.config/nagaya/nagaya.toml), as a site has them, instead of
NAGAYA_* variables: a scheduler that exports the submitter's environment (qsub -V) would carry those into the
job, where they keep `nagaya run` off the compiled starter's fast path (it cannot tell what they change)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

from tests.helpers.users import User


@contextlib.contextmanager
def settings_in_config(user: User, settings: dict[str, str]) -> Iterator[None]:
    """`settings` as NAGAYA_SECTION_NAME=value, written to the user's config; the file as it was afterwards.
    Other variables (SGE_ROOT...) stay in the user's environment."""
    conf = user.home / ".config" / "nagaya" / "nagaya.toml"
    saved = conf.read_bytes() if conf.exists() else None
    sections: dict[str, list[str]] = {}
    for k, v in settings.items():
        if not k.startswith("NAGAYA_"):
            user.extra_env[k] = v
            continue
        section, _, name = k.removeprefix("NAGAYA_").lower().partition("_")
        sections.setdefault(section, []).append(f"{name} = {json.dumps(v)}")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("".join(f"[{k}]\n" + "\n".join(v) + "\n" for k, v in sections.items()))
    for d in (conf.parent.parent, conf.parent, conf):
        os.chown(d, user.uid, user.gid)
    try:
        yield
    finally:
        if saved is None:
            conf.unlink(missing_ok=True)
        else:
            conf.write_bytes(saved)
