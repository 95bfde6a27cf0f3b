"""Image references to digests, once for every door: `nagaya run` (the tag re-resolved on every run),
`submit`, `run --alloc`, compose and portal jobs (pinned to the digest at submit time) and `reproduce`
(a recorded digest under the name the user wrote)."""

from __future__ import annotations

import sys
from typing import Any

from nagaya.errors import ImageNotFound, NagayaError, RegistryUnreachable, UsageError
from nagaya.image.reference import Reference, parse
from nagaya.image.store import ImageMeta, ImageStore, open_store


def _parse(text: str) -> Reference | None:
    try:
        return parse(text)
    except UsageError:
        return None                         # a bare digest or digest prefix: the store's own lookup


def for_run(store: ImageStore, text: str, cfg: Any) -> ImageMeta:
    """Local names resolve in the cache. Registry references re-resolve their tag on every run (one
    manifest request), pulling when it moved; only an unreachable registry falls back to the cache."""
    ref = _parse(text)
    if ref is None or not ref.registry:
        return store.resolve(text)
    if ref.digest and not ref.tag and store.has_image(ref.digest):
        return store.meta(ref.digest)       # pinned by digest: nothing to re-resolve
    from nagaya.image.pull import pull

    try:
        return pull(store, text, cfg, quiet=not sys.stderr.isatty())
    except RegistryUnreachable as e:
        try:
            meta = store.resolve(text)
        except ImageNotFound:
            raise e from None
        print(f"nagaya: warning: {e}; running the cached {ref.name}:{ref.tag_or_latest} "
              f"({meta.digest[:19]}), which may be stale", file=sys.stderr)
        return meta


def pin(cfg: Any, text: str) -> tuple[str, str]:
    """Resolve an image reference now: (the reference jobs run, pinned to its digest; the digest).

    Registry references are resolved tag→digest by a pull (the image is fetched into the submitter's cache
    once; with `image.pull = "lazy"` only the manifest is asked for, and the nodes read the image as they run
    it); local names pin the digest the local tag points at now, so a later re-tag changes nothing."""
    store = open_store(cfg)
    ref = _parse(text)
    if ref is not None and ref.registry:
        if getattr(cfg.image, "pull", "full") == "lazy":
            from nagaya.image.lazy.mount import resolve_digest

            digest = resolve_digest(store, text, cfg)
            return f"{ref.name}@{digest}", digest
        from nagaya.image.pull import pull

        meta = pull(store, text, cfg, quiet=True)
        return f"{ref.name}@{meta.digest}", meta.digest
    meta = store.resolve(text)
    if ref is None:
        return meta.digest, meta.digest
    return f"{ref.name}@{meta.digest}", meta.digest


def pinned_name(image: str, digest: str) -> tuple[str, Reference | None]:
    """NAME@DIGEST for what the user wrote (tag dropped), and its parsed reference (None: a bare digest)."""
    try:
        ref = parse(image)
    except NagayaError:
        return digest, None
    return f"{ref.name}@{digest}", Reference(ref.registry, ref.path, None, digest)
