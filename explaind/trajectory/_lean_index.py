"""Reading the index of a store exactly as explaind wrote it, in bounded memory (docs/recording.md, "The store").

:func:`~explaind.trajectory._index.read_manifest` first tries :func:`lean_index`. It accepts only a
``manifest.json`` that is byte for byte the manifest's own serialization and a ``journal.jsonl`` whose
lines are byte for byte the records' own (what explaind writes), and it checks that as the careful
reader does, a block of records at a time:

* the manifest without its step list is parsed strictly and written back: the same bytes;
* the step list, cut into blocks of :data:`BLOCK` records at the lines where one record ends and the
  next begins, is parsed strictly block by block and written back: the same bytes, the steps 0, 1, 2, ...
  in order; each block goes into a :class:`~explaind.trajectory._steps.StepIndex` (columns) and is dropped;
* the journal's line of each step the manifest lists must be that record's compact serialization (what the
  recorder appends), so it is checked by comparing bytes, not parsed again;
* the journal's lines after the manifest's steps are parsed and written back a block at a time, and must
  continue the steps one by one.

Anything else (a CRLF line, a byte-order mark, a torn or corrupted line, a repeated step, a journal line that
differs from the manifest's record of its step, an older explaind's formatting) returns ``None``: the careful
reader then reads the store and names what is wrong, as before. The strict whole-file parsers both readers
share (:func:`_canonical_records`, :func:`_canonical_manifest`) and :data:`MAX_INDEX_BYTES` live here too.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import TypeAdapter

from ..exceptions import ConfigError, TrajectoryError
from ._io import read_confined
from ._layout import JOURNAL
from ._steps import StepIndex
from .manifest import StepRecord, TrajectoryManifest

__all__ = ["lean_index", "BLOCK", "MAX_INDEX_BYTES", "INDEX_TOO_LARGE", "max_index_bytes"]

#: Largest manifest or journal read by default (5,000 steps take about 4 MB; 1,000,000 about 560 MB in the
#: manifest); ``EXPLAIND_MAX_INDEX_BYTES`` raises it (:func:`max_index_bytes`).
MAX_INDEX_BYTES = 1 << 28
#: The cause and fix of an index file above :func:`max_index_bytes` (docs/recording.md, round 15).
INDEX_TOO_LARGE = ("it was modified, or it indexes a run of more steps than that limit holds (explaind writes about "
                   "560 bytes per step in each of manifest.json and journal.jsonl: 256 MiB is about 480,000 steps). "
                   "Fix: for a run that long, raise the limit with the environment variable "
                   "EXPLAIND_MAX_INDEX_BYTES=<bytes> (about twice the file's size in memory is used to read it); "
                   "else restore the file from a copy, or Trajectory.salvage(...) the steps whose files are intact.")


def max_index_bytes() -> int:
    """The largest manifest or journal read: ``EXPLAIND_MAX_INDEX_BYTES`` when set, else :data:`MAX_INDEX_BYTES`.

    Raises
    ------
    ConfigError
        For a value that is not a positive integer.
    """
    raw = os.environ.get("EXPLAIND_MAX_INDEX_BYTES", "").strip()
    if not raw:
        return MAX_INDEX_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"EXPLAIND_MAX_INDEX_BYTES={raw!r} is not allowed: it takes a positive number of bytes "
                          f"(default {MAX_INDEX_BYTES}). Fix: set it to e.g. {2 * MAX_INDEX_BYTES}, or unset it.")
    return int(raw)

#: a journal's records parsed, and written back, in one call (:func:`_canonical_records`)
_RECORDS = TypeAdapter(list[StepRecord])


def _canonical_records(lines: list[bytes]) -> list[StepRecord] | None:
    """The records of ``lines`` when every line is exactly what explaind writes, else ``None``.

    All lines are parsed as one JSON array in strict mode and serialized back; the bytes are equal
    only when no key is repeated, no number is ``NaN`` and every value has the JSON type explaind
    writes (a repeated key or ``NaN`` would serialize differently). One call for the whole journal
    costs less than pydantic's lax parse line by line (docs/recording.md, "Strangers' files, round 6"); anything else
    (a CRLF line, a line of an older explaind, a corrupted one) is read line by line.
    """
    body = b"[" + b",".join(lines) + b"]"
    try:
        records = _RECORDS.validate_json(body, strict=True)
    except ValueError:  # a ValidationError
        return None
    return records if _RECORDS.dump_json(records) == body else None


def _canonical_manifest(data: bytes) -> TrajectoryManifest | None:
    """The manifest when ``data`` is exactly what explaind writes (strict parse, same bytes back), else ``None``."""
    try:
        manifest = TrajectoryManifest.model_validate_json(data, strict=True)
    except ValueError:  # a ValidationError
        return None
    return manifest if manifest.to_json() == data else None



#: records parsed at a time: their pydantic objects are all that is held besides the files' bytes and the columns
BLOCK = 2048

_STEPS_KEY = b'\n "steps": '
_RECORD_END = b"\n  },\n  {"  # between two records of the manifest's step list (indented by 2)


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """The cyclic garbage collector paused (the records parsed hold no cycles; each pass would walk all of them)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _block(text: bytes) -> tuple[list[StepRecord], bytes] | None:
    """The records of ``text`` (records of the manifest's step list, indented by 2) and their journal lines.

    ``None`` unless the records, parsed strictly, write back to ``text`` byte for byte. The journal lines are
    the records' compact serialization (what the recorder appends), joined by commas in a JSON array.
    """
    array = b"[" + (b"\n" + text).replace(b"\n ", b"\n") + b"\n]"  # the list as written on its own, indented by 1
    try:
        records = _RECORDS.validate_json(array, strict=True)
    except ValueError:  # a ValidationError
        return None
    if _RECORDS.dump_json(records, indent=1) != array:
        return None
    return records, _RECORDS.dump_json(records)


def _manifest_blocks(data: bytes, first: int, last: int) -> Iterator[bytes]:
    """The step list ``data[first:last]`` (from the first record's indentation to the last's ``}``) in blocks of
    :data:`BLOCK` records, cut where one record ends and the next begins (the blocks and the ``",\n"`` between
    them make up the list)."""
    start = first
    while True:
        at, cut = start, -1
        for _ in range(BLOCK):
            found = data.find(_RECORD_END, at, last)
            if found < 0:
                break
            cut, at = found, found + len(_RECORD_END) - 3  # the next record's "  {"
        else:
            yield data[start:cut + 4]  # up to this record's "\n  }"
            start = cut + 6
            continue
        yield data[start:last]
        return


def _journal_lines(data: bytes, start: int, count: int) -> tuple[bytes, int] | None:
    """The ``count`` lines of the journal from ``start`` joined by commas, and where the next line starts."""
    end = start
    for _ in range(count):
        end = data.find(b"\n", end) + 1
        if end == 0:
            return None
    text = data[start:end - 1]
    if not text.startswith(b"{") or text.count(b"\n{") != count - 1:
        return None  # a line that does not start a record: the comparison below could align lines wrongly
    return text.replace(b"\n", b","), end


def lean_index(root: Path, data: bytes) -> TrajectoryManifest | None:
    """The manifest of ``data`` with its steps and the journal's in a :class:`StepIndex`, or ``None`` (see above)."""
    at = data.find(_STEPS_KEY)
    if at < 0:
        return None
    open_ = at + len(_STEPS_KEY)
    if data[open_:open_ + 2] == b"[]":
        close = open_ + 1
    elif data[open_:open_ + 5] == b"[\n  {":
        close = data.find(b"\n ]", open_) + 2
        if close < 2:
            return None
    else:
        return None
    manifest = _canonical_manifest(data[:open_] + b"[]" + data[close + 1:])
    if manifest is None:
        return None
    try:
        journal = read_confined(root, JOURNAL, max_index_bytes(), "Trajectory journal", INDEX_TOO_LARGE)
    except FileNotFoundError:
        journal = b""
    except TrajectoryError:
        return None  # the careful reader names it
    if journal.startswith(codecs.BOM_UTF8) or (journal and not journal.endswith(b"\n")):
        return None
    steps = StepIndex()
    at_line, left = 0, journal.count(b"\n")  # where the journal's next line starts; how many lines are left
    with _no_collection():
        if close > open_ + 1:
            for text in _manifest_blocks(data, open_ + 2, close - 2):
                block = _block(text)
                if block is None or not _continue(steps, block[0]):
                    return None
                records, compact = block
                if left < len(records):  # a journal shorter than the manifest (its lines are read, not the steps)
                    compact = _RECORDS.dump_json(records[:left]) if left else b"[]"
                if left:
                    lines = _journal_lines(journal, at_line, min(left, len(records)))
                    if lines is None or b"[" + lines[0] + b"]" != compact:
                        return None
                    at_line, left = lines[1], left - min(left, len(records))
        rest = journal[at_line:].split(b"\n")[:-1]
        for i in range(0, len(rest), BLOCK):
            records = _canonical_records(rest[i:i + BLOCK])
            if records is None or not _continue(steps, records):
                return None
    manifest.steps = steps
    return manifest


def _continue(steps: StepIndex, records: list[StepRecord]) -> bool:
    """Append ``records`` to ``steps`` when they are its next steps in order (else ``False``: the careful reader)."""
    n = len(steps)
    if any(record.step != n + k for k, record in enumerate(records)):
        return False
    steps.extend(records)
    return True
