"""User input encoded for the context it lands in, besides HTML (Jinja's autoescape): HTTP headers and CSV
files. Stdlib only: the CLI's audit export uses it too."""

from __future__ import annotations

import re
from urllib.parse import quote

_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")
_ASCII_FALLBACK = re.compile(r"[^A-Za-z0-9._+-]")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def content_disposition(filename: str, kind: str = "attachment") -> str:
    """A Content-Disposition value for any file name (RFC 6266): a plain-ASCII `filename` for old clients
    and the exact name as `filename*=UTF-8''...` (RFC 5987 percent-encoding). Control characters, slashes
    and backslashes become `_` first; quotes, semicolons and newlines can then reach neither form raw,
    so the header is always well-formed and a name can never add a parameter or a header."""
    name = _UNSAFE_NAME.sub("_", filename).strip(". ")[:200] or "download"
    fallback = _ASCII_FALLBACK.sub("_", name) or "download"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def csv_cell(value: object) -> str:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula (OWASP "CSV injection"):
    a value starting with = + - @ TAB or CR gets a leading single quote. Everything else is unchanged."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def csv_row(values: list[object]) -> list[str]:
    return [csv_cell(v) for v in values]
