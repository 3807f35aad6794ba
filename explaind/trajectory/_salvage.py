"""Salvaging a damaged store: copy every step that can be proven intact into a new store (docs/recording.md,
"Salvaging a damaged store").

The damaged store is only read (no lock is taken, no temporary file removed). A step ``s`` is kept when it is
proven in one of these ways, tried in turn:

* ``"checksum"``: a record of it in the manifest or a journal line that parses (strictly, as a normal read parses
  it) names a step file whose size and checksum match, and the file holds that step, that record and this run
  (:func:`~explaind.trajectory._binding.check_step_file`): what a normal read proves;
* ``"bound"``: without such a record (its journal line lost or corrupted), the step file itself holds step ``s``,
  its record (the checksummed ``record`` entry, parsed strictly and written back byte for byte), the run's
  identity, start files and description (``run``, which needs a store of schema 3), a coefficient table and
  parameters of the run's shapes, dtypes and finite values. Not proven: the tensors' bytes (its checksum was kept
  only in the lost line) and that it continues the step before it;
* ``"replayed"``: a store written before schema 3 binds no run, so such a step is checked as ``"bound"`` without
  the run and then kept only with ``replay=True``, when replaying its recorded update from the step before gives
  theta_{s+1} to the recorder's tolerance (:mod:`~explaind.trajectory._salvage_replay`; not bit for bit).

The trajectory is a prefix, so salvage stops at the first step proven in none of these ways and drops every later
step, naming why. An optimizer state is kept with a step when its file matches its checksum (a ``"checksum"``
step's record) or is the slot written after that step (its ``n_steps``) and matches the layout and description its
step file binds; a resume continues from the newest step kept with a state. A sparse store's step proven by its
binding keeps the checkpoint state and the audit's momentum its step file binds (:meth:`_Salvage._bound_states`);
its segment is checked again whenever it is read (replayed and compared with the theta stored at its end).
"""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from ..exceptions import TrajectoryError
from ._binding import AUDIT_PREFIX, bound_state_names, check_state, check_step_file, record_binding, run_binding
from ._checksum import checksum
from ._index import (
    MAX_INDEX_BYTES,
    _canonical_manifest,
    _check_consistency,
    _journal_record,
    _newer_writer,
    _parse_manifest,
    read_manifest,
)
from ._io import check_specs, decode_safetensors, read_confined, read_verified_bytes, store_root, write_bytes
from ._layout import (
    ATTRIBUTES,
    JOURNAL,
    MANIFEST,
    SETUP,
    STEP_FILE,
    checkpoint_state_path,
    mark_setup,
    remove_store,
    setup_leftover,
    step_path,
)
from ._lean_index import INDEX_TOO_LARGE, max_index_bytes
from ._salvage_replay import ReplayInputs, replay_inputs, replay_steps, unreplayable
from ._salvage_report import SalvageReport, log_unvouched, out_failure
from ._tool_marks import utf8_text
from .lock import LOCK, live_writer
from .manifest import FileRecord, StepRecord, TrajectoryManifest
from .store import check_updates

__all__ = ["SalvageReport", "salvage_store"]

logger = logging.getLogger(__name__)

_SLOTS = ("optimizer/state-0.safetensors", "optimizer/state-1.safetensors")


def _read_manifest(root: Path) -> TrajectoryManifest:
    """The damaged store's manifest, parsed as a normal read parses it (without the journal)."""
    try:
        data = read_confined(root, MANIFEST, max_index_bytes(), "Trajectory manifest", INDEX_TOO_LARGE)
    except FileNotFoundError:
        raise TrajectoryError(f"Cannot salvage {str(root)!r}: it has no {MANIFEST}, which holds the description of "
                              f"the run that every step file is checked against, so no step can be proven. Restore "
                              f"{MANIFEST} from a copy, or re-record the run.") from None
    manifest = _canonical_manifest(data) or _parse_manifest(data, root / MANIFEST)
    _check_consistency(manifest, root / MANIFEST)
    newer = _newer_writer(manifest.explaind_version)
    if newer is not None:  # its records may hold fields this explaind does not know: none would be proven
        raise TrajectoryError(f"Cannot salvage {str(root)!r} with this explaind: {newer} Nothing was written.")
    return manifest


def _journal(root: Path, report: SalvageReport) -> dict[int, list[StepRecord]]:
    """The records of the journal's lines that parse, by step; the others go to ``report.unreadable_lines``."""
    try:
        data = read_confined(root, JOURNAL, max_index_bytes(), "Trajectory journal", INDEX_TOO_LARGE)
    except FileNotFoundError:
        return {}
    except TrajectoryError as exc:  # not a regular file, too large, no permission: the step files may still hold
        report.unreadable_lines.append((0, str(exc)))
        return {}
    try:  # an editor's UTF-16 save of the same text (_tool_marks.py)
        data = utf8_text(data, "journal.jsonl")
    except ValueError as exc:
        report.unreadable_lines.append((0, str(exc)))
        return {}
    out: dict[int, list[StepRecord]] = {}
    for i, line in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n")):
        if not line.strip(b" \t\r\x00"):
            continue
        try:
            record = _journal_record(line)
        except (ValueError, RecursionError) as exc:  # a ValidationError too
            report.unreadable_lines.append((i + 1, str(exc).splitlines()[0][:200]))
            continue
        out.setdefault(record.step, []).append(record)
    return out


class _Salvage:
    """One salvage: the damaged store read, the new one written."""

    def __init__(self, root: Path, out: Path, replay: ReplayInputs | None = None):
        self.root, self.out = root, out
        self.report = SalvageReport(source=root, out=out)
        self.manifest = _read_manifest(root)
        self.replay = replay  # None: no step is proven by replaying its update (_salvage_replay.py)
        self.replay_refused = "" if replay is None else unreplayable(self.manifest)
        self.sparse = self.report.sparse = self.manifest.param_stride != 1
        self.run = run_binding(self.manifest)
        self.candidates = _journal(root, self.report)
        for record in self.manifest.steps:
            self.candidates.setdefault(record.step, []).insert(0, record)
        self.start = self._start_files()
        self.slots = self._slots()
        self.files: dict[str, FileRecord] = {}  # the files proven, copied into the new store (read again, checked)
        self.metas: dict[int, dict[str, str]] = {}  # the metadata of the step files proven

    def _start_files(self) -> dict[str, FileRecord]:
        """Every start file, checked against its checksum (nothing can be proven without them)."""
        m = self.manifest
        out = {}
        for key, record in (("initial", m.initial_file), ("constants", m.constants_file), ("data", m.data_file),
                            ("initial_state", m.initial_state_file)):
            if record is None:
                continue
            try:
                read_verified_bytes(self.root, record)
            except TrajectoryError as exc:
                raise TrajectoryError(f"Cannot salvage {str(self.root)!r}: its start file {record.path!r} "
                                      f"({key}_file) fails: {exc} Every step starts from it, so no step can be "
                                      f"proven. Restore the file from a copy, or re-record the run.") from None
            out[record.path] = record
        return out

    def _slots(self) -> dict[str, tuple[bytes, dict[str, Tensor], dict[str, str]]]:
        """The optimizer state slots that can be read and decoded (each is checked against a step later)."""
        out = {}
        for relpath in _SLOTS:
            try:
                data = read_confined(self.root, relpath, self._step_limit(), "Trajectory optimizer state")
                tensors, meta = decode_safetensors(data)
            except Exception:  # missing, damaged or not a file: not used
                continue
            out[relpath] = (data, tensors, meta)
        return out

    def _by_checksum(self, s: int) -> tuple[StepRecord | None, str]:
        """Step ``s`` proven by a record of the index whose file matches its checksum; else ``None`` and why."""
        why = ""
        for record in self.candidates.get(s, []):
            if record.file is None:
                why = "its record names no step file"
                continue
            where = f"{record.file.path!r} (step {s}) of the store {str(self.root)!r}"
            try:
                data = read_verified_bytes(self.root, record.file, step=s)
                tensors, meta = decode_safetensors(data)
                check_step_file(meta, record, self.run, where)
                self._check_tensors(tensors, where, record)
            except Exception as exc:  # safetensors' own errors too: reported, the next way is tried
                why = f"{type(exc).__name__}: {exc}"
                continue
            self.files[record.file.path], self.metas[s] = record.file, meta
            return record, ""
        return None, why

    def _by_binding(self, s: int) -> tuple[StepRecord | None, str]:
        """Step ``s`` proven by its step file's own record and binding (no checksum); else ``None`` and why."""
        relpath = step_path(s)
        where = f"{relpath!r} (step {s}) of the store {str(self.root)!r}"
        if self.run is None and (self.replay is None or self.replay_refused):
            return None, (f"its file cannot be proven without its journal record: the store was written before "
                          f"schema 3, so {relpath} does not bind the run, and " + (
                              f"it cannot be replayed: {self.replay_refused}" if self.replay_refused else
                              "it was not replayed (Trajectory.salvage(..., replay=True) proves such steps by "
                              "replaying their recorded updates from the model, the training data and the loss)"))
        try:
            data = read_confined(self.root, relpath, self._step_limit(), "Trajectory file")
        except FileNotFoundError:
            return None, f"{relpath} does not exist"
        except TrajectoryError as exc:
            return None, str(exc)
        try:
            tensors, meta = decode_safetensors(data)
        except Exception as exc:  # safetensors' own error types: reported
            return None, (f"{relpath} ({len(data)} bytes) is not a safetensors file explaind can read (truncated?): "
                          f"{exc}")
        held = meta.get("record")
        try:
            if held is None:
                raise ValueError("it holds no 'record' entry")
            record = _journal_record(held.encode())
            if record.step != s or record_binding(record) != held:
                raise ValueError("its 'record' entry is not the record explaind writes for this step")
            if not record.has_params and not self.sparse:
                raise ValueError("its record says it holds no theta, which every step file of a dense store holds")
            check_step_file(meta, record, self.run, where)  # the step, its record, the run (identity, start files)
            self._check_tensors(tensors, where, record)
        except (TrajectoryError, ValueError, RecursionError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        file = FileRecord(path=relpath, nbytes=len(data), checksum=checksum(data))
        self.files[relpath], self.metas[s] = file, meta
        return record.model_copy(update={"file": file}), ""

    def _bound_states(self, record: StepRecord) -> tuple[StepRecord, str]:
        """A sparse step proven by its binding, with the states its step file binds (its ``state`` entry): the
        checkpoint state ``optimizer/checkpoint-<s>.safetensors`` and the audit's momentum, in the slot written after
        the step (its ``n_steps``). Their checksums were kept only in the lost record, so each is taken by its bytes
        as they are and checked against the binding by :meth:`_checkpoint`; ``why`` names a state the step file
        binds that is missing (the steps replayed from it are then dropped)."""
        held = self.metas[record.step].get("state")
        if held is None:
            return record, ""
        names = bound_state_names(held)
        if not names:
            return record, (f"its step file binds an optimizer state, but its 'state' entry names no tensor "
                            f"explaind can read ({held[:80]!r}), and the record that named the state was lost")
        update: dict[str, FileRecord] = {}
        if any(not n.startswith(AUDIT_PREFIX) for n in names):
            relpath = checkpoint_state_path(record.step)
            try:
                data = read_confined(self.root, relpath, self._step_limit(), "Trajectory optimizer state")
            except (FileNotFoundError, TrajectoryError) as exc:
                return record, (f"the checkpoint state after step {record.step} that it is replayed from, {relpath}, "
                                f"cannot be read ({exc}), and the step's journal record that named it was lost")
            update["optimizer_state"] = FileRecord(path=relpath, nbytes=len(data), checksum=checksum(data))
        if any(n.startswith(AUDIT_PREFIX) for n in names):
            for path, (data, _tensors, state_meta) in self.slots.items():
                if state_meta.get("n_steps") == str(record.step + 1) and "optimizer" not in state_meta:
                    update["audit_state"] = FileRecord(path=path, nbytes=len(data), checksum=checksum(data))
        return record.model_copy(update=update), ""

    def _step_limit(self) -> int:
        """The most bytes a step file is read: 16 times the start files (theta and its coefficients) plus 64 MiB."""
        return 16 * sum(r.nbytes for r in self.start.values()) + (1 << 26)

    def _check_tensors(self, tensors: dict[str, Tensor], where: str, record: StepRecord) -> None:
        if record.has_params:
            check_specs(tensors, "param.", self.manifest.params, where)
        check_updates(self.manifest.params, tensors, where, dense=not self.sparse)

    def _checkpoint(self, record: StepRecord) -> tuple[StepRecord, str]:
        """A sparse store's checkpoint step with its states checked: the checkpoint state (which the segment after
        it is replayed from) against its checksum and its step file's binding, else ``why`` names the failure; the
        audit state likewise, dropped when it fails (a later checkpoint took its slot)."""
        meta, relpath = self.metas[record.step], step_path(record.step)
        why = ""
        split = any(n.startswith(AUDIT_PREFIX) for n in bound_state_names(meta.get("state", "")))
        for key, audit in (("optimizer_state", False if split else None),
                           ("audit_state", True)):
            state: FileRecord | None = getattr(record, key)
            if state is None:
                continue
            try:
                tensors, state_meta = decode_safetensors(read_verified_bytes(self.root, state, step=record.step))
                check_state(meta, tensors, None if audit else state_meta, state.path, relpath, audit=audit)
            except Exception as exc:  # safetensors' own errors too
                record = record.model_copy(update={key: None})
                why = why or (f"the checkpoint state after step {record.step} that it is replayed from fails: "
                              f"{type(exc).__name__}: {exc}" if key == "optimizer_state" else "")
                continue
            self.files[state.path] = state
            if key == "optimizer_state":
                self.report.states.append((record.step, "checksum"))
        return record, why

    def _state(self, record: StepRecord, how: str) -> StepRecord:
        """``record`` with the optimizer state written after it, where that state is proven; else with none."""
        relpath = step_path(record.step)
        meta = self.metas[record.step]
        if how == "checksum" and record.optimizer_state is not None:
            try:
                data = read_verified_bytes(self.root, record.optimizer_state, step=record.step)
                tensors, state_meta = decode_safetensors(data)
                check_state(meta, tensors, state_meta, record.optimizer_state.path, relpath)
            except Exception:  # a later step's state took the slot, or it was damaged: not kept
                pass
            else:
                self.files[record.optimizer_state.path] = record.optimizer_state
                self.report.states.append((record.step, "checksum"))
                return record
        if "state" in meta:
            for path, (data, tensors, state_meta) in self.slots.items():
                if state_meta.get("n_steps") != str(record.step + 1):
                    continue
                try:
                    check_state(meta, tensors, state_meta, path, relpath)
                except TrajectoryError:
                    continue
                state = FileRecord(path=path, nbytes=len(data), checksum=checksum(data))
                self.files[path] = state
                self.report.states.append((record.step, "bound"))
                return record.model_copy(update={"optimizer_state": state})
        return record.model_copy(update={"optimizer_state": None})

    # ----------------------------------------------------------------- the whole store
    def run_salvage(self) -> SalvageReport:
        kept: list[StepRecord] = []
        listed = set(self.candidates) | set(_step_files(self.root))
        s, stop = 0, ""
        while s in listed:
            record, why = self._by_checksum(s)
            how = "checksum"
            if record is None and not self.candidates.get(s):  # no record of it parses: its file alone
                record, why2 = self._by_binding(s)
                how, why = "bound", f"no record of it in the manifest or the journal parses, and {why2}"
                if self.run is None:  # a store before schema 3: its file binds no run, its update is replayed
                    how = "replayed"
            if record is None:
                stop = why
                break
            why = ""
            if self.sparse and how == "bound":
                record, why = self._bound_states(record)
            if not why and self.sparse and (record.optimizer_state is not None or record.audit_state is not None):
                record, why = self._checkpoint(record)
            kept.append(record)
            self.report.kept.append((s, how))
            s += 1
            if why:
                stop = why
                break
        if not kept and listed:
            raise TrajectoryError(f"Cannot salvage {str(self.root)!r}: not even step 0 can be proven intact ({stop}). "
                                  f"Nothing was written. Restore the store from a copy, or re-record the run.")
        for t in sorted(x for x in listed if x >= s):
            self.report.dropped.append((t, stop if t == s else _follows(s, t)))
        self._write(self._final(kept))
        pending = [t for t, how in self.report.kept if how == "replayed"]
        if pending:
            assert self.replay is not None  # _by_binding proves no step of a store before schema 3 without it
            proof = replay_steps(self.out, pending, self.replay)
            self.report.replay_tolerance = proof.tolerance
            self.report.replayed = [(t, r) for t, r in proof.residuals.items() if t != proof.failed]
            if proof.failed == 0:  # nothing proven: the new store is removed again, as if never written
                remove_store(self.out, None)
                (self.out / SETUP).unlink()
                raise TrajectoryError(f"Cannot salvage {str(self.root)!r}: not even step 0 can be proven intact "
                                      f"({proof.why}). Nothing was written. Restore the store from a copy, or "
                                      f"re-record the run.")
            if proof.failed is not None:
                self._cut(kept, proof.failed, proof.why)
        return self.report

    def _final(self, kept: list[StepRecord]) -> list[StepRecord]:
        """The records of the new store: each with the optimizer state proven after it (:meth:`_state`)."""
        how_of = dict(self.report.kept)
        final = kept if self.sparse else [self._state(r, how_of[r.step]) if r.step == len(kept) - 1 or
                                          r.optimizer_state is not None else r for r in kept]
        self.report.resume_at = next((r.step + 1 for r in reversed(final) if r.optimizer_state is not None), 0)
        return final

    def _cut(self, kept: list[StepRecord], failed: int, why: str) -> None:
        """Drop step ``failed`` (its replay failed, ``why``) and every later step from the new store, written with
        them: marked as being set up and its manifest removed first (a salvage interrupted here leaves what an
        interrupted salvage leaves), their files removed, the index written again for the steps before."""
        later = [(t, why if t == failed else _follows(failed, t)) for t in range(failed, len(kept))]
        self.report.dropped = later + self.report.dropped
        self.report.kept = self.report.kept[:failed]
        self.report.states = []
        mark_setup(self.out)
        (self.out / MANIFEST).unlink()
        for record in kept[failed:]:
            for file in (record.file, record.optimizer_state):
                if file is not None and self.files.pop(file.path, None) is not None:
                    (self.out / file.path).unlink(missing_ok=True)
        (self.out / ATTRIBUTES).unlink(missing_ok=True)  # it describes the last step, now dropped
        self._write(self._final(kept[:failed]))

    def _attributes(self) -> dict[str, FileRecord]:
        """``attributes.json`` (the model's plain attributes at the last step) when every step was kept; its reader
        checks it (docs/recording.md, "Strangers' files, round 8"). Otherwise it describes a step the new store does
        not hold, and is left out: loading the new store with a model then compares no attributes."""
        if self.report.dropped:
            return {}
        try:
            data = read_confined(self.root, ATTRIBUTES, MAX_INDEX_BYTES, "Trajectory attributes")
        except (FileNotFoundError, TrajectoryError):
            return {}
        return {ATTRIBUTES: FileRecord(path=ATTRIBUTES, nbytes=len(data), checksum=checksum(data))}

    def _write(self, steps: list[StepRecord]) -> None:
        """The new store: set-up marker, files, journal, manifest (its commit point), marker removed."""
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        mark_setup(out)
        (out / "steps").mkdir(exist_ok=True)
        (out / "optimizer").mkdir(exist_ok=True)
        for relpath, record in {**self.start, **self.files, **self._attributes()}.items():
            write_bytes(out, relpath, read_verified_bytes(self.root, record))  # unchanged since it was proven
        write_bytes(out, JOURNAL, b"".join(r.model_dump_json().encode() + b"\n" for r in steps))
        manifest = self.manifest.model_copy(update={"steps": steps, "n_steps": len(steps), "complete": False})
        write_bytes(out, MANIFEST, manifest.to_json())
        (out / SETUP).unlink()
        read_manifest(out)  # the new store's index reads as a normal read reads it


def _follows(s: int, t: int) -> str:
    return (f"it follows step {s}, which cannot be proven (a trajectory is a prefix: step {t} needs every step "
            f"before it)")


def _interrupted_salvage(target: Path) -> bool:
    """Whether ``target`` is what an interrupted salvage (or new recording) leaves: a directory with the set-up
    marker, no manifest and only files named as explaind names its own (docs/recording.md, "The store")."""
    if not target.is_dir() or target.is_symlink() or (target / MANIFEST).exists():
        return False
    try:
        marked, foreign = setup_leftover(target)
    except OSError:
        return False
    return marked and not foreign


def _step_files(root: Path) -> list[int]:
    try:
        names = os.listdir(root / "steps")
    except OSError:
        return []
    return [int(n[: -len(".safetensors")]) for n in names if STEP_FILE.fullmatch(n)]


def salvage_store(path: Any, out: Any, *, replay: bool = False, model: Any = None, train_data: Any = None,
                  loss: Any = None, reader: Any = None) -> SalvageReport:
    """Copy every step of the store ``path`` that can be proven intact into a new store ``out``.

    Parameters
    ----------
    path : str or Path
        The damaged store; it is only read.
    out : str or Path
        Where the new store is written: a path that does not exist, or an empty directory, outside ``path``.
    replay : bool
        Prove the steps of a store written before schema 3 that no record vouches for by replaying their recorded
        updates (:mod:`~explaind.trajectory._salvage_replay`); the replay needs the model, the training data and the
        loss: ``model``, ``train_data`` and ``loss`` as for ``Trajectory.load`` (default: the store's own).
    model, train_data, loss : optional
        Passed to the replay's ``Trajectory.load`` of the new store; only with ``replay=True``.
    reader : callable, optional
        The store reader of ``Trajectory.load`` (``Trajectory.salvage`` passes it); required by ``replay=True``.

    Returns
    -------
    SalvageReport
        What was kept (and how each step was proven), what was dropped and why, where a resume continues.

    Raises
    ------
    TrajectoryError
        When ``out`` is not allowed or cannot be written, a recorder is writing ``path``, or nothing can be proven
        (no manifest, a start file that fails its checksum, not even step 0), naming the file and the reason.
    """
    root, target = store_root(path), store_root(out)
    real_root, real_target = Path(os.path.realpath(root)), Path(os.path.realpath(target))  # links followed
    if real_target == real_root or real_root in real_target.parents:
        raise TrajectoryError(f"salvage(out={str(out)!r}): the new store would lie inside the damaged one "
                              f"{str(root)!r}, which salvage never writes to. Allowed: a path outside it. Fix: pass "
                              f"e.g. out={str(root.parent / (root.name + '-salvaged'))!r}.")
    if _interrupted_salvage(target):  # holds nothing recorded: the explaind files of a salvage killed mid-write
        remove_store(target, None)
        (target / SETUP).unlink()  # the directory is empty again; _write marks it anew
        logger.info("salvage(out=%r): removed the files of an interrupted salvage or recording there (the set-up "
                    "marker, no manifest).", str(target))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TrajectoryError(f"salvage(out={str(out)!r}): {str(target)!r} exists and is not an empty directory. "
                              f"Allowed: a new path or an empty directory. Fix: choose another out=, or remove it.")
    holder = live_writer(root) if root.is_dir() else None
    if holder is not None:
        raise TrajectoryError(f"Cannot salvage {str(root)!r} now: it is being written by process {holder.get('pid')} "
                              f"on host {holder.get('host')!r}, so its files and index change while they are read. "
                              f"Salvage it once that recording has ended (or, if that process is gone, delete "
                              f"{str(root / LOCK)!r}).")
    try:
        report = _Salvage(root, target, replay_inputs(replay, model, train_data, loss, reader)).run_salvage()
    except OSError as exc:  # out on a read-only mount, a full disk, no permission: named (round 15)
        raise out_failure(exc, out, root, target) from None
    logger.info("%s", report)
    log_unvouched(report)
    return report
