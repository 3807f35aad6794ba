"""Reading a store's index: ``manifest.json`` merged with ``journal.jsonl`` (docs/recording.md, "The store").

The manifest is validated field by field (:mod:`~explaind.trajectory.manifest`) and then as a whole:
its schema must be one this explaind reads, the journal must continue it step by step, and the
fields must agree with each other (:func:`_check_consistency`). Anything else is a
:class:`~explaind.exceptions.TrajectoryError` naming the file, the value, what is allowed and the fix,
never a parser's own exception.
"""

from __future__ import annotations

import codecs
import errno
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .. import __version__
from ..exceptions import TrajectoryError
from ._io import read_confined
from ._layout import JOURNAL, MANIFEST, SETUP, STEP_FILE, unmarked_setup
from ._lean_index import (
    INDEX_TOO_LARGE,
    MAX_INDEX_BYTES,
    _canonical_manifest,
    _canonical_records,
    lean_index,
    max_index_bytes,
)
from ._steps import StepIndex
from ._tool_marks import looks_like, nonfinite_field, reordered_line, utf8_text
from ._travel import case_changed, damage_cause, read_settled
from .manifest import NEWER_TORCH, SCHEMA_VERSION, StepRecord, TrajectoryManifest

__all__ = ["read_manifest", "strict_json", "validation_problems", "MAX_INDEX_BYTES"]

logger = logging.getLogger(__name__)

def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of :func:`strict_json`: a key given twice in one object is an error, not the last one."""
    out = dict(pairs)
    if len(out) != len(pairs):
        key = next(k for i, (k, _) in enumerate(pairs) if any(k == other for other, _ in pairs[:i]))
        raise ValueError(f"the key {key!r} appears twice in one object (explaind writes each key once; which one "
                         f"counts would depend on the reader)")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (explaind writes no NaN or infinity)")


def _finite_float(text: str) -> float:
    """``parse_float`` of :func:`strict_json`: a number too large for a float64 (``1e400``) is infinity by another
    spelling, refused like the ``Infinity`` literal."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} overflows a float64 to infinity (explaind writes finite numbers "
                         f"only)")
    return value


#: one decoder for every strict parse (``json.loads`` with hooks builds a new one per call)
_STRICT = json.JSONDecoder(object_pairs_hook=_no_repeated_keys, parse_constant=_no_constant,
                           parse_float=_finite_float)
_STRICT_KEYS = json.JSONDecoder(object_pairs_hook=_no_repeated_keys)


def strict_json(data: bytes | str, *, finite: bool = True) -> Any:
    """``json.loads`` of what explaind writes: a key repeated in one object and ``NaN``/``Infinity`` are refused.

    Bytes are decoded as ``json.loads`` decodes them (UTF-8, -16 or -32, a UTF-8 byte-order mark dropped).
    ``finite=False`` reads ``NaN`` and ``Infinity`` (JSON that holds a user's numbers, e.g. an
    attribution's ``meta``); a repeated key is refused either way.

    Raises
    ------
    ValueError
        For invalid JSON (also bytes that are not UTF-8, -16 or -32), a repeated key or a non-finite literal.
    """
    text = data.decode(json.detect_encoding(data), "surrogatepass") if isinstance(data, bytes) else data
    return (_STRICT if finite else _STRICT_KEYS).decode(text)


def _journal_record(line: bytes) -> StepRecord:
    """One journal line as a :class:`StepRecord`, parsed strictly: each key once, finite numbers, JSON types as written.

    pydantic's JSON parser reads the line in strict mode (a count written as the string ``"12"`` is
    refused, not converted), but it keeps the last of a repeated key and reads ``NaN``; a line that is
    not byte for byte the record's own serialization (what explaind writes) is therefore parsed again
    by :func:`strict_json`, which refuses both.
    """
    record = StepRecord.model_validate_json(line, strict=True)
    if record.model_dump_json().encode() != line.rstrip(b"\r"):
        StepRecord.model_validate(strict_json(line), strict=True)  # raises for a repeated key or NaN
    return record


def _problem(exc: ValueError) -> str:
    return validation_problems(exc, 1) if isinstance(exc, ValidationError) else str(exc)


def _read_journal(root: Path, newer: str | None = None) -> list[tuple[int, bytes, StepRecord]]:
    """``(line number, line, record)`` of every readable journal line (a torn or unreadable last line left out).

    ``newer``: the fix when a newer explaind wrote the manifest (:func:`_newer_writer`); a complete line this
    explaind cannot validate is then refused with that fix, wherever it is (a line of fields this version does not
    know is no torn write, and a resume would replace that step).
    """
    path = root / JOURNAL
    try:
        data = read_confined(root, JOURNAL, max_index_bytes(), "Trajectory journal", INDEX_TOO_LARGE)
    except FileNotFoundError:
        return []
    try:  # saved as UTF-16 or UTF-32 by an editor: the same text, read as the manifest is (_tool_marks.py)
        data = utf8_text(data, f"Trajectory journal {str(path)!r}")
    except ValueError as exc:
        raise TrajectoryError(f"{exc}. Fix: save journal.jsonl as UTF-8, or restore it from a copy.") from None
    lines = data.removeprefix(codecs.BOM_UTF8).split(b"\n")  # an editor's byte-order mark, as in the manifest
    whole = lines[:-1] if not lines[-1] else lines  # the text after the last newline (none: b"")
    fast = _canonical_records(whole) if whole else None
    if fast is not None:
        return [(i + 1, line, record) for i, (line, record) in enumerate(zip(whole, fast))]
    records: list[tuple[int, bytes, StepRecord]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append((i + 1, line, _journal_record(line)))
        except ValueError as exc:  # a ValidationError too
            if newer is not None and isinstance(exc, ValidationError) and i < len(lines) - 1:
                raise TrajectoryError(f"Trajectory journal {str(path)!r} line {i + 1} holds a step record this "
                                      f"explaind cannot read: {_problem(exc)}. {newer}") from None
            if all(not rest.strip() for rest in lines[i + 1 :]):
                torn = i == len(lines) - 1  # no newline after it: the write was cut off
                logger.warning("Ignoring the %s last line of %s (%s); its step is not part of the run.", "incomplete"
                               if torn else "unreadable", path, "a step in flight at a crash" if torn else
                               "complete but corrupted: the step is recorded again when the run is resumed")
                break
            raise TrajectoryError(
                f"Trajectory journal {str(path)!r} is corrupted at line {i + 1}: {_problem(exc)}"
                f"{nonfinite_field(line)}. "
                f"The store was modified: restore journal.jsonl from a copy, or re-record the run, or copy the steps "
                f"that can be proven intact into a new store: Trajectory.salvage({str(root)!r}, out=...) "
                f"(explaind salvage RUN --out NEW)."
            ) from None
    return records


_NOT_OURS = ("The store is corrupted or was not written by explaind: restore manifest.json from a copy, or "
             "re-record the run.")
#: The other fix of a dtype name this torch lacks: the name may have been edited, not written by a newer torch.
_EDITED_DTYPE = ("If no torch has that dtype, manifest.json was edited: restore it from a copy, or re-record the "
                 "run.")


def validation_problems(exc: ValidationError, limit: int = 5) -> str:
    """The first ``limit`` problems of a validation error, each as ``field.path = value: what is allowed``."""
    out = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(part) for part in err["loc"]) or "the whole"
        value = repr(err.get("input"))
        value = value if len(value) <= 80 else value[:77] + "..."
        out.append(f"{where} = {value}: {err['msg']}")
    more = exc.error_count() - limit
    return "; ".join(out) + (f"; and {more} more" if more > 0 else "")


def _release(version: Any) -> tuple[int, ...] | None:
    """``"1.2.3"`` (any suffix after the numbers ignored) as ``(1, 2, 3)``; ``None`` for anything else."""
    if not isinstance(version, str):
        return None
    numbers = []
    for part in version.split("."):
        digits = part[: len(part) - len(part.lstrip("0123456789"))]
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers) or None


def _newer_writer(version: Any) -> str | None:
    """The fix for a manifest that a newer explaind wrote (its fields may be ones this version does not know)."""
    theirs, ours = _release(version), _release(__version__)
    if theirs is None or ours is None or theirs <= ours:
        return None
    return (f"It was written by explaind {version}, newer than this one ({__version__}), with the same schema "
            f"version: upgrade explaind to read it.")


def _check_schema_version(version: Any, path: Path) -> None:
    """``schema_version`` of a manifest is an integer this explaind reads: 1 .. :data:`SCHEMA_VERSION`."""
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise TrajectoryError(
            f"Trajectory manifest {str(path)!r} has schema_version {version}; this explaind reads up to "
            f"{SCHEMA_VERSION}. Upgrade explaind."
        )
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        raise TrajectoryError(
            f"Trajectory manifest {str(path)!r} has schema_version {version!r}; allowed: an integer from 1 to "
            f"{SCHEMA_VERSION}. {_NOT_OURS}"
        )


def _find_manifest(root: Path, path: Path) -> None:
    """Raise a :class:`TrajectoryError` saying why ``root`` holds no ``manifest.json`` to read (if it holds none).

    A manifest that is there but no regular file (a directory, a FIFO) is left to :func:`read_confined`, which
    names it as such; a directory that cannot be searched is named with the system's error, not taken for
    an empty one.
    """
    try:
        os.stat(path)
        return
    except (FileNotFoundError, NotADirectoryError):
        if os.path.lexists(path):
            return  # a dangling symbolic link: read_confined names it
    except OSError as exc:
        fix = ("the store path, or a directory on it, is a symbolic link that leads back to itself: pass the store "
               "directory itself" if exc.errno == errno.ELOOP else "give the user running explaind read and search "
               "permission on the directory and its files (chmod -R u+rX), or copy the store to a place it can read")
        raise TrajectoryError(f"The trajectory store {str(root)!r} cannot be read: {exc.strerror} ({str(path)!r}). "
                              f"Fix: {fix}.") from None
    if not root.exists():
        what = "it does not exist"
    elif not root.is_dir():
        inside = root.parent if root.name in (MANIFEST, JOURNAL) or root.parent.name in ("steps", "optimizer") else None
        if inside is not None and inside.name in ("steps", "optimizer"):
            inside = inside.parent
        in_store = inside is not None and (inside / MANIFEST).is_file()
        fix = (f"pass the store's directory, {str(inside)!r}" if in_store
               else "pass the directory of a store (the folder that holds manifest.json)")
        other = "" if in_store else looks_like(root)  # an archive, another tool's checkpoint (_tool_marks.py)
        raise TrajectoryError(f"{str(root)!r} is not an explaind trajectory store: "
                              f"{other or 'it is a file, not a directory. Fix: ' + fix}.")
    elif (root / SETUP).exists() or os.path.lexists(path):
        if os.path.lexists(path):  # written since the first look: a new store's writer writes the manifest, then
            return  # drops the setup marker, so a reader between the two finds both missing only if truly lost
        what = (f"it holds {SETUP} and no manifest.json yet: a recording is setting it up (its manifest appears "
                f"once its start files are written) or was interrupted before it recorded anything")
    else:
        what, renamed = "it has no manifest.json", case_changed(root, MANIFEST)
        if renamed:
            raise TrajectoryError(f"{str(root)!r} is not an explaind trajectory store as it is: {what} but {renamed!r}"
                                  f": the names of its files changed case (a copy through a case-insensitive file "
                                  f"system or an archive tool), and explaind's names are lower case. Fix: rename its "
                                  f"files back (manifest.json, journal.jsonl, steps/000000.safetensors, ...).")
        if unmarked_setup(root):
            raise TrajectoryError(
                f"{str(root)!r} is not an explaind trajectory store: it holds the start files and an empty journal of "
                f"a recording that recorded no step, without manifest.json or the set-up marker {SETUP} (a copy "
                f"taken while that recording set its store up, or an interrupted set-up). Nothing was recorded "
                f"there. Record with TrajectoryRecorder(..., store={str(root)!r}, overwrite=True), or load the "
                f"original store once it holds steps.")
        recorded = recorded_files(root)
        if recorded:
            raise TrajectoryError(
                f"The trajectory store {str(root)!r} has lost its manifest.json: it holds {recorded} of a recording, "
                f"but the manifest that describes the run (its parameters, optimizer, loss and start files, against "
                f"which every step file is checked) is missing, deleted or lost. Nothing was changed, and nothing "
                f"recorded can be checked or salvaged without it. Fix: restore manifest.json from a copy of the store "
                f"(or the whole store); else re-record the run into a new directory.")
    other = looks_like(root) if root.is_dir() else ""  # another tool's checkpoint folder (_tool_marks.py)
    fix = f"; {other}" if other else f". Record one with TrajectoryRecorder(..., store={str(root)!r})"
    raise TrajectoryError(f"{str(root)!r} is not an explaind trajectory store: {what}{fix}.")


def recorded_files(root: Path) -> str:
    """What of a recording a directory without a manifest holds: its journal and step files ("" for neither)."""
    held = [JOURNAL] if (root / JOURNAL).is_file() else []
    try:
        steps = sum(1 for name in os.listdir(root / "steps") if STEP_FILE.fullmatch(name))
    except OSError:
        steps = 0
    if steps:
        held.append(f"the files of {steps} step(s) (steps/)")
    return " and ".join(held)


def read_manifest(root: str | Path) -> TrajectoryManifest:
    """Read ``manifest.json`` and merge the steps completed since it was written (from the journal).

    The steps come back as a :class:`~explaind.trajectory._steps.StepIndex` (columns). A store exactly as explaind
    writes it is read a block of records at a time (:func:`~explaind.trajectory._lean_index.lean_index`); any other
    is read here, line by line where needed, so that an error names the line and the field.

    Raises
    ------
    TrajectoryError
        When ``root`` is not a store, the manifest is invalid, its schema is newer than this
        version of explaind, or the journal contradicts it.
    """
    root = Path(root)
    path = root / MANIFEST
    _find_manifest(root, path)
    try:
        data = read_settled(lambda: read_confined(root, MANIFEST, max_index_bytes(), "Trajectory manifest",
                                                         INDEX_TOO_LARGE), 1)
    except FileNotFoundError:
        raise TrajectoryError(f"{str(root)!r} is not an explaind trajectory store: its manifest.json "
                              f"vanished.") from None
    lean = lean_index(root, data)  # a store as explaind wrote it, read in columns (_lean_index.py)
    if lean is not None:
        _check_schema_version(lean.schema_version, path)
        lean.n_steps = len(lean.steps)
        _check_consistency(lean, path)
        return lean
    manifest = _canonical_manifest(data)
    if manifest is not None:
        _check_schema_version(manifest.schema_version, path)
    else:
        manifest = _parse_manifest(data, path)
    del data
    steps = list(manifest.steps)
    seen: dict[int, tuple[int, bytes]] = {}  # step -> its first line: number and bytes (no records kept alive)
    journal = _read_journal(root, _newer_writer(manifest.explaind_version))
    for line, text, record in journal:
        first = seen.setdefault(record.step, (line, text))
        if first[1] is not text and first[1] != text:
            _check_repeated(record, first, line, root)
        if record.step < len(steps):
            continue  # the manifest's own record of the step is read (and checked against its file)
        if record.step != len(steps):
            later = reordered_line([r.step for _, _, r in journal], len(steps))
            cause = ("" if later is None else
                     f" It lists step {len(steps)} later, at line {journal[later][0]}: its lines were reordered (a "
                     f"sort, a merge or a sync of two copies), not lost; Trajectory.salvage({str(root)!r}, out=...) "
                     f"takes them in any order and keeps every step their files prove.")
            raise TrajectoryError(
                f"Trajectory journal {str(root / JOURNAL)!r} jumps from step {len(steps) - 1} to step {record.step}; "
                f"allowed: the next step, {len(steps)}.{cause} The store was modified: restore journal.jsonl from a "
                f"copy, or re-record the run."
            )
        steps.append(record)
    for i, record in enumerate(steps):
        if record.step != i:
            raise TrajectoryError(f"Trajectory manifest {str(path)!r} lists step {record.step} at position {i}; "
                                  f"allowed: the steps 0, 1, 2, ... in order, each once. {_NOT_OURS}")
    manifest.steps = StepIndex(steps)
    manifest.n_steps = len(steps)
    _check_consistency(manifest, path)
    return manifest


def _parse_manifest(data: bytes, path: Path) -> TrajectoryManifest:
    """A manifest that is not byte for byte explaind's own (an editor's, an older one's), parsed strictly.

    Raises
    ------
    TrajectoryError
        Naming the problem: invalid JSON, a repeated key, ``NaN``, a schema this explaind does not
        read, a field of the wrong JSON type (a string for a count is not converted) or an unknown one.
    """
    try:
        raw = strict_json(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than the parser goes
        raise TrajectoryError(f"Trajectory manifest {str(path)!r} is not valid JSON: {exc}{nonfinite_field(data)} "
                              f"(allowed: UTF-8 JSON as "
                              f"explaind writes it, each key once per object, finite numbers). "
                              f"{damage_cause(data, 'xxh3-128', '', MANIFEST, None) if not data else _NOT_OURS}"
                              ) from None
    if not isinstance(raw, dict):
        raise TrajectoryError(f"Trajectory manifest {str(path)!r} holds a JSON {type(raw).__name__}, not an object "
                              f"with the store's description. {_NOT_OURS}")
    _check_schema_version(raw.get("schema_version"), path)
    try:
        manifest = TrajectoryManifest.model_validate(raw, strict=True)
    except ValidationError as exc:
        problems = validation_problems(exc).rstrip(".")
        fix = (_EDITED_DTYPE if NEWER_TORCH.rstrip(".") in problems
               else _newer_writer(raw.get("explaind_version")) or _added_fields(exc, raw) or _NOT_OURS)
        raise TrajectoryError(f"Trajectory manifest {str(path)!r} is invalid: {problems}. {fix}".rstrip()) from None
    return manifest


def _added_fields(exc: ValidationError, raw: dict[str, Any]) -> str:
    """The fix for a manifest whose only problems are fields this explaind does not know, written by this or an
    older version (``""`` otherwise): a tool or a person added them; the run's description is intact."""
    errors = exc.errors()
    if not errors or any(e.get("type") != "extra_forbidden" for e in errors):
        return ""
    fields = [".".join(str(p) for p in e.get("loc", ())) for e in errors]
    return (f"The field(s) {fields} are not ones that explaind writes: its manifest says explaind "
            f"{raw.get('explaind_version')!r} wrote it, and this explaind ({__version__}) knows every field of that "
            f"and older versions, so a tool or a person added them (the rest of the description parses). Fix: remove "
            f"{'that field' if len(fields) == 1 else 'those fields'} from manifest.json (keep notes of your own in "
            f"another file beside the store); a store written by a newer explaind names its version, then upgrade.")


def _check_repeated(record: StepRecord, first: tuple[int, bytes], line: int, root: Path) -> None:
    """A step the journal lists again (``first``: its earlier line's number and bytes) must be listed unchanged.

    explaind appends one record per step, so two different records of one step are a modified
    journal: which of them is the run cannot be told.
    """
    if _journal_record(first[1]) != record:
        raise TrajectoryError(
            f"Trajectory journal {str(root / JOURNAL)!r} lists step {record.step} at line {first[0]} and again at line "
            f"{line} with another record; allowed: each step once, or repeated unchanged. The store was modified: "
            f"restore journal.jsonl from a copy, or re-record the run from step {record.step}."
        )


def _check_consistency(manifest: TrajectoryManifest, path: Path) -> None:
    """Cross-field rules of a manifest that its fields' types do not express (raise naming the value)."""
    constants = {c.name for c in manifest.constants}
    problems = []
    if constants and manifest.constants_file is None:
        problems.append(f"it lists constants {sorted(constants)} but no constants_file holding them")
    unknown = [n for n in manifest.buffer_names if n not in constants]
    if unknown:
        problems.append(f"buffer_names {unknown} are not among its constants {sorted(constants)}")
    if manifest.param_stride == 1:
        steps = manifest.steps  # a StepIndex (read_manifest) lists step s at position s; salvage's list, as it is
        missing = ([s for s, has in enumerate(steps.has_params()) if not has] if isinstance(steps, StepIndex)
                   else [r.step for r in steps if not r.has_params])
        if missing:
            problems.append(f"steps {missing[:5]} have has_params=false in a dense store (param_stride 1), "
                            f"where every step file holds theta")
    if problems:
        raise TrajectoryError(f"Trajectory manifest {str(path)!r} contradicts itself: {'; '.join(problems)}. "
                              f"{_NOT_OURS}")
