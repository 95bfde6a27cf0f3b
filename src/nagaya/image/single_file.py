"""Single-file images (`.nsq`): one file that is a program, an image and its own proof of identity.

Layout (all offsets absolute):
    #!/bin/sh stub            `exec nagaya run "$0" "$@"`: `./app.nsq ARGS` runs where nagaya is installed
    #nagaya-nsq 1 M O S\\n     M: bytes of the metadata that follow; O, S: the squashfs's offset and size
    metadata (JSON)           manifest and config (base64: their digests are recomputed, never trusted),
                              the squashfs's sha256 and size, and optional ECDSA signatures over the rest
    zero padding              to a 4 KiB boundary (O), so the squashfs's blocks stay page-aligned
    squashfs                  the image exactly as the cache holds it; squashfuse mounts it with offset=O
The image keeps its manifest digest: `nagaya image import app.nsq` recomputes it from the manifest bytes.
Every use checks the squashfs's bytes against the metadata's digest (a verdict is remembered in the user's
cache for this very inode, size and change time, so only the first run of a file hashes it).

This module is on `nagaya run`'s path for files: stdlib `os` at import; the rest is imported when needed.
"""

from __future__ import annotations

import os

from nagaya.errors import ImageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from nagaya.image.store import ImageMeta, ImageStore

FORMAT = "nagaya-nsq"
MARK = b"#nagaya-nsq 1 "
STUB = (b"#!/bin/sh\n"
        b"# A nagaya single-file image: run it (./FILE ARGS), or `nagaya run FILE ARGS`; `nagaya image import FILE`.\n"
        b"command -v nagaya >/dev/null 2>&1 || { echo \"$0: needs nagaya installed to run\" >&2; exit 127; }\n"
        b"exec nagaya run \"$0\" \"$@\"\n")
HEAD_MAX = 4096                     # the stub and the mark line lie within this
META_MAX = 16 << 20
ALIGN = 4096
CHUNK = 1 << 20


class Header:
    """What the mark line and metadata of an .nsq say (not yet checked against the squashfs)."""

    def __init__(self, path: str, meta: dict[str, Any], meta_bytes: bytes, offset: int, size: int) -> None:
        self.path = path
        self.meta = meta
        self.meta_bytes = meta_bytes
        self.offset = offset
        self.size = size

    @property
    def digest(self) -> str:
        return str(self.meta["digest"])

    @property
    def squashfs_digest(self) -> str:
        return str(self.meta["squashfs"]["digest"])


def looks_like_file(text: str) -> bool:
    """Whether `nagaya run TEXT` names an .nsq file rather than an image (a bare `ubuntu` in the current
    directory never shadows the image `ubuntu`: a file needs a `/` or the .nsq suffix)."""
    if "/" not in text and not text.endswith(".nsq"):
        return False
    try:
        with open(text, "rb") as f:
            return MARK in f.read(HEAD_MAX)
    except OSError:
        return False


def read_header(path: str) -> Header:
    """Parse the mark line and metadata; ImageError (one line) for anything malformed."""
    import json

    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_MAX)
            total = os.fstat(f.fileno()).st_size
            at = head.find(b"\n" + MARK)
            end = head.find(b"\n", at + 1) if at >= 0 else -1
            if at < 0 or end < 0:
                raise ImageError(f"{path} is not a nagaya single-file image (.nsq)")
            try:
                m, o, s = (int(x) for x in head[at + 1 + len(MARK):end].split())
            except ValueError:
                raise ImageError(f"{path}: damaged single-file image header") from None
            start = end + 1
            if not (0 < m <= META_MAX and o >= start + m and o % ALIGN == 0 and s > 0 and o + s <= total):
                raise ImageError(f"{path}: damaged or truncated single-file image ({total} bytes)")
            f.seek(start)
            meta_bytes = f.read(m)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path} is a directory, not a single-file image") from None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from None
    try:
        meta = json.loads(meta_bytes)
        ok = (meta.get("format") == FORMAT and isinstance(meta.get("digest"), str)
              and isinstance(meta.get("squashfs"), dict) and meta["squashfs"].get("size") == s
              and str(meta["squashfs"].get("digest", "")).startswith("sha256:"))
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ImageError(f"{path}: damaged single-file image metadata")
    return Header(path, meta, meta_bytes, o, s)


def _hash_range(f: Any, offset: int, size: int, sink: Any = None) -> str:
    import hashlib

    h = hashlib.sha256()
    f.seek(offset)
    left = size
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        if sink is not None:
            sink.write(chunk)
        left -= len(chunk)
    return "sha256:" + h.hexdigest()


def _tampered(path: str) -> ImageError:
    return ImageError(f"{path}: the image's squashfs does not match its recorded digest (damaged or tampered "
                      "with); refusing it")


def check_for_run(path: str, cache_root: str) -> Header:
    """The header of a file `nagaya run` is about to mount, its squashfs verified. A group- or world-writable
    file is refused: another account could change it between the check and the mount."""
    hdr = read_header(path)
    st = os.stat(path)
    if st.st_mode & 0o022:
        raise ImageError(f"{path} is writable by other accounts: its contents could change after they are "
                         "checked; `chmod go-w` it, or `nagaya image import` it")
    stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{hdr.squashfs_digest}\n"
    memo = os.path.join(cache_root, "nsq", f"{st.st_dev}-{st.st_ino}")
    from nagaya.image.cachedirs import own_cache

    mine = own_cache(cache_root)            # a verdict counts only from a cache that is ours alone
    if mine:
        try:
            fd = os.open(memo, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd) as f:
                if os.fstat(fd).st_uid == os.getuid() and f.read() == stamp:
                    return hdr
        except OSError:
            pass
    with open(path, "rb") as f:
        if _hash_range(f, hdr.offset, hdr.size) != hdr.squashfs_digest:
            raise _tampered(path)
    if not mine:
        return hdr
    try:                                    # remember the verdict (only an optimisation)
        os.makedirs(os.path.dirname(memo), mode=0o700, exist_ok=True)
        tmp = f"{memo}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(stamp)
        os.replace(tmp, memo)
    except OSError:
        pass
    return hdr


# -- export ----------------------------------------------------------------------------------------------

def _signed_part(meta: dict[str, Any]) -> bytes:
    import json

    return json.dumps({k: v for k, v in meta.items() if k != "signatures"}, sort_keys=True,
                      separators=(",", ":")).encode()


def export(store: ImageStore, meta: ImageMeta, dest: Path, sign_key: Any = None) -> int:
    """Write `dest` atomically (temp file + rename, mode 0755); returns its size."""
    import base64
    import contextlib
    import json
    import tempfile

    sq = store.squashfs_path(meta.digest)
    manifest = store.blob_path(meta.digest)
    config = store.blob_path(meta.config_digest)
    for p, what in ((sq, "squashfs"), (manifest, "manifest"), (config, "config")):
        if not p.exists():
            raise ImageError(f"the {what} of image {meta.short} is no longer in the cache; pull or import it again")
    size = sq.stat().st_size
    with open(sq, "rb") as f:
        sq_digest = _hash_range(f, 0, size)
    doc: dict[str, Any] = {
        "format": FORMAT, "version": 1, "digest": meta.digest,
        "manifest_media_type": meta.manifest_media_type,
        "manifest": base64.b64encode(manifest.read_bytes()).decode(),
        "config": base64.b64encode(config.read_bytes()).decode(),
        "layers": [x.to_dict() for x in meta.layers],
        "created": meta.created, "source": meta.source,
        "squashfs": {"digest": sq_digest, "size": size},
    }
    if sign_key is not None:
        from nagaya.trust import keys

        doc["signatures"] = [{"key": keys.fingerprint(sign_key.public_key()),
                              "sig": base64.b64encode(keys.sign(sign_key, _signed_part(doc))).decode()}]
    meta_bytes = json.dumps(doc, sort_keys=True).encode() + b"\n"
    dest = dest.expanduser()
    fd, tmp = tempfile.mkstemp(dir=dest.parent if str(dest.parent) else ".", prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            # the offset is written before it is known exactly: fix its digit count, then pad up to it
            head_len = len(STUB) + len(MARK) + len(f"{len(meta_bytes)} ") + 20 + len(f" {size}\n")
            offset = -(-(head_len + len(meta_bytes)) // ALIGN) * ALIGN
            mark = MARK + f"{len(meta_bytes)} {offset:020d} {size}\n".encode()
            out.write(STUB + mark + meta_bytes)
            out.write(b"\0" * (offset - out.tell()))
            with open(sq, "rb") as f:
                if _hash_range(f, 0, size, out) != sq_digest:
                    raise ImageError(f"the squashfs of image {meta.short} changed while it was exported")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest.stat().st_size


# -- import ----------------------------------------------------------------------------------------------

def verify_signatures(hdr: Header, public_keys: list[tuple[str, Any]]) -> str:
    """The name of a key in `public_keys` that signed the file's metadata; ImageError if none did."""
    import base64

    from nagaya.trust import keys

    data = _signed_part(hdr.meta)
    for sig in hdr.meta.get("signatures") or []:
        try:
            raw = base64.b64decode(sig["sig"])
        except (KeyError, TypeError, ValueError):
            continue
        for name, key in public_keys:
            if keys.verify(key, data, raw):
                return name
    raise ImageError(f"{hdr.path}: not signed by any of the given keys")


def import_file(store: ImageStore, path: Path, ref: Any = None, public_keys: list[tuple[str, Any]] | None = None,
                progress: Any = None) -> ImageMeta:
    """Bring an .nsq into the cache under its own manifest digest; nothing is published unless every digest
    (manifest, config, squashfs) matches and, with `public_keys`, a signature verifies."""
    import base64
    import binascii
    import hashlib

    from nagaya.image import oci
    from nagaya.image.store import ImageMeta, LayerInfo

    hdr = read_header(str(path))
    if public_keys is not None:
        verify_signatures(hdr, public_keys)
    what = str(path)
    try:
        manifest_bytes = base64.b64decode(hdr.meta["manifest"], validate=True)
        config_bytes = base64.b64decode(hdr.meta["config"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise ImageError(f"{what}: damaged single-file image metadata") from None
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    if digest != hdr.digest:
        raise ImageError(f"{what}: the manifest does not match the digest {hdr.digest[:19]} it claims")
    manifest = oci.Manifest.parse(manifest_bytes, f"{what}: manifest")
    if oci.sha256_digest(config_bytes) != manifest.config.digest:
        raise ImageError(f"{what}: the image config does not match its manifest")
    config = oci.load_json(config_bytes, f"{what}: image config")
    store.ensure_dirs()
    with store.lock(f"image-{digest[7:]}"):
        meta = store.meta(digest)
        if meta is None or not store.squashfs_path(digest).exists():
            with store.tmpdir("nsq-") as work, open(path, "rb") as f:
                sq = work / "image.sqfs"
                with open(sq, "wb") as out:
                    got = _hash_range(f, hdr.offset, hdr.size, _Counting(out, progress))
                if got != hdr.squashfs_digest:
                    raise _tampered(what)
                from nagaya.image import squash

                squash.check(sq)
                store.put_blob_bytes(config_bytes, manifest.config.digest)
                store.put_blob_bytes(manifest_bytes, digest)
                try:
                    layers = [LayerInfo(**x) for x in hdr.meta.get("layers") or []]
                except TypeError:
                    raise ImageError(f"{what}: damaged single-file image metadata") from None
                meta = ImageMeta(digest=digest, config_digest=manifest.config.digest, config=config,
                                 layers=layers, created=str(config.get("created") or ""), source=what,
                                 manifest_media_type=manifest.media_type,
                                 extra={"squashfs_digest": hdr.squashfs_digest})
                store.commit_image(meta, sq)
        if ref is not None:
            store.tag(ref, digest)
    return meta


class _Counting:
    def __init__(self, out: Any, progress: Any) -> None:
        self.out = out
        self.progress = progress

    def write(self, b: bytes) -> None:
        self.out.write(b)
        if self.progress:
            self.progress(len(b))


def default_name(path: Path) -> str:
    """The name an imported .nsq gets without --name: its file name, made a valid image name."""
    stem = path.name[:-4] if path.name.endswith(".nsq") else path.name
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem.lower()).strip("._-")
    return name or "image"
