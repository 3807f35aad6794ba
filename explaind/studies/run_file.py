"""The ``run.json`` of a run folder: written first, updated while training, validated when read.

A run folder (``RUN/run.json`` + ``RUN/trajectory/``) is written by ``explaind train``. The run
description is written *before* recording starts, with ``"status": "recording"``; it is
rewritten at every evaluation (the training curves so far) and once more at the end with
``"status": "complete"``. An interrupted run therefore always has its description, and
``explaind train --out RUN --resume`` continues it (docs/cli.md, "explaind train").

Reading validates every field the commands use and raises one
:class:`~explaind.exceptions.TrajectoryError` naming the missing or malformed field and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import atomic_write
from ..exceptions import ConfigError, TrajectoryError

__all__ = ["RUN_FILE", "TRAJECTORY_DIR", "RUN_FORMAT", "read_run_file", "write_run_file", "check_new_run_folder"]

RUN_FILE = "run.json"
TRAJECTORY_DIR = "trajectory"
RUN_FORMAT = "explaind-run"

#: field -> (JSON type, required); ``dataset`` also needs ``name`` (str) and ``params`` (object).
_FIELDS: dict[str, tuple[type, bool]] = {
    "config": (dict, True),
    "dataset": (dict, True),
    "model_config": (dict, True),
    "history": (dict, False),
    "info": (dict, False),
    "status": (str, False),
}
_STATUSES = ("recording", "complete")


def _damaged(run_file: Path, problem: str) -> TrajectoryError:
    return TrajectoryError(
        f"{str(run_file)!r} {problem}. The run folder is damaged: train it again with 'explaind train --out "
        f"{run_file.parent}' into a new folder (or restore run.json from a copy)."
    )


def read_run_file(path: str | Path) -> dict[str, Any]:
    """The validated ``run.json`` of the run folder ``path``.

    Returns
    -------
    dict
        The record; ``status`` is ``"complete"`` for folders written before the field existed.

    Raises
    ------
    TrajectoryError
        When ``run.json`` is missing (the message says whether a trajectory without it is there),
        unreadable, not an explaind run description, or lacks a field or has one of the wrong type.
    """
    path = Path(path)
    run_file = path / RUN_FILE
    if not run_file.is_file():
        if (path / TRAJECTORY_DIR).exists():
            raise TrajectoryError(
                f"{str(path)!r} holds a {TRAJECTORY_DIR}/ but no {RUN_FILE}: the recording was interrupted before "
                f"its run description was written (older versions of explaind wrote it last), so the commands "
                f"cannot tell what was trained. Open the trajectory directly with explaind.Trajectory.load('{path}/"
                f"{TRAJECTORY_DIR}', train_data=...), or delete the folder and run 'explaind train --out {path}' "
                f"again."
            )
        raise TrajectoryError(
            f"{str(path)!r} is not a run folder: {RUN_FILE} is missing. Create one with 'explaind train --out {path}'."
        )
    try:
        record = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(run_file, f"cannot be read ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise TrajectoryError(f"{str(run_file)!r} is not an explaind run description (format field missing).")
    for name, (kind, required) in _FIELDS.items():
        if name not in record:
            if required:
                raise _damaged(run_file, f"lacks the field {name!r}")
            continue
        if not isinstance(record[name], kind):
            raise _damaged(run_file, f"has {name!r} of type {type(record[name]).__name__}, not a JSON "
                                     f"{'object' if kind is dict else 'string'}")
    dataset = record["dataset"]
    for name, kind in (("name", str), ("params", dict)):
        if not isinstance(dataset.get(name), kind):
            what = "string" if kind is str else "object"
            raise _damaged(run_file, f"lacks the field 'dataset.{name}' (a JSON {what})")
    record.setdefault("status", "complete")
    if record["status"] not in _STATUSES:
        raise _damaged(run_file, f"has status {record['status']!r}; allowed: {', '.join(_STATUSES)}")
    return record


def write_run_file(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (with the ``format`` field) to ``path / run.json`` atomically."""
    return atomic_write(Path(path) / RUN_FILE, json.dumps({"format": RUN_FORMAT, **record}, indent=2))


def check_new_run_folder(path: Path) -> None:
    """Refuse a folder that already holds a run (or a trajectory without its description), with the fix."""
    if (path / RUN_FILE).exists():
        raise ConfigError(
            f"Run folder {str(path)!r} already holds a run. Choose a new --out folder, delete it, or continue an "
            f"interrupted run with --resume."
        )
    if (path / TRAJECTORY_DIR).exists():
        raise ConfigError(
            f"Run folder {str(path)!r} holds a {TRAJECTORY_DIR}/ without {RUN_FILE} (a recording interrupted before "
            f"its run description was written); it cannot be resumed. Delete the folder or choose a new --out folder."
        )
