"""What other tools leave in a store's index files, told apart from damage.

See docs/recording.md, "What tools do to a store, round 14".

An editor that saves ``journal.jsonl`` as UTF-16 (Windows' "Unicode"), a script that writes ``NaN`` into a float
field of ``manifest.json``, a sort or a merge of the journal's lines: none of these is a torn write, and a message
that says only "corrupted" leaves the user without the cause. This module re-encodes a journal saved in another
Unicode encoding of the same text (its records are then read as recorded: the checksums are in the text, not in
its encoding), finds the field that holds a non-finite number, and tells a journal whose lines were reordered from
one that lost a step. Nothing here is on the normal read path: each function runs only where a strict parse failed,
or on a journal that does not start as explaind writes it.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from typing import Any

__all__ = ["nonfinite_field", "reordered_line", "utf8_text", "store_run_id"]

#: the byte-order marks of the encodings other than UTF-8 that ``json`` reads (an editor's "Unicode" save)
_WIDE_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_RUN_ID = re.compile(rb'"run_id"\s*:\s*"([0-9a-f]{32})"')


def utf8_text(data: bytes, what: str) -> bytes:
    """``data`` as UTF-8: unchanged when it is UTF-8 (with or without a byte-order mark), else decoded from the
    UTF-16 or UTF-32 that ``json.detect_encoding`` finds (an editor's "Unicode" save of the same text) and encoded as
    UTF-8, without a byte-order mark.

    Without a byte-order mark, bytes are taken for UTF-16 or UTF-32 only when they decode to JSON text that starts
    with an object (``{``); anything else, e.g. a journal whose first bytes a file system zeroed, is left as it is,
    for the reader to name as damaged.

    Raises
    ------
    ValueError
        When the bytes start with a UTF-16 or UTF-32 byte-order mark but are not text of that encoding (naming
        ``what`` and the encoding).
    """
    marked = data[:4].startswith(_WIDE_BOMS)
    if not marked and (len(data) < 2 or (data[0] and data[1])):
        return data  # UTF-8 (json's rule: a wide encoding has a NUL among the first bytes of JSON text)
    encoding = json.detect_encoding(data[:4])
    if encoding in ("utf-8", "utf-8-sig"):
        return data
    try:
        text = data.decode(encoding)
    except UnicodeError as exc:
        if not marked:
            return data
        raise ValueError(f"{what} starts as {encoding.upper()} text (an editor's 'Unicode' save) but is not: {exc}. "
                         f"explaind writes UTF-8") from None
    return text.removeprefix("\ufeff").encode("utf-8") if marked or text.startswith("{") else data


def nonfinite_field(data: bytes | str) -> str:
    """Where the JSON ``data`` holds ``NaN``, ``Infinity`` or a number that overflows to infinity: ``" (at
    steps[1].audit)"``, or ``""`` when none is found (the parse failed for another reason)."""
    try:
        raw = json.loads(data, parse_constant=float)
    except (ValueError, RecursionError):
        return ""
    path = _find_nonfinite(raw, "")
    return f" (at {path})" if path else ""


def _find_nonfinite(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "the top level"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _find_nonfinite(item, f"{path}[{key}]" if isinstance(key, int) else
                                f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def reordered_line(steps: list[int], expected: int) -> int | None:
    """The position (0-based) in the journal's ``steps`` (one per line that parses, in line order) of the line of
    step ``expected``, which the journal lists only later, after a line of another step: the lines were reordered (a
    sort, a merge, a sync of two copies) rather than lost. ``None`` when the journal does not list it."""
    return next((i for i, s in enumerate(steps) if s == expected), None)


def store_run_id(manifest_head: bytes) -> str | None:
    """The ``run_id`` of a manifest as explaind writes it, from its first bytes (``None`` if not found there)."""
    found = _RUN_ID.search(manifest_head)
    return None if found is None else found.group(1).decode()
