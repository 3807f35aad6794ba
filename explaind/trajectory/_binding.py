"""What a step file binds besides its record: the run it belongs to and the optimizer state written with it.

The checksum of every file of a store sits in the store's index (``manifest.json``, ``journal.jsonl``),
which nothing keys: a file replaced together with its checksum (another run's step, a start file of
another run, an optimizer state renamed, dropped or cast) would pass the checksum alone. Since schema 3
(docs/recording.md, "Strangers' files, round 7") the step file, whose own checksum its journal record holds,
carries in its checksummed metadata

* ``"run"``: the run's identity (:attr:`~explaind.trajectory.manifest.TrajectoryManifest.run_id`, drawn when
  the store is created), the checksums of its start files (``initial``, ``constants``, ``data``,
  ``initial_state``) and of the manifest's description of what was trained (:data:`RUN_FIELDS`: parameter and
  constant specs, dtype, adapter, loss, ...), compared with the manifest whenever the step file is read
  (:func:`check_run`);
* ``"state"``, on every step after which the optimizer state is kept: the name, dtype and shape of every
  tensor of that state (with the recorder audit's momentum) and the checksum of its JSON description (its
  ``"optimizer"`` metadata: hyperparameters, step counts). Of the steps committed together only the newest
  state is written, and the record of its step names the file; the entry is on the others too, so a step file's
  bytes do not depend on how the writer grouped the steps. The state file (in a sparse store the checkpoint
  state and the audit state) is compared with it when it is read for a resume, a replay or ``verify()``
  (:func:`check_state`).

A store written before schema 3 has neither entry and is read as before: its state files are checked
only against their checksums. A step file of a schema-3 store carries ``"run"`` exactly when the manifest has
a ``run_id``, and ``"state"`` whenever its record names a state file, so neither can be stripped without
changing the step file (whose checksum its record holds).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from torch import Tensor

from ..exceptions import TrajectoryError
from ._checksum import checksum
from .manifest import StepRecord, TrajectoryManifest, dtype_name

__all__ = ["new_run_id", "run_binding", "record_binding", "check_step_file", "check_run", "state_binding",
           "check_state", "unbound_state", "bound_state_names", "AUDIT_PREFIX", "RUN_FIELDS"]

#: tensors of a state file that hold the recorder's audit momentum (a sparse store keeps them in a file of their own)
AUDIT_PREFIX = "audit."
_FIX = ("Restore the store from a copy, or re-record the run (TrajectoryRecorder(..., overwrite=True)); a store "
        "is not assembled from the files of several runs.")


def new_run_id() -> str:
    """A fresh run identity: 32 random hex digits (``uuid4``)."""
    return uuid.uuid4().hex


#: the manifest's fields that describe what was trained; fixed when the store is created (or resumed) and bound
#: into every step file (the hyperparameters, kept for information, the creation time and ``extras`` are not).
#: The step files of schema-3 stores hold the checksum of these fields as written then: a change of the set (or of
#: a field's JSON) needs a new schema version, else those stores are refused as edited.
RUN_FIELDS = frozenset({"dtype", "params", "constants", "adapter", "optimizer_class", "loss", "architecture",
                        "param_stride", "n_train", "train_fingerprint", "random_capture", "buffer_names"})


def run_binding(manifest: TrajectoryManifest) -> str | None:
    """The ``"run"`` entry of a step file of ``manifest``'s run (JSON): its identity, the checksums of its start
    files and of the manifest's description of the run (:data:`RUN_FIELDS`).

    ``None`` for a store without an identity (written before schema 3, also once resumed).
    """
    if manifest.run_id is None:
        return None
    files = {"initial": manifest.initial_file, "constants": manifest.constants_file, "data": manifest.data_file,
             "initial_state": manifest.initial_state_file}
    start = {k: (None if r is None else r.checksum or f"sha256:{r.sha256}") for k, r in files.items()}
    described = checksum(manifest.model_dump_json(include=set(RUN_FIELDS)).encode())
    return json.dumps({"id": manifest.run_id, "start": start, "manifest": described}, sort_keys=True,
                      separators=(",", ":"))


def record_binding(record: StepRecord) -> str:
    """The fields of a step record that change results, as stored inside the step's (checksummed) file."""
    exclude = {"file", "optimizer_state", "audit_state"} | ({"buffers"} if record.buffers is None else set())
    return record.model_dump_json(exclude=exclude)  # a field added later is left out while unset


def check_step_file(meta: dict[str, str], record: StepRecord, expected_run: str | None, where: str) -> None:
    """The step file read as ``where`` (its metadata ``meta``) is the one of ``record``: it holds that step, the
    record that the manifest or journal gives for it (gradient scale, samples, ...) and belongs to the run whose
    :func:`run_binding` is ``expected_run``. Every read of a step file and ``verify()`` check this.

    Raises
    ------
    TrajectoryError
        Naming the file, what it holds and what the index says.
    """
    s = record.step
    if meta.get("step") != str(s):
        raise TrajectoryError(f"Trajectory file {where} holds step {meta.get('step')!r}, not step {s}: the manifest "
                              f"points at another step's file. The store was modified; re-record it.")
    if "record" in meta and meta["record"] != record_binding(record):
        raise TrajectoryError(f"The record of step {s} in the manifest or journal (gradient scale, loss scale, "
                              f"samples, ...) differs from the one checksummed in {where}: the store was "
                              f"modified{_record_difference(meta['record'], record_binding(record))}. Fix: restore "
                              f"manifest.json and journal.jsonl from the original store, or re-record the run.")
    check_run(meta, expected_run, where)


def _record_difference(held: str, index: str) -> str:
    """``" (field: ... in the step file, ... in the index)"`` for the fields of two record bindings that differ."""
    try:
        mine, theirs = json.loads(held), json.loads(index)
        fields = [k for k in theirs if mine.get(k) != theirs[k]][:3]
    except (ValueError, AttributeError, RecursionError):
        return ""
    if not fields:
        return ""
    shown = "; ".join(f"{k}: {mine.get(k)!r} in the step file, {theirs[k]!r} in the index" for k in fields)
    return (f" ({shown}; a tool that re-wrote the JSON printing numbers with fewer digits, or an edit, changes "
            f"values so)")


def _unreadable_entry(key: str, where: str, problem: str) -> TrajectoryError:
    return TrajectoryError(f"Trajectory file {where} holds a {key!r} entry that explaind did not write: {problem} "
                           f"(allowed: the JSON object explaind writes there). The file was forged with a matching "
                           f"checksum, or the store is corrupted. {_FIX}")


def _entry(held: str, key: str, where: str, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """The JSON object of the step file's metadata entry ``key`` (its text ``held``), with ``fields`` of their types.

    Raises
    ------
    TrajectoryError
        When it is not JSON (also nested deeper than the parser goes), not an object, or lacks a field.
    """
    try:
        value = json.loads(held)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise _unreadable_entry(key, where, f"it is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise _unreadable_entry(key, where, f"it is a JSON {type(value).__name__}, not an object")
    wrong = [k for k, kind in fields.items() if not isinstance(value.get(k), kind)]
    if wrong:
        raise _unreadable_entry(key, where, f"its fields {wrong} are missing or of another type")
    return value


def check_run(meta: dict[str, str], expected: str | None, where: str) -> None:
    """The step file read as ``where`` (its metadata ``meta``) belongs to the run whose :func:`run_binding` is
    ``expected``: the same identity, start files and description of the run.

    Raises
    ------
    TrajectoryError
        Naming the file, what it records and what the manifest says.
    """
    held = meta.get("run")
    if held == expected:
        return
    if expected is None or held is None:
        says = "no run identity" if held is None else "a run identity"
        other = "names no run identity" if expected is None else f"names the run {json.loads(expected)['id']!r}"
        raise TrajectoryError(f"Trajectory file {where} records {says}, but the manifest {other}: the step file "
                              f"or the manifest was replaced. {_FIX}")
    theirs, ours = _entry(held, "run", where, {"id": str, "start": dict}), json.loads(expected)
    if theirs.get("id") != ours["id"]:
        raise TrajectoryError(f"Trajectory file {where} belongs to the run {theirs.get('id')!r}, but the store is "
                              f"the run {ours['id']!r} (its manifest's run_id): a step file of another run was put "
                              f"in its place. {_FIX}")
    differ = sorted(k for k in ours["start"] if theirs.get("start", {}).get(k) != ours["start"][k])
    if differ:
        raise TrajectoryError(f"Trajectory file {where} was recorded from start files other than those the manifest "
                              f"names ({', '.join(f'{k}_file' for k in differ)}: the step records "
                              f"{[theirs.get('start', {}).get(k) for k in differ]}, the manifest "
                              f"{[ours['start'][k] for k in differ]}): a start file was replaced. {_FIX}")
    raise TrajectoryError(f"Trajectory file {where} was recorded with another description of the run than the "
                          f"manifest's (its fields {sorted(RUN_FIELDS)}: the step records the checksum "
                          f"{theirs.get('manifest')}, the manifest has {ours['manifest']}): manifest.json was edited. "
                          f"{_FIX}")


def _layout(tensors: dict[str, Tensor]) -> dict[str, list[Any]]:
    return {k: [dtype_name(t.dtype), list(t.shape)] for k, t in sorted(tensors.items())}


def state_binding(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """The ``"state"`` entry of the step file written with an optimizer state: its tensors' names, dtypes and
    shapes, and the checksum of its description (``metadata["optimizer"]``; ``None`` without one)."""
    description = metadata.get("optimizer")
    digest = None if description is None else checksum(description.encode())
    return json.dumps({"tensors": _layout(tensors), "description": digest}, separators=(",", ":"))


def check_state(step_meta: dict[str, str], tensors: dict[str, Tensor], metadata: dict[str, str] | None,
                where: str, step_file: str, *, audit: bool | None = None) -> bool:
    """An optimizer state read from ``where`` is the one the step file ``step_file`` (metadata ``step_meta``) bound.

    ``tensors``: what was read; ``audit``: ``False`` for a sparse store's checkpoint file (no audit tensors),
    ``True`` for its audit file (only those), ``None`` for a dense store's state file (both); ``metadata``: the
    file's metadata, whose description is compared (``None``: an audit file, which has none). A step file without
    the entry (a store written before schema 3) binds nothing: ``False`` is returned (``True`` once checked).

    Raises
    ------
    TrajectoryError
        Naming the file, the first entry that differs, what the step file records for it and the fix.
    """
    held = step_meta.get("state")
    if held is None:
        return False
    bound = _entry(held, "state", f"{step_file} (the step file that bound {where})",
                   {"tensors": dict, "description": (str, type(None))})
    expected: dict[str, list[Any]] = bound["tensors"]
    if not all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], list)
               for v in expected.values()):
        raise _unreadable_entry("state", f"{step_file} (the step file that bound {where})",
                                "its tensors are not [dtype, shape] pairs")
    if audit is not None:
        expected = {k: v for k, v in expected.items() if k.startswith(AUDIT_PREFIX) == audit}
    got = _layout(tensors)
    names = sorted(set(expected) | set(got))
    problems = []
    for name in names:
        if name not in got:
            problems.append(f"{name!r} is missing; the step records {_spec(expected[name])}")
        elif name not in expected:
            problems.append(f"{name!r} ({_spec(got[name])}) is not among the tensors the step records")
        elif got[name] != expected[name]:
            problems.append(f"{name!r} is {_spec(got[name])}; the step records {_spec(expected[name])}")
    if metadata is not None and not problems:
        description = metadata.get("optimizer")
        digest = None if description is None else checksum(description.encode())
        if digest != bound["description"]:
            problems.append(f"its description (the 'optimizer' metadata: hyperparameters, step counts) has the "
                            f"checksum {digest}, the step records {bound['description']}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise TrajectoryError(f"Trajectory file {where} is not the optimizer state recorded with {step_file}: "
                              f"{'; '.join(problems[:3])}{more}. It was modified after the step was recorded (its "
                              f"checksum in the journal or manifest rewritten to match). {_FIX}")
    return True


def unbound_state(where: str, step_file: str, n: int) -> str:
    """The refusal of ``restore()`` to load the optimizer state ``where`` that its step file ``step_file`` does not
    bind (written before schema 3; docs/recording.md, "Strangers' files, round 8"), resuming at step ``n``."""
    return (f"restore() refuses the optimizer state {where}: its step file {step_file} does not bind it (the store "
            f"was written before schema 3), so a state file replaced together with its checksum in the store's "
            f"index (another optimizer's state, an entry renamed, dropped or cast) cannot be told from the one "
            f"recorded, and restore() would load it into the optimizer. Allowed: a state its step file binds, or "
            f"one you vouch for. Fix: if the store was not modified since it was recorded, call "
            f"rec.restore(accept_unbound_state=True) (the steps recorded from then on bind their state); or load "
            f"the model and optimizer from your own checkpoint of step {n} and enter `with rec:` without restore() "
            f"(the optimizer's state is then compared with the file bit for bit); or re-record the run.")


def _spec(value: list[Any]) -> str:
    return f"{value[0]} of shape {value[1]}"


def bound_state_names(held: str) -> list[str]:
    """The tensor names of a step file's ``state`` entry (none where it does not parse: :func:`check_state` names
    that problem when the state is checked)."""
    try:
        tensors = json.loads(held).get("tensors")
    except (ValueError, RecursionError, AttributeError):
        return []
    return [str(name) for name in tensors] if isinstance(tensors, dict) else []
