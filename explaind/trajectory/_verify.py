"""``Trajectory.verify()`` of a store: every file's checksum, also while a recorder still writes the store.

A recorder keeps the optimizer state after the latest steps in two slots, ``optimizer/state-0`` and
``state-1``, written in turn (docs/recording.md, "The store"). A reader that took the store's index
(manifest and journal) while the recorder runs can find the slot of the newest step it knows already
replaced by a step committed since: its bytes then differ from the recorded checksum although nothing
is corrupted; so can a reader that keeps the store across the recording's end or a later resume.
:func:`verify_store` tells the two apart: a slot that fails is checked again against a freshly read index
when that index continues the reader's (the same run, its steps and more: the slot is the newest state
again), and a slot that fails with no step committed since the index was read, or in a store replaced by
another run, is reported as corrupted.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..exceptions import TrajectoryError
from ._binding import check_state, check_step_file, run_binding
from ._index import read_manifest
from ._io import read_tensors
from ._steps import steps_where
from .lock import live_writer
from .manifest import FileRecord, StepRecord, TrajectoryManifest

__all__ = ["verify_store", "STATE_RETRIES"]

#: How often the newest optimizer state is checked against a freshly read index while a recorder writes.
STATE_RETRIES = 5


def verify_store(root: Path, manifest: TrajectoryManifest, sparse: bool) -> None:
    """Check the checksum of every start and step file of ``manifest``, then the newest optimizer states.

    Of the optimizer states, the newest is checked (the one a resume loads; older steps' states were
    overwritten by later ones, two slots in turn); a sparse store's checkpoint states are all checked,
    and the newest audit state.

    Raises
    ------
    TrajectoryError
        At the first file whose size or checksum differs (naming it and its step), or when a recorder
        replaced the newest optimizer state :data:`STATE_RETRIES` times while it was read (naming the
        recorder's process; every step file verified).
    """
    for record in (manifest.initial_file, manifest.constants_file, manifest.data_file, manifest.initial_state_file):
        if record is not None:
            read_tensors(root, record)
    run = run_binding(manifest)
    metas: dict[int, dict[str, str]] = {}  # the step files' metadata, of the steps that name a state file
    for record in manifest.steps:
        if record.file is not None:
            meta = read_tensors(root, record.file, step=record.step)[1]
            check_step_file(meta, record, run, f"{record.file.path!r} (step {record.step}) of the store {str(root)!r}")
            if record.optimizer_state is not None or record.audit_state is not None:
                metas[record.step] = meta
    for _ in range(STATE_RETRIES):
        try:
            _verify_states(root, manifest, sparse, metas)
            return
        except TrajectoryError:
            newer = _continued(root, manifest)
            if newer is None or _newest_states(newer) == _newest_states(manifest):
                raise  # no step committed since: the state itself differs from its record
            manifest = newer  # later steps were committed (also by a recording since ended): their slot is newest
    holder = live_writer(root) or {}
    raise TrajectoryError(
        f"The trajectory store {str(root)!r} is being written by process {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')!r}: its newest optimizer state was replaced {STATE_RETRIES} times while verify() "
        f"read it (the recorder writes two slots in turn). Every step file verified. Call verify() again once the "
        f"recording has ended."
    )


def _continued(root: Path, manifest: TrajectoryManifest) -> TrajectoryManifest | None:
    """The store's index as it is now when it continues ``manifest`` (the same run, its steps and more: steps
    committed since ``manifest`` was read, by a recorder still writing or one that has ended since, or by a
    resume), else ``None``. Read only after a state slot failed its check: the slots are rewritten in turn, so a
    reader that holds the store across later steps finds its slot holding a later step's state."""
    try:
        newer = read_manifest(root)
    except TrajectoryError:
        return None
    n = len(manifest.steps)
    if newer.run_id != manifest.run_id or len(newer.steps) <= n or newer.steps[:n] != manifest.steps:
        return None
    return newer


def _newest_states(manifest: TrajectoryManifest) -> tuple[object, object]:
    """The records of the newest optimizer state and audit state (those a slot holds)."""
    state, audit = _last_with(manifest, "optimizer_state"), _last_with(manifest, "audit_state")
    return (None if state is None else state.optimizer_state), (None if audit is None else audit.audit_state)


def _last_with(manifest: TrajectoryManifest, name: str) -> StepRecord | None:
    """The record of the last step whose file field ``name`` names a file (found in the step columns)."""
    held = steps_where(manifest.steps, name)
    return manifest.steps[held[-1]] if held else None


def _verify_states(root: Path, manifest: TrajectoryManifest, sparse: bool, metas: dict[int, dict[str, str]]) -> None:
    """The newest optimizer state (a sparse store's: every checkpoint state) and the newest audit state, each
    against its checksum and against the layout its step file binds (``metas``: step files' metadata read so far)."""
    held = steps_where(manifest.steps, "optimizer_state")  # from the columns
    for record in [manifest.steps[s] for s in (held if sparse else held[-1:])]:
        state = record.optimizer_state
        assert state is not None
        tensors, meta = read_tensors(root, state, step=record.step)
        _check_bound(root, record, state, tensors, meta, None if record.audit_state is None else False, metas)
    audit = _last_with(manifest, "audit_state")
    if audit is not None and audit.audit_state is not None:
        tensors = read_tensors(root, audit.audit_state, step=audit.step)[0]
        _check_bound(root, audit, audit.audit_state, tensors, None, True, metas)


def _check_bound(root: Path, record: StepRecord, state: FileRecord, tensors: dict[str, Tensor],
                 meta: dict[str, str] | None, audit: bool | None, metas: dict[int, dict[str, str]]) -> None:
    """:func:`~explaind.trajectory._binding.check_state` of a state file read after step ``record.step``."""
    if record.file is None:
        return
    if record.step not in metas:  # a step committed after verify() read the step files
        metas[record.step] = read_tensors(root, record.file, step=record.step)[1]
    check_state(metas[record.step], tensors, meta, f"{state.path!r} (step {record.step}) of the store {str(root)!r}",
                repr(record.file.path), audit=audit)
