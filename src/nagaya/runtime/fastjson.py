"""JSON for `nagaya run`'s start-up path, straight from the `_json` C accelerator.

`import json` pulls in `re` (and through it `enum`): a few ms on every container start, for one metadata
file read and one audit line written. These give the same results as json.loads and
json.dumps(obj, separators=(",", ":"), sort_keys=True); on anything unusual they defer to `json` itself,
so errors and corner cases are exactly json's.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False       # `typing` stays unimported on the run path; annotations are strings
if TYPE_CHECKING:
    from typing import Any

_WS = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """The attributes json.JSONDecoder hands the C scanner, with json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _json.make_scanner(_Context)


class _Unencodable(Exception):
    pass


def _default(_o: object) -> object:
    raise _Unencodable


def loads(data: str | bytes) -> Any:
    try:
        text = data.decode() if isinstance(data, bytes) else data
        obj, end = _scan(text, len(text) - len(text.lstrip(_WS)))
        if end == len(text) or not text[end:].strip(_WS):
            return obj
    except (StopIteration, UnicodeDecodeError):
        pass
    import json  # the exact error message, or a BOM / UTF-16 document json accepts

    return json.loads(data)


def dumps_compact(obj: Any) -> str:
    """json.dumps(obj, separators=(",", ":"), sort_keys=True)."""
    try:
        encode = _json.make_encoder({}, _default, _json.encode_basestring_ascii, None, ":", ",", True, False, True)
        return "".join(encode(obj, 0))
    except (_Unencodable, TypeError, ValueError):
        import json

        return json.dumps(obj, separators=(",", ":"), sort_keys=True)
