"""The on-disk trajectory store: layout, crash-safe writing and manifest recovery (docs/recording.md, "The store").

Layout of a store directory::

    manifest.json                 TrajectoryManifest (JSON, pydantic-validated)
    journal.jsonl                 one StepRecord per completed step, appended and fsync-ed
    initial.safetensors           theta_0            ("param.<name>")
    constants.safetensors         frozen parameters and buffers ("const.<name>")
    data.safetensors              training data ("X", "y"), optional
    steps/000123.safetensors      step s = 123: theta_{s+1} ("param.<name>"), the LinearUpdate
                                  coefficients (scalars in one table "update.scalars" of shape
                                  (n_params, 7), columns a, b, P, q, n, lambda_c, lambda_d in parameter
                                  order, NaN where the coefficient is a tensor stored as
                                  "update.<name>.<field>"), "batch.indices", "batch.weights"
    optimizer/state-{0,1}.safetensors   optimizer.state_dict() after the latest steps (for resuming)
    optimizer/checkpoint-000123.safetensors   a sparse store (checkpoint_every > 1): the optimizer
                                  state after each full checkpoint step, all kept (replay and resuming);
                                  its steps hold theta_{s+1} only at checkpoints ("has_params"), and every
                                  step file of it holds only "update.scalars" of the coefficients (with the
                                  batch, changed buffers and random states as in a dense store) plus a
                                  "replay" metadata entry (explaind/trajectory/_sparse.py)

A step counts as complete once its journal line is written, which happens after its files were moved into place, so
a crash loses at most the steps not yet committed. ``manifest.json`` is written last when a new store is set up (its
existence makes the directory a store; see ``_layout``), again when a resumed recording starts, and when recording
ends; readers merge it with the journal. Writing may run on a background thread; at most ``max_queue`` (4) steps are
handed to it and not yet committed, and at most ``max_queue_bytes`` (64 MiB) of their copies unless one step alone
is larger (then one step at a time), so a crash loses at most those 4 plus the step in flight (measured in
tests/test_store_faults.py). A failure there is raised by the next recorder call (what is on disk: _write_failure).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import fsync_directory, naming
from ..exceptions import TrajectoryError
from ..recurrence import COEFFICIENT_NAMES, LinearUpdate
from ._background import QueueBudget, check_queue_bounds
from ._binding import new_run_id, record_binding, run_binding, state_binding
from ._checksum import DEFAULT as DEFAULT_CHECKSUM
from ._checksum import validate_algorithm
from ._filewrite import Staged, TensorFileWriter
from ._index import read_manifest
from ._interrupts import check_journal, journal_identity
from ._io import broadcasts_to, tensor_bytes, write_bytes
from ._layout import JOURNAL, MANIFEST, SETUP, checkpoint_state_path, mark_setup, remove_temporary_files, step_path
from ._travel import unshared_journal
from ._write_failure import write_failure
from .lock import WriterLock
from .manifest import SCHEMA_VERSION, FileRecord, StepRecord, TensorSpec, TrajectoryManifest

__all__ = ["MANIFEST", "JOURNAL", "StoreWriter", "read_manifest", "is_store", "step_path",
           "pack_updates", "unpack_updates", "check_updates", "Prepare"]

#: ``prepare(record, optimizer_state) -> (record, optimizer_state)``, run on the writer before a step is written
Prepare = Callable[[StepRecord, Any], tuple[StepRecord, Any]]

#: Bytes of step copies (theta, optimizer state, what the step's ``prepare`` holds) queued for the writer at
#: most, unless one step alone is larger: then a step waits until the one before it is committed
MAX_QUEUE_BYTES = 1 << 26


def pack_updates(names: tuple[str, ...], updates: dict[str, LinearUpdate]) -> dict[str, Tensor]:
    """Step-file tensors of the coefficients: one float64 scalar table plus the tensor-valued coefficients."""
    out: dict[str, Tensor] = {}
    rows = []
    for name in names:
        u, row = updates[name], []
        for field in COEFFICIENT_NAMES:
            value = getattr(u, field)
            if isinstance(value, Tensor) and value.dim() > 0:
                out[f"update.{name}.{field}"] = value
                row.append(math.nan)
            else:
                row.append(float(value))
        rows.append(row)
    out["update.scalars"] = torch.tensor(rows, dtype=torch.float64).reshape(len(names), len(COEFFICIENT_NAMES))
    return out


def check_updates(specs: list[TensorSpec], tensors: dict[str, Tensor], where: str, *, dense: bool) -> None:
    """The coefficients of a step file are those :func:`pack_updates` writes for parameters ``specs``.

    ``update.scalars`` is float64 of shape ``(n_params, 7)``, finite except NaN where a dense file
    holds the coefficient as ``update.<name>.<field>`` instead (sparse files keep only the table: their
    tensor coefficients are replayed); such a tensor is floating and broadcasts to its parameter's shape.

    Raises
    ------
    TrajectoryError
        Naming the file, the tensor, what it holds and what is allowed.
    """
    problem = _update_problem(specs, tensors, dense)
    if problem:
        raise TrajectoryError(f"Trajectory file {where}: {problem}. The store is corrupted or was not written by "
                              f"explaind; re-record the run.")


def _described(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} of shape {list(t.shape)}"


def _update_problem(specs: list[TensorSpec], tensors: dict[str, Tensor], dense: bool) -> str | None:
    table = tensors.get("update.scalars")
    shape = [len(specs), len(COEFFICIENT_NAMES)]
    if table is None or table.dtype != torch.float64 or list(table.shape) != shape:
        held = "nothing" if table is None else _described(table)
        return f"'update.scalars' holds {held}, allowed: float64 of shape {shape}"
    if bool(torch.isinf(table).any()):
        return "'update.scalars' holds infinite coefficients, allowed: finite values (NaN marks a tensor coefficient)"
    for spec, row in zip(specs, table.tolist()):
        for field, value in zip(COEFFICIENT_NAMES, row):
            key = f"update.{spec.name}.{field}"
            t = tensors.get(key)
            if t is None:
                if dense and math.isnan(value):
                    return f"{key!r} is missing (its cell of 'update.scalars' is NaN)"
                continue
            if not (t.is_floating_point() and broadcasts_to(tuple(t.shape), tuple(spec.shape))):
                return f"{key!r} is {_described(t)}, allowed: a floating tensor broadcasting to the shape {spec.shape}"
    return None


def unpack_updates(names: tuple[str, ...], tensors: dict[str, Tensor]) -> dict[str, LinearUpdate]:
    """Inverse of :func:`pack_updates`."""
    table = tensors["update.scalars"].tolist()
    out = {}
    for name, row in zip(names, table):
        values: dict[str, Any] = {}
        for field, scalar in zip(COEFFICIENT_NAMES, row):
            key = f"update.{name}.{field}"
            values[field] = tensors[key] if key in tensors else scalar
        out[name] = LinearUpdate(**values)
    return out


def step_bytes(tensors: dict[str, Tensor], optimizer_state: tuple[dict[str, Tensor], Any] | None) -> int:
    """Bytes of a step's tensors and of its optimizer state's tensors."""
    state = () if optimizer_state is None else optimizer_state[0].values()
    return tensor_bytes(tensors.values()) + tensor_bytes(state)


def is_store(path: Path) -> bool:
    """Whether ``path`` is a trajectory store (holds a manifest)."""
    return (path / MANIFEST).is_file()


class StoreWriter:
    """Writes a store: the start files synchronously, then one step at a time (optionally in the background).

    Parameters
    ----------
    root : Path
        Store directory (prepared by :func:`~explaind.trajectory._setup.prepare_directory`).
    manifest : TrajectoryManifest
        The manifest; its ``steps`` are the steps already on disk (non-empty when resuming).
    fsync : bool
        ``fsync`` every file and journal line (durability across power loss, not only crashes).
    background : bool
        Write step files on a worker thread; at most ``max_queue`` steps are handed over and not
        yet committed at any time (a further ``write_step`` waits).
    max_queue : int
        Steps handed over and not yet committed, at most (the crash bound; at least 1).
    max_queue_bytes : int, None or "default"
        Bytes of the steps handed over and not yet committed (their tensors, optimizer state and
        ``held_bytes``), at most, unless a single step is larger: then it waits until nothing is
        queued (``0``: every step waits for the one before it). ``None``: bounded by ``max_queue``
        only; ``"default"``: :data:`MAX_QUEUE_BYTES`.
    new : bool
        Set up a new store: the set-up marker is created and the manifest is not written until
        :meth:`finish_setup` (after the start files), so an interruption leaves no store.
    keep_states : bool
        Keep every optimizer state handed over (``optimizer/checkpoint-{s:06d}.safetensors``, the
        checkpoints of a sparse store) instead of the newest one in two alternating slots.
    checksum : str
        Checksum algorithm of the files written (:data:`~explaind.trajectory._checksum.ALGORITHMS`,
        default XXH3-128). The manifest is written with the current :data:`SCHEMA_VERSION`: a resumed
        schema-1 store keeps its SHA-256 records, which are read as before, and becomes schema 2.

    Raises
    ------
    ConfigError
        When ``max_queue`` is not an int >= 1 or ``max_queue_bytes`` not an int >= 0, ``None`` or
        ``"default"``, or ``checksum`` not one of the algorithms (checked before anything is
        written or locked).
    """

    def __init__(self, root: Path, manifest: TrajectoryManifest, *, fsync: bool = True, background: bool = True,
                 max_queue: int = 4, max_queue_bytes: int | None | str = "default", new: bool = False,
                 keep_states: bool = False, checksum: str = DEFAULT_CHECKSUM):
        check_queue_bounds(max_queue, max_queue_bytes, MAX_QUEUE_BYTES)
        self.root = Path(root).absolute()  # a later os.chdir does not move it
        self.checksum = validate_algorithm(checksum)
        manifest.schema_version = SCHEMA_VERSION  # new records need it (read_manifest refused newer ones)
        if new:
            manifest.run_id = new_run_id()  # bound into every step file (_binding.py); older stores keep none
        self.manifest = manifest
        self.fsync = fsync
        self.keep_states = bool(keep_states)
        self._error: BaseException | None = None  # a failed write's error, raised by the next call (_write_failure)
        self._appending: tuple[int, int] | None = None  # steps whose journal lines are being appended
        self._error_step: int | None = None
        self._run: str | None = None  # run_binding(manifest), at the first step (the start files are written then)
        slot_of = (lambda r: r.audit_state) if keep_states else (lambda r: r.optimizer_state)  # the last state's slot
        last = next((slot_of(r) for r in reversed(manifest.steps) if slot_of(r) is not None), None)
        self._slot = 1 if last is not None and last.path.endswith("state-1.safetensors") else 0
        self._lock = threading.Lock()
        self._files = TensorFileWriter(checksum=self.checksum)  # one reused buffer, O_DIRECT where allowed
        self._queue: queue.Queue[Callable[[], None] | None] | None = None
        self._thread: threading.Thread | None = None
        self._journal: Any = None  # opened below
        self._journal_id: tuple[int, int] | None = None  # its device and inode: a store deleted mid-run is refused
        self._budget = QueueBudget(max_queue, MAX_QUEUE_BYTES if max_queue_bytes == "default" else max_queue_bytes)
        self._writer_lock = WriterLock(self.root).acquire()  # one writer per store
        try:  # a failure from here (EROFS, EIO) gives the lock back: a later recorder (this process too) can open
            remove_temporary_files(self.root)
            if new:
                mark_setup(self.root, fsync=fsync)
            self._write_journal(list(manifest.steps))  # a resumed store: drop a torn journal line before appending
            self._journal = open(self.root / JOURNAL, "ab")  # noqa: SIM115 - closed in close()
            self._journal_id = journal_identity(self._journal.fileno())
            if background:
                self._queue = queue.Queue(maxsize=max(1, int(max_queue)))
                self._thread = threading.Thread(target=self._worker, name="explaind-store-writer", daemon=True)
                self._thread.start()
            if not new:
                self.write_manifest()
                self._drop_marker()
        except BaseException:
            self.abandon()
            raise

    def finish_setup(self) -> None:
        """Write the manifest of a new store (after its start files): from now on it is a store."""
        self.write_manifest()
        self._drop_marker()

    def _drop_marker(self) -> None:
        if (self.root / SETUP).exists():
            (self.root / SETUP).unlink(missing_ok=True)
            if self.fsync:
                fsync_directory(self.root)

    # ----------------------------------------------------------------- helpers
    def _write_journal(self, steps: list[StepRecord]) -> None:
        data = b"".join(r.model_dump_json().encode() + b"\n" for r in steps)
        write_bytes(self.root, JOURNAL, data, fsync=self.fsync)

    def write_manifest(self) -> None:
        check_journal(self.root, JOURNAL, self._journal_id)  # not into a directory made anew (_interrupts.py)
        with self._lock:
            self.manifest.n_steps = len(self.manifest.steps)
            data = self.manifest.to_json()
        write_bytes(self.root, MANIFEST, data, fsync=self.fsync)

    def write_file(
        self, relpath: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
    ) -> FileRecord:
        """Synchronous checksummed write of one safetensors file (start files)."""
        return self._files.write(self.root, relpath, tensors, metadata, fsync=self.fsync)

    def _worker(self) -> None:
        """Commit queued steps; whatever has piled up is committed as one group (fewer fsyncs)."""
        assert self._queue is not None
        while not self._commit_queued(self._queue):
            pass

    def _commit_queued(self, q: queue.Queue) -> bool:
        """Wait for a step, commit it with those queued behind it; ``True`` once the stop marker came.

        A call of its own, so that no written step's tensors stay referenced while the worker waits for the next
        step (they go back to the recorder's pool, or are freed, once written)."""
        batch = [q.get()]
        while True:
            try:
                batch.append(q.get_nowait())
            except queue.Empty:
                break
        items = [item for item in batch if item is not None]
        try:
            if items and self._error is None:
                self._commit(items)
        except BaseException as exc:  # surfaced by check()
            self._error = exc
        finally:
            stop, n = len(items) < len(batch), len(batch)
            for item in batch:
                if item is not None:
                    self._budget.release(item[6])
            batch.clear()  # no reference to a written step's tensors once flush() returns
            items.clear()
            item = None
            for _ in range(n):
                q.task_done()
        return stop

    def check(self) -> None:
        """Raise the error of a failed background write, if any."""
        if self._error is not None:
            err, self._error = self._error, None
            raise TrajectoryError(write_failure(self.root, self._error_step, err, len(self.manifest.steps),
                                                self._appending)) from err

    # ----------------------------------------------------------------- steps
    def write_step(
        self,
        record: StepRecord,
        tensors: dict[str, Tensor],
        optimizer_state: tuple[dict[str, Tensor], dict[str, str]] | None,
        metadata: dict[str, str] | None = None,
        prepare: Prepare | None = None,
        done: Callable[[], None] | None = None,
        held_bytes: int = 0,
    ) -> None:
        """Queue step ``record.step``: its file, the optimizer state after it (optional), then its journal line.

        ``metadata`` joins the step file's (checksummed) metadata. ``prepare(record, state)`` runs on the
        writer in step order just before the step is written and returns the record and state to write
        (the recorder's audit runs there); ``done()`` runs once the step's group was written.
        ``held_bytes``: what else the step keeps alive until it is written (the audit's gradient
        copies), counted against ``max_queue_bytes`` with its tensors and optimizer state.
        """
        self.check()
        nbytes = step_bytes(tensors, optimizer_state) + int(held_bytes)
        item = (record, tensors, optimizer_state, dict(metadata or {}), prepare, done, nbytes)
        if self._queue is None:
            try:
                self._commit([item])
            except BaseException as exc:
                self._error = exc
                self.check()
        else:
            self._budget.acquire(nbytes)  # at most max_queue steps (and max_queue_bytes) not yet committed
            self._queue.put(item)

    def wait_for_room(self, nbytes: int) -> None:
        """Wait until a step of ``nbytes`` would be queued without waiting (call before copying it)."""
        if self._queue is not None:
            self._budget.wait_for_room(nbytes)

    def _commit(self, items: list[tuple[StepRecord, dict[str, Tensor], Any, dict[str, str], Any, Any, int]]) -> None:
        """Write the files of consecutive steps, then their journal lines (the commit point).

        Only the newest optimizer state of the group is written, into the slot *not* holding the
        state of the last committed step, so a crash at any point leaves a resumable store; with
        ``keep_states`` every state is written to its own checkpoint file.
        """
        last_state = max((i for i, item in enumerate(items) if item[2] is not None), default=None)
        done: list[StepRecord] = []
        ready: list[Staged] = []  # the files of the steps in `done`, written, not yet flushed nor in place
        try:
            for i, (record, tensors, state, extra, prepare, _, _) in enumerate(items):
                s = self._error_step = record.step
                if prepare is not None:
                    record, state = prepare(record, state)
                meta = {**extra, "step": str(s), "record": record_binding(record)}  # checksummed with the file
                run = self._run = self._run or run_binding(self.manifest)  # the run, fixed once steps come; and
                meta.update(({} if run is None else {"run": run}) | ({} if state is None else {"state": state_binding(
                    *state)}))  # the state handed with it (written or not: the step file does not depend on timing)
                mine: list[Staged] = []
                try:
                    file = self._files.write(self.root, step_path(s), tensors, meta, staged=mine)
                    files: dict[str, FileRecord | None] = {"file": file, "optimizer_state": None}
                    if state is not None and self.keep_states:
                        files.update(self._write_checkpoint_state(
                            s, *state, staged=mine, free=lambda relpath: self._free_target(relpath, ready, done)))
                    elif state is not None and i == last_state:
                        files["optimizer_state"] = self._files.write(
                            self.root, f"optimizer/state-{1 - self._slot}.safetensors", state[0],
                            dict(state[1], n_steps=str(s + 1)), staged=mine)
                except BaseException:
                    self._files.discard(mine)
                    raise
                ready.extend(mine)
                done.append(record.model_copy(update=files))
        finally:
            if done:
                # every file flushed (at once) before it is renamed, the renames before the journal line
                self._files.settle(ready, fsync=self.fsync)
                if self.fsync:
                    self._files.flush_directories([self.root / "steps"] + ([self.root / "optimizer"]
                                                                           if last_state is not None else []))
                self._appending = (done[0].step, done[-1].step)  # what a failure from here may leave (_write_failure)
                try:
                    self._journal, self._journal_id = unshared_journal(  # a hard-linked copy keeps its own
                        self.root, self._journal, self._journal_id, lambda: self._write_journal(self.manifest.steps))
                    self._journal.write(b"".join(r.model_dump_json().encode() + b"\n" for r in done))
                    self._journal.flush()
                    if self.fsync:
                        os.fsync(self._journal.fileno())
                except OSError as exc:  # on the open journal: the error names no file
                    raise naming(exc, self.root / JOURNAL) from exc
                with self._lock:
                    self.manifest.steps.extend(done)
                self._appending = None
                if last_state is not None and last_state < len(done) and not self.keep_states:
                    self._slot = 1 - self._slot
            for item in items:
                if item[5] is not None:
                    item[5]()

    def _free_target(self, relpath: str, ready: list[Staged], done: list[StepRecord]) -> None:
        """Before a file of the group is written to ``relpath``: where an earlier step of the group staged one
        for it (a sparse store's audit slot, at every second checkpoint), the group's files so far (``ready``,
        of the steps in ``done``) are flushed and moved into place first, so that the newer file replaces the
        older one as it does one file at a time (the two would share a temporary name)."""
        if not any(f.target == self.root / relpath for f in ready):
            return
        try:
            self._files.settle(ready, fsync=self.fsync)
        except BaseException:
            done.clear()  # not all of their files are in place: no journal line for them
            raise
        finally:
            ready.clear()

    def _write_checkpoint_state(self, s: int, tensors: dict[str, Tensor], meta: dict[str, str],
                                staged: list[Staged], free: Callable[[str], None]) -> dict[str, FileRecord | None]:
        """A sparse store's checkpoint: the optimizer state kept for good, the audit's momentum in the next slot.

        The files are written into ``staged`` (flushed and moved into place with the step's group);
        ``free(relpath)`` runs before the slot's file is written (:meth:`_free_target`).
        """
        own = {k: v for k, v in tensors.items() if not k.startswith("audit.")}
        audit = {k: v for k, v in tensors.items() if k.startswith("audit.")}
        out: dict[str, FileRecord | None] = {"optimizer_state": self._files.write(
            self.root, checkpoint_state_path(s), own, dict(meta, n_steps=str(s + 1)), staged=staged)}
        if audit:
            slot = f"optimizer/state-{1 - self._slot}.safetensors"
            free(slot)
            out["audit_state"] = self._files.write(self.root, slot, audit, {"n_steps": str(s + 1)}, staged=staged)
            self._slot = 1 - self._slot  # the record is committed with the group (the journal lists it)
        return out

    def flush(self) -> None:
        """Wait until every queued step is on disk; raise a failed write's error."""
        if self._queue is not None:
            self._queue.join()
        self.check()

    def close(self, *, complete: bool) -> None:
        """Flush, stop the worker and write the final manifest (``complete`` marks a clean end).

        The manifest is written even when a queued write failed (listing the steps that made it);
        the failure is raised afterwards.
        """
        error: TrajectoryError | None = None
        try:
            self.flush()
        except TrajectoryError as exc:
            error, complete = exc, False
        except BaseException:  # Ctrl-C while waiting: the writer commits what it holds and gives the lock back
            self.abandon()
            raise
        self._stop()
        self.manifest.complete = complete
        try:
            self.write_manifest()
        except OSError as exc:  # a full disk, a directory turned read-only: every step is in the journal already
            if error is None:
                error = TrajectoryError(
                    f"Writing the final manifest of the trajectory store {str(self.root)!r} failed: "
                    f"{type(exc).__name__}: {exc}. Every step recorded is kept (its journal lists them) and the "
                    f"store reads as an interrupted run. Free the space (or restore write access), then open it "
                    f"with TrajectoryRecorder(..., resume=True) and rec.restore() to go on or to mark it complete.")
                error.__cause__ = exc
        finally:
            self._writer_lock.release()
        if error is not None:
            raise error

    def abandon(self) -> None:
        """Give the store up after a failed set-up: stop the worker and release the lock, writing nothing more."""
        self._stop()
        self._writer_lock.release()

    def _stop(self) -> None:
        """Stop the writer thread (after what it was handed), close the journal and the file writer's I/O thread."""
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None
        if self._journal is not None:
            self._journal.close()
        self._files.close()

    @property
    def n_steps(self) -> int:
        with self._lock:
            return len(self.manifest.steps)
