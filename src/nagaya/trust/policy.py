"""The slow half of the site policy (gate.py is the cached half): verify the image's signature against the keys
a rule names, all of them root's, and record the verdict in the user's cache."""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from nagaya import safefs
from nagaya.errors import NagayaError, PolicyRefused, RegistryUnreachable
from nagaya.image.reference import project_of
from nagaya.trust import keys

MAX_KEYS = 64


def _root_file(path: str) -> bytes:
    """A file only root could have written: every directory on the way and the file itself root's."""
    d, base = os.path.split(path)
    fd = safefs.open_dir(d)
    try:
        return safefs.read_at(fd, base, owners=(0,), max_size=keys.MAX_KEY_FILE)
    finally:
        os.close(fd)


def site_keys(cfg: Any, rule: dict[str, Any], name: str) -> tuple[list[tuple[str, ec.EllipticCurvePublicKey]],
                                                                     list[str]]:
    """(trusted keys, problems) for a rule: its root-owned .pub files and the project's."""
    out: list[tuple[str, ec.EllipticCurvePublicKey]] = []
    problems: list[str] = []
    for k in rule.get("keys") or []:
        paths: list[str] = []
        if k == "project":
            d = os.path.join(cfg.image.keys_dir, "projects", project_of(name))
            try:
                fd = safefs.open_dir(d)
            except (OSError, safefs.UnsafePath) as e:
                if not isinstance(e, FileNotFoundError) and "No such file" not in str(e):
                    problems.append(f"{d}: {safefs.describe(e)}")
                continue
            try:
                paths = [os.path.join(d, n) for n in sorted(os.listdir(fd)) if n.endswith(".pub")][:MAX_KEYS]
            finally:
                os.close(fd)
        else:
            paths = [k]
        for p in paths:
            try:
                out.append((p, keys.load_public(_root_file(p), p)))
            except (OSError, safefs.UnsafePath) as e:
                problems.append(f"{p}: {safefs.describe(e)}")
            except NagayaError as e:
                problems.append(e.message)
    return out, problems


def _site_config_is_roots() -> str | None:
    """Why the site config (where the policy came from) cannot be trusted, or None."""
    from nagaya import config

    path = str(getattr(config, "SITE_CONFIG", config._SITE_CONFIG))
    try:
        _root_file(os.path.realpath(path))
    except (OSError, safefs.UnsafePath) as e:
        return f"the site config {path} is not root's ({safefs.describe(e)})"
    return None


def verify_for_rule(cfg: Any, index: int, rule: dict[str, Any], name: str, digest: str, shown: str, ctx: str,
                    cache_path: str) -> None:
    label = f"rule {index + 1} (scope {rule['scope']!r} requires signatures)"

    def refuse(why: str) -> PolicyRefused:
        return PolicyRefused(f"{shown}: refused by the site's image policy, {label}: {why}")

    if not name:
        raise refuse("the image came from no registry, so it carries no signature (push it, sign it, pull it)")
    why = _site_config_is_roots()
    if why:
        raise refuse(why)
    trusted, problems = site_keys(cfg, rule, name)
    if not trusted:
        raise refuse("no usable trusted keys" + (f" ({'; '.join(problems)})" if problems else
                                                 f" (project keys go in {cfg.image.keys_dir}/projects/"
                                                 f"{project_of(name) or 'PROJECT'}/)"))
    from nagaya.image.reference import parse
    from nagaya.trust import sign as signing

    ref = parse(name)
    try:
        with signing.open_for(ref, cfg, push=False) as reg:
            v = signing.verify(reg, ref.name, digest, trusted)
    except keys.TrustError as e:
        raise refuse(e.message.split(": ", 1)[-1]) from None
    except RegistryUnreachable as e:
        raise refuse(f"cannot check its signature ({e.message})") from None
    except NagayaError as e:
        raise refuse(e.message) from None
    _remember(cache_path, ctx, {"digest": digest, "identity": v.identity, "key": v.key_name,
                                "fingerprint": v.key, "rule": index + 1})


def _remember(path: str, ctx: str, info: dict[str, Any]) -> None:
    """The verdict, 0600 in a 0700 directory of the user's cache; a failure only costs a re-check."""
    d = os.path.dirname(path)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(ctx + "\n" + json.dumps(info) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass
