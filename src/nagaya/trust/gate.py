"""The site's image policy where an image is about to run: `nagaya run` (and so compose, reproduce and every
job's `nagaya run NAME@DIGEST` on the node) and `nagaya submit`.

`[image] policy` in the site config is a list of rules; the one with the longest `scope` that matches the
image's origin (`REGISTRY/PATH` it was pulled from; "*" matches everything, local-only images included)
decides: `allow = "unsigned"`, or `require = "signed"` with `keys` (root's .pub files, or "project": root's
KEYS_DIR/projects/PROJECT/*.pub). No matching rule: no requirement. A verdict is cached per user and digest,
valid only while the rule, the origin and the key files (inode, size, times) are those it was made under.

This module is on `nagaya run`'s start-up path: stdlib `os` only (no pathlib, json, typing, hashing); a
cached verdict costs a few stat calls and one small read. Verification itself (registry, crypto) is in
policy.py, imported only on a miss.
"""

from __future__ import annotations

import os

from nagaya.errors import PolicyRefused, UsageError
from nagaya.image.reference import project_of

__all__ = ["PolicyRefused", "admit", "match", "project_of"]


def _valid(i: int, rule: object) -> dict:  # -> the rule
    if not isinstance(rule, dict) or not isinstance(rule.get("scope"), str) or not rule["scope"]:
        raise UsageError(f"site config [image] policy rule {i + 1}: needs a scope (REGISTRY/PROJECT[/REPO] or *)")
    allow, require, keys = rule.get("allow"), rule.get("require"), rule.get("keys")
    if allow == "unsigned" and require is None:
        return rule
    if require == "signed" and allow is None and isinstance(keys, list) and keys and \
            all(isinstance(k, str) and (k == "project" or k.startswith("/")) for k in keys):
        return rule
    raise UsageError(f"site config [image] policy rule {i + 1}: either allow = \"unsigned\", or require = \"signed\" "
                     "with keys = [absolute .pub paths and/or \"project\"]")


def match(rules: list, name: str) -> tuple[int, dict] | None:
    """The rule for an image from `name` (REGISTRY/PATH; "" for a local-only image): the longest scope."""
    best: tuple[int, dict] | None = None
    best_len = -1
    for i, rule in enumerate(rules):
        rule = _valid(i, rule)
        scope = rule["scope"].rstrip("/")
        if scope == "*":
            n = 0
        elif name and (name == scope or name.startswith(scope + "/")):
            n = len(scope)
        else:
            continue
        if n > best_len:
            best, best_len = (i, rule), n
    return best




def _stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_uid}"


def context(cfg, index: int, rule: dict, name: str, digest: str) -> str:
    """What a cached verdict is valid for: digest, origin, the rule, and the key files as they are now."""
    parts = [digest, name, str(index), repr(sorted(rule.items()))]
    for k in rule.get("keys") or ():
        if k == "project":
            d = os.path.join(cfg.image.keys_dir, "projects", project_of(name))
            try:
                entries = sorted(os.listdir(d))
            except OSError:
                entries = []
            parts.append(d + "=" + _stamp(d) + "".join(f";{e}={_stamp(os.path.join(d, e))}" for e in entries))
        else:
            parts.append(k + "=" + _stamp(k))
    return "|".join(parts)


def origin(cfg, text: str, digest: str) -> str:
    """REGISTRY/PATH the image comes from: the reference's own, else what the cache recorded at pull time."""
    from nagaya.image.reference import parse

    try:
        ref = parse(text.split("@", 1)[0] if "@" in text else text)
        if ref.registry:
            return ref.name
    except UsageError:
        pass
    from nagaya.runtime.fastjson import loads

    for base in [cfg.cache_root, *cfg.image.shared_cache_dirs]:
        try:
            with open(os.path.join(base, "images", digest[7:] + ".json"), "rb") as f:
                meta = loads(f.read())
        except (OSError, ValueError):
            continue
        src = meta.get("source") if isinstance(meta, dict) else None
        if isinstance(src, str) and "@sha256:" in src and not src.startswith("/"):
            try:
                ref = parse(src)
            except UsageError:
                return ""
            # only a source recorded for this very digest counts (an index's platform manifest: its own)
            return ref.name if ref.registry and ref.digest == digest else ""
        return ""
    return ""


def admit(cfg, text: str, digest: str) -> None:
    """Return if the policies (signatures, then vulnerabilities) let the image `text` (resolved to `digest`)
    run here; PolicyRefused otherwise."""
    _admit_signed(cfg, text, digest)
    if getattr(cfg.image, "vuln_block", None):
        _admit_vulns(cfg, text, digest)


_SEVERITIES = ("unknown", "negligible", "low", "medium", "high", "critical")


def _vuln_rule(rules: list, name: str) -> tuple[int, dict] | None:
    """`[image] vuln_block`'s rule for an image from `name`: the longest scope, as for signatures."""
    best: tuple[int, dict] | None = None
    best_len = -1
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not isinstance(rule.get("scope"), str) or not rule["scope"] or \
                rule.get("severity") not in _SEVERITIES or not isinstance(rule.get("except", []), list):
            raise UsageError(f"site config [image] vuln_block rule {i + 1}: needs scope = \"REGISTRY/PROJECT[/REPO]\" "
                             f"or \"*\", severity = one of {', '.join(_SEVERITIES[2:])}, optional except = [CVEs]")
        scope = rule["scope"].rstrip("/")
        n = 0 if scope == "*" else len(scope) if name and (name == scope or name.startswith(scope + "/")) else -1
        if n > best_len:
            best, best_len = (i, rule), n
    return best


def covers(cfg, name: str) -> str:
    """Which site policy (signatures or vulnerabilities) applies to images from `name`, "" for none.
    A lazily read image's squashfs artifact is neither signed nor scanned, so such images are pulled in full."""
    m = match(cfg.image.policy, name) if cfg.image.policy else None
    if m is not None and m[1].get("allow") != "unsigned":
        return f"the site's signing policy (rule {m[0] + 1})"
    v = _vuln_rule(cfg.image.vuln_block, name) if getattr(cfg.image, "vuln_block", None) else None
    if v is not None:
        return f"the site's vulnerability policy (rule {v[0] + 1})"
    return ""


def _verdict_holds(path: str, ctx: str) -> bool:
    """A verdict kept for this digest under exactly these rules, keys and database (its first line)."""
    try:
        with open(path) as f:
            return f.readline().rstrip("\n") == ctx
    except (OSError, ValueError):
        return False


def _admit_vulns(cfg, text: str, digest: str) -> None:
    name = origin(cfg, text, digest)
    m = _vuln_rule(cfg.image.vuln_block, name)
    if m is None:
        return
    index, rule = m
    db = cfg.image.vulndb
    ctx = "|".join([digest, name, str(index), repr(sorted(rule.items())), repr(cfg.image.vuln_allow),
                    db + "=" + _stamp(db)])
    path = os.path.join(cfg.cache_root, "vulnpolicy", digest[7:])
    if _verdict_holds(path, ctx):
        return
    from nagaya.scan.policy import check

    check(cfg, index, rule, digest, text, ctx, path)


def _admit_signed(cfg, text: str, digest: str) -> None:
    rules = cfg.image.policy
    if not rules:
        return
    name = origin(cfg, text, digest)
    m = match(rules, name)
    if m is None or m[1].get("allow") == "unsigned":
        return
    index, rule = m
    ctx = context(cfg, index, rule, name, digest)
    path = os.path.join(cfg.cache_root, "trust", digest[7:])
    if _verdict_holds(path, ctx):
        return
    from nagaya.trust.policy import verify_for_rule

    verify_for_rule(cfg, index, rule, name, digest, text, ctx, path)
