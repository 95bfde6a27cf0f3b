"""The dynamic loader's cache (/etc/ld.so.cache), read directly: `ldconfig -p` costs a fork and ~10 ms.

glibc's format "glibc-ld.so.cache1.1" (alone since glibc 2.32, or after the old "ld.so-1.7.0" table): a
48-byte header, then 24-byte entries (flags, key, value, osversion, hwcap) whose key/value are offsets
of NUL-terminated strings counted from the start of that header.
"""

from __future__ import annotations

import os
import struct

NEW_MAGIC = b"glibc-ld.so.cache1.1"
_HEADER = struct.Struct("<20sII")               # magic+version, nlibs, len_strings
_ENTRY = struct.Struct("<iIIIQ")                # flags, key, value, osversion, hwcap
_HEADER_SIZE = 48
# Architecture bits of an entry's flags (glibc's FLAG_*_LIB64 & co.), for the machine's own libraries.
_ARCH_FLAGS = {"x86_64": 0x0300, "aarch64": 0x0A00, "ppc64le": 0x0500, "ppc64": 0x0500, "s390x": 0x0400,
               "riscv64": 0x1000}
_TYPE_ELF_LIBC6 = 0x0003


def parse(data: bytes, machine: str = "") -> list[tuple[str, str]]:
    """(library name, path) pairs of the machine's architecture, in the cache's order (ldconfig's
    preference order), as `ldconfig -p` lists them. Anything malformed yields what was read so far."""
    start = data.find(NEW_MAGIC)
    if start < 0 or len(data) < start + _HEADER_SIZE:
        return []
    _magic, nlibs, _strlen = _HEADER.unpack_from(data, start)
    want = _ARCH_FLAGS.get(machine or os.uname().machine)
    out: list[tuple[str, str]] = []
    pos = start + _HEADER_SIZE
    for _ in range(nlibs):
        if pos + _ENTRY.size > len(data):
            break
        flags, key, value, _osv, _hwcap = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        if flags & 0xFF != _TYPE_ELF_LIBC6 or (want is not None and flags & 0xFF00 != want):
            continue
        name, path = _cstr(data, start + key), _cstr(data, start + value)
        if name and path:
            out.append((name, path))
    return out


def _cstr(data: bytes, off: int) -> str:
    end = data.find(b"\0", off)
    if off >= len(data) or end < 0:
        return ""
    return data[off:end].decode("utf-8", "replace")


def read(path: str = "/etc/ld.so.cache") -> list[tuple[str, str]]:
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except OSError:
        return []


def build(entries: list[tuple[str, str]], machine: str = "x86_64") -> bytes:
    """A cache file in the new format, as ldconfig writes it (for tests and fake driver layouts)."""
    strings = bytearray()
    offsets = []
    base = _HEADER_SIZE + _ENTRY.size * len(entries)
    for name, path in entries:
        k = base + len(strings)
        strings += name.encode() + b"\0"
        v = base + len(strings)
        strings += path.encode() + b"\0"
        offsets.append((k, v))
    flags = _TYPE_ELF_LIBC6 | _ARCH_FLAGS.get(machine, 0)
    head = _HEADER.pack(NEW_MAGIC, len(entries), len(strings)) + bytes(_HEADER_SIZE - _HEADER.size)
    body = b"".join(_ENTRY.pack(flags, k, v, 0, 0) for k, v in offsets)
    return head + body + bytes(strings)
