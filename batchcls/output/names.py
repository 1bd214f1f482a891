"""Text cells: file names escaped reversibly into valid UTF-8, and spreadsheet formulas neutralised.

A path is any byte string but CSV, JSON and Parquet hold text, so the ``path`` column holds the name
as UTF-8 with two escapes, identical in every format: each byte that is not valid UTF-8 is written
``\\xNN`` (two lowercase hex digits) and a backslash is written ``\\\\``. Every other character, newline
and CR included, is written as itself (CSV quotes it). ``decode_name`` undoes the escapes, so its result
is the ``str`` that ``os.fsencode`` turns back into the original bytes.
"""
from __future__ import annotations

import re
from typing import Any

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_ESCAPE = re.compile(r"\\(\\|x[89a-fA-F][0-9a-fA-F])")


def escape_cell(value: str) -> str:
    """Neutralise spreadsheet formulas; a leading quote is escaped too, so unescape is exact."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def unescape_cell(value: str) -> str:
    return value[1:] if value.startswith("'") else value


def encode_name(name: str) -> str:
    """A file name as the text every format stores (see the module docstring): reversible, valid UTF-8."""
    if "\\" not in name and (name.isascii() or utf8_ok(name)):
        return name
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":  # os.fsdecode's stand-in for an undecodable byte
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def decode_name(text: str) -> str:
    """Inverse of ``encode_name``; a lone backslash not starting an escape stays as it is."""
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xdc00 + int(m.group(1)[1:], 16)), text)


def utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def text_cell(column: str, value: Any) -> str:
    """A text cell as valid UTF-8: the path reversibly, other text (reasons) with surrogates spelled out."""
    s = str(value)
    if column == "path":
        return encode_name(s)
    return s if utf8_ok(s) else s.encode("utf-8", "backslashreplace").decode("utf-8")
