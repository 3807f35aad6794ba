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
from ..trajectory._index import strict_json
from ..trajectory.store import is_store

__all__ = ["RUN_FILE", "TRAJECTORY_DIR", "RUN_FORMAT", "read_run_file", "write_run_file", "check_new_run_folder",
           "clear_run_folder"]

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
        raise TrajectoryError(_not_a_run(path))
    try:  # a key given twice is refused, not read as its last value; NaN losses of a diverged run are kept
        record = strict_json(run_file.read_bytes(), finite=False)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
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
    """Refuse a folder that already holds a run (or a trajectory without its description), with the fix.

    An interrupted run (``"status": "recording"``) is named as such, with the ``--resume`` command
    that continues it; a trajectory store recorded in Python (``TrajectoryRecorder(store=...)``) is
    never written into.
    """
    if (path / RUN_FILE).is_file():
        status = _status(path)
        if status == "recording":
            raise ConfigError(
                f"Run folder {str(path)!r} holds an interrupted run. Continue it with 'explaind train --out {path} "
                f"--resume', or choose a new --out folder (or delete this one) to train from the start."
            )
        raise ConfigError(
            f"Run folder {str(path)!r} already holds a run{'' if status is None else f' ({status})'}. Choose a new "
            f"--out folder or delete it; --resume continues only an interrupted run."
        )
    if is_store(path):
        raise ConfigError(
            f"{str(path)!r} is a trajectory store recorded in Python (TrajectoryRecorder(store=...)); "
            f"'explaind train' does not write into it. Choose a new --out folder."
        )
    if (path / TRAJECTORY_DIR).exists():
        raise ConfigError(
            f"Run folder {str(path)!r} holds a {TRAJECTORY_DIR}/ without {RUN_FILE} (a recording interrupted before "
            f"its run description was written); it cannot be resumed. Delete the folder or choose a new --out folder."
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a file, not a folder. Choose a new --out folder.")


def clear_run_folder(path: Path) -> bool:
    """Delete the run a study or the demo wrote to its own ``path`` before, so that it runs again there.

    Only a folder holding a run (``run.json`` or ``trajectory/``) is deleted; returns whether one was.
    """
    import shutil

    if (path / RUN_FILE).exists() or (path / TRAJECTORY_DIR).exists():
        shutil.rmtree(path)
        return True
    return False


def _status(path: Path) -> str | None:
    """The ``status`` of a readable ``run.json`` (``None`` when it cannot be read)."""
    try:
        record = strict_json((path / RUN_FILE).read_bytes(), finite=False)
    except (OSError, ValueError, RecursionError):
        return None
    status = record.get("status", "complete") if isinstance(record, dict) else None
    return status if status in _STATUSES else None


def _not_a_run(path: Path) -> str:
    """Why ``path`` is not a run folder, and the fix: what a new user most likely passed instead."""
    train = f"'explaind train --out {path} ...'"
    if not path.exists():
        return (f"Run folder {str(path)!r} does not exist. Give the folder that 'explaind train --out RUN' wrote "
                f"(it holds {RUN_FILE}), or record one with {train}.")
    if not path.is_dir():
        return f"{str(path)!r} is a file, not a run folder. Give the folder that 'explaind train --out RUN' wrote."
    if (path / TRAJECTORY_DIR).exists():
        return (f"{str(path)!r} holds a {TRAJECTORY_DIR}/ but no {RUN_FILE}: the recording was interrupted before "
                f"its run description was written (older versions of explaind wrote it last), so the commands "
                f"cannot tell what was trained. Open the trajectory directly with explaind.Trajectory.load('{path}/"
                f"{TRAJECTORY_DIR}', train_data=...), or delete the folder and run {train} again.")
    if is_store(path):
        parent = path.parent
        if path.name == TRAJECTORY_DIR and (parent / RUN_FILE).is_file():
            return (f"{str(path)!r} is the trajectory inside the run folder {str(parent)!r}: give the run folder "
                    f"itself (e.g. 'explaind replicate {parent}').")
        return (f"{str(path)!r} is a trajectory store recorded in Python (TrajectoryRecorder(store=...)), not a run "
                f"folder: the commands read the dataset and the model from a run folder's {RUN_FILE}, which a store "
                f"does not have. Explain it in Python with explaind.Trajectory.load('{path}') and "
                f"explaind.KernelReplica / explaind.InfluenceEstimator (docs/quickstart.md), or record a run "
                f"folder with {train}.")
    return f"{str(path)!r} is not a run folder: {RUN_FILE} is missing. Create one with {train}."
