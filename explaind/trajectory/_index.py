"""Reading a store's index: ``manifest.json`` merged with ``journal.jsonl`` (docs/recording.md, "The store").

The manifest is validated field by field (:mod:`~explaind.trajectory.manifest`) and then as a whole:
its schema must be one this explaind reads, the journal must continue it step by step, and the
fields must agree with each other (:func:`_check_consistency`). Anything else is a
:class:`~explaind.exceptions.TrajectoryError` naming the file, the value, what is allowed and the fix,
never a parser's own exception.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..exceptions import TrajectoryError
from ._io import read_confined
from ._layout import JOURNAL, MANIFEST
from .manifest import SCHEMA_VERSION, StepRecord, TrajectoryManifest

__all__ = ["read_manifest", "validation_problems", "MAX_INDEX_BYTES"]

logger = logging.getLogger(__name__)

#: Largest manifest or journal read (5,000 steps take about 4 MB).
MAX_INDEX_BYTES = 1 << 28


def _read_journal(root: Path) -> list[StepRecord]:
    path = root / JOURNAL
    try:
        lines = read_confined(root, JOURNAL, MAX_INDEX_BYTES, "Trajectory journal").split(b"\n")
    except FileNotFoundError:
        return []
    records: list[StepRecord] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(StepRecord.model_validate_json(line))
        except ValidationError as exc:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                torn = i == len(lines) - 1  # no newline after it: the write was cut off
                logger.warning("Ignoring the %s last line of %s (%s); its step is not part of the run.", "incomplete"
                               if torn else "unreadable", path, "a step in flight at a crash" if torn else
                               "complete but corrupted: the step is recorded again when the run is resumed")
                break
            raise TrajectoryError(
                f"Trajectory journal {str(path)!r} is corrupted at line {i + 1}: {validation_problems(exc, 1)}. "
                f"The store was modified: restore journal.jsonl from a copy, or re-record the run."
            ) from None
    return records


_NOT_OURS = ("The store is corrupted or was not written by explaind: restore manifest.json from a copy, or "
             "re-record the run.")


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


def read_manifest(root: str | Path) -> TrajectoryManifest:
    """Read ``manifest.json`` and merge the steps completed since it was written (from the journal).

    Raises
    ------
    TrajectoryError
        When ``root`` is not a store, the manifest is invalid, its schema is newer than this
        version of explaind, or the journal contradicts it.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        what = "does not exist" if not root.exists() else "has no manifest.json"
        raise TrajectoryError(
            f"{str(root)!r} is not an explaind trajectory store: it {what}. Record one with "
            f"TrajectoryRecorder(..., store={str(root)!r})."
        )
    try:
        data = read_confined(root, MANIFEST, MAX_INDEX_BYTES, "Trajectory manifest")
    except FileNotFoundError:
        raise TrajectoryError(f"{str(root)!r} is not an explaind trajectory store: its manifest.json "
                              f"vanished.") from None
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than the parser goes
        raise TrajectoryError(f"Trajectory manifest {str(path)!r} is not valid JSON: {exc}. {_NOT_OURS}") from None
    if not isinstance(raw, dict):
        raise TrajectoryError(f"Trajectory manifest {str(path)!r} holds a JSON {type(raw).__name__}, not an object "
                              f"with the store's description. {_NOT_OURS}")
    _check_schema_version(raw.get("schema_version"), path)
    try:
        manifest = TrajectoryManifest.model_validate(raw)
    except ValidationError as exc:
        raise TrajectoryError(f"Trajectory manifest {str(path)!r} is invalid: {validation_problems(exc)}. "
                              f"{_NOT_OURS}") from None
    steps = list(manifest.steps)
    for record in _read_journal(root):
        if record.step < len(steps):
            continue
        if record.step != len(steps):
            raise TrajectoryError(
                f"Trajectory journal {str(root / JOURNAL)!r} jumps from step {len(steps) - 1} to step {record.step}; "
                f"allowed: the next step, {len(steps)}. The store was modified: restore journal.jsonl from a copy, or "
                f"re-record the run."
            )
        steps.append(record)
    for i, record in enumerate(steps):
        if record.step != i:
            raise TrajectoryError(f"Trajectory manifest {str(path)!r} lists step {record.step} at position {i}; "
                                  f"allowed: the steps 0, 1, 2, ... in order, each once. {_NOT_OURS}")
    manifest.steps = steps
    manifest.n_steps = len(steps)
    _check_consistency(manifest, path)
    return manifest


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
        missing = [r.step for r in manifest.steps if not r.has_params]
        if missing:
            problems.append(f"steps {missing[:5]} have has_params=false in a dense store (param_stride 1), "
                            f"where every step file holds theta")
    if problems:
        raise TrajectoryError(f"Trajectory manifest {str(path)!r} contradicts itself: {'; '.join(problems)}. "
                              f"{_NOT_OURS}")
