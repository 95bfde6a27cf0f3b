"""Just enough ELF: is a file an ELF object (a driver's binary, not a wrapper script), and its SONAME
(the name a driver library's link must have: libcuda.so.1 for libcuda.so.580.65.06)."""

from __future__ import annotations

import struct

_PT_LOAD, _PT_DYNAMIC, _DT_STRTAB, _DT_SONAME = 1, 2, 5, 14


def is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def soname(path: str) -> str:
    """The DT_SONAME of a 64-bit little-endian shared object, or "" (none, or not such a file)."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
            if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
                return ""
            phoff, = struct.unpack_from("<Q", data, 32)
            phentsize, phnum = struct.unpack_from("<HH", data, 54)
            loads, dyn = [], None
            for i in range(phnum):
                off = phoff + i * phentsize
                if off + 56 > len(data):
                    return ""
                p_type, _flags, p_offset, p_vaddr, _pa, p_filesz, _ms, _al = struct.unpack_from("<IIQQQQQQ", data, off)
                if p_type == _PT_LOAD:
                    loads.append((p_vaddr, p_offset, p_filesz))
                elif p_type == _PT_DYNAMIC:
                    dyn = (p_offset, p_filesz)
            if dyn is None:
                return ""
            f.seek(dyn[0])
            dynamic = f.read(min(dyn[1], 1 << 16))
            strtab = name_off = None
            for off in range(0, len(dynamic) - 15, 16):
                tag, val = struct.unpack_from("<qQ", dynamic, off)
                if tag == 0:
                    break
                if tag == _DT_STRTAB:
                    strtab = val
                elif tag == _DT_SONAME:
                    name_off = val
            if strtab is None or name_off is None:
                return ""
            for vaddr, offset, size in loads:           # the string table's address -> its file offset
                if vaddr <= strtab < vaddr + size:
                    f.seek(offset + strtab - vaddr + name_off)
                    return f.read(256).split(b"\0", 1)[0].decode("utf-8", "replace")
    except (OSError, struct.error, IndexError):
        pass
    return ""
