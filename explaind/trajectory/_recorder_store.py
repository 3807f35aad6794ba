"""The store side of :class:`~explaind.TrajectoryRecorder`: opening, resuming and writing a store directory.

Kept apart from the hooks so that each module reads on its own; the methods use the recorder's
attributes (``_store``, ``_manifest``, ``_writer``, ``_params``, ...) set in its ``__init__``.
The per-step work that can wait runs off the hot path (:mod:`~explaind.trajectory._background`): the
writes on the store's writer thread; the copies of :math:`\theta_{s+1}` (on the state copier's thread,
:mod:`~explaind.trajectory._theta_copy`) and of the optimizer state go to reused buffers, given back once
written. With a store the update audit runs at the step (:meth:`RecorderStoreMixin._next_theta`): it reads
:math:`\theta_s` from the previous copy, :math:`\theta_{s+1}` from the parameters and the gradient
from the tap's snapshot, so the recorder holds one copy of :math:`\theta` and one gradient snapshot
instead of two of each (docs/recording.md, "Recording overhead"). In memory, where every copy is
kept anyway, it runs on a worker thread in step order. A dense store's copy of the optimizer state
(on the CPU) is made by a :class:`~explaind.trajectory._background.StateCopier` thread while the
loop computes the next step's gradients; the next ``optimizer.step()`` waits for it (a step
pre-hook), and so does the writer before writing it. A state tensor whose bytes equal the audit's
momentum of its parameter (SGD's momentum buffer) is not copied: the audit's tensor is stored
(:mod:`~explaind.trajectory._state_share`).
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor

from ..exceptions import ConfigError, TrajectoryError
from ..recurrence import LinearUpdate
from ._background import AuditResult, CopyPool, Handoff, OrderedWorker, StateCopier, WarmBuffers, audit_job, audit_value
from ._buffers import pack_buffers
from ._coefficients import PREFIX, CoefficientBuffers
from ._coupled_loss import is_batch_coupled
from ._gradients import has_stochastic_layers
from ._interrupts import watch_writer
from ._io import encode_optimizer_state, tensor_bytes
from ._random_store import pack_micro_batches
from ._recorder_resume import RecorderResumeMixin
from ._setup import setup_error
from ._sparse import SparseLayout, StepReplay, group_snapshot, state_bytes, validate_checkpoint_every
from ._start_optimizer import optimizer_start_file
from ._start_state import START_STATE_FILE, start_state_tensors
from ._state_share import StateCopy, momentum_by_state_index
from ._theta_copy import ThetaCopy
from .disk import DiskTrajectory
from .fingerprint import data_fingerprint
from .manifest import StepRecord
from .store import Prepare, StoreWriter, pack_updates

__all__ = ["RecorderStoreMixin"]

logger = logging.getLogger("explaind.trajectory.recorder")


class RecorderStoreMixin(RecorderResumeMixin):
    """Store methods of the recorder (see :class:`~explaind.TrajectoryRecorder`); resuming in the base class."""

    _writer: StoreWriter | None
    _fsync: bool
    _background: bool
    _data: Any
    _store_data: bool
    _state_every: int
    _every: int
    _audit_on: bool
    _broken: str | None
    _memory: Any
    _theta: dict[str, Tensor] | None
    _pool: CopyPool
    _worker: OrderedWorker | None
    _tap: Any
    _random: Any
    _adapter: Any
    _start_state: dict[str, Tensor]
    _start_optimizer: Any
    _handles: list[Any]

    def _storage_options(self, save_optimizer_state: Any, checkpoint_every: Any) -> None:
        """Validate ``save_optimizer_state`` and ``checkpoint_every``; set ``_state_every`` and ``_every``."""
        if not (isinstance(save_optimizer_state, bool) or (type(save_optimizer_state) is int and
                                                           save_optimizer_state > 0)):
            raise ConfigError(
                f"save_optimizer_state={save_optimizer_state!r} is not allowed. Choose True, False or a positive int "
                f"k (store the optimizer state every k steps)."
            )
        self._state_every = int(save_optimizer_state) if save_optimizer_state is not False else 0
        uncaptured = [] if self._random.enabled else has_stochastic_layers(self.model)
        self._every = validate_checkpoint_every(checkpoint_every, store=self._store, stochastic=uncaptured)
        self._layout: SparseLayout | None = None
        self._deferred: tuple[StepRecord, dict[str, Tensor], dict[str, Tensor], StepReplay, Any] | None = None
        self._deferred_params = False  # whether the deferred step keeps theta when a later step comes
        self._pool = CopyPool()
        self._copier = StateCopier()
        self._copy_hook: Any = None
        self._theta_handoff: Handoff | None = None  # readers of a dense store's theta_s copy
        self._worker = None
        self._warm: WarmBuffers | None = None
        self._coefs = CoefficientBuffers.for_adapter(self._adapter, self._pool, self._params, dense=self._pooled(),
                                                     read_at_step=self._audit_on,
                                                     sparse=self._store is not None and self._every > 1)

    # ----------------------------------------------------------------- off the hot path
    def _pooled(self) -> bool:
        """Whether theta_{s+1} is copied into reused buffers: a dense store (memory keeps every copy)."""
        return self._store is not None and self._every == 1

    def _copy_params(self) -> ThetaCopy:
        r""":math:`\theta_{s+1}` of the recorded parameters, being copied on the state copier's thread
        (:class:`~explaind.trajectory._theta_copy.ThetaCopy`): into pool buffers for a dense store; in memory,
        where every copy is kept, from the second step on into memory made ready by
        :class:`~explaind.trajectory._background.WarmBuffers` (page-faulted on its thread).
        """
        if self._pooled():
            return ThetaCopy(self._params, lambda n, t: self._pool.buffer("param." + n, t), self._copier)
        if self._store is None and self._warm is not None:
            warm, ready = self._warm, self._warm.take()
            return ThetaCopy(self._params, lambda n, t: ready[n] if warm.fits(ready.get(n), t) else torch.empty_like(t),
                             self._copier)
        if self._store is None:
            self._warm = WarmBuffers({n: p.detach() for n, p in self._params.items()})  # ready from the next step
        return ThetaCopy(self._params, lambda _n, t: torch.empty_like(t), self._copier)

    def _adapter_updates(self, optimizer: torch.optim.Optimizer, before: Any) -> dict[int, LinearUpdate]:
        """The adapter's ``after_step``; in a dense store with its tensor coefficients in pool buffers
        (:mod:`~explaind.trajectory._coefficients`, given back once the step is written)."""
        if self._coefs is None:
            return self._adapter.after_step(optimizer, before)
        return self._coefs.updates(self._adapter, optimizer, before)

    def _fill_coefficients(self) -> Future | None:
        """The adapter's deferred coefficients of this step, filled on the :class:`StateCopier` (``None``: none).

        The next ``optimizer.step()`` waits for them (:meth:`_hold_next_step`), the writer before writing them.
        """
        jobs = [] if self._coefs is None else self._coefs.take_jobs()
        if not jobs:
            return None
        self._hold_next_step()
        return self._copier.run(jobs)

    def _next_theta(self, s: int, st: dict[str, Any], updates: dict[str, LinearUpdate],
                    dense: dict[str, Tensor] | None, copying: ThetaCopy | None) -> tuple[dict[str, Tensor], Any,
                                                                                        ThetaCopy]:
        r"""After step ``s``: the copy of :math:`\theta_{s+1}`, the step's audit (``None`` with the audit off) and
        the copy's :class:`ThetaCopy` (``copying``: started by the caller; a dense store starts it here).

        With a store the audit runs first (:meth:`_audit_now`, an :class:`AuditResult`), so the buffers
        of :math:`\theta_s` are free for :math:`\theta_{s+1}` once the writer wrote them too; in memory it
        is a job for the worker (:meth:`_audit_job`). Between the two, a dense store waits for room in the
        writer's queue (:meth:`_make_room`, ``dense``: :meth:`_dense_tensors`). The copy is complete on return
        except in a dense store, whose writer waits for it (:meth:`_write_step`), as the caller does before it returns.
        """
        seen = st["seen"]
        if self._store is None:
            theta_next = copying.wait()
            return theta_next, self._audit_job(s, theta_next, seen, updates), copying
        audit = self._audit_now(s, seen, updates) if self._audit_on else None
        # a dense store's queue is bounded by bytes: wait before copying, not after (the audit's new momentum counted)
        self._make_room(s, st, dense)
        copying = copying or self._copy_params()
        theta_next = self._theta = copying.tensors if self._pooled() else copying.wait()
        if self._pooled():  # read by the writer, and by the next step's audit
            self._theta_handoff = Handoff(self._pool, "param.", theta_next, 2 if self._audit_on else 1)
        return theta_next, audit, copying

    def _audit_now(self, s: int, seen: Any, updates: dict[str, LinearUpdate]) -> AuditResult:
        r"""The audit of step ``s`` at the step: :math:`\theta_s` from the last copy, :math:`\theta_{s+1}` live.

        Runs inside the optimizer's post-step hook, before anything can change the parameters. The
        gradient the optimizer saw is the tap's snapshot when ``p.grad`` equalled it, else ``p.grad``
        itself (read now, no copy). The same arithmetic as the worker's audit (:func:`audit_job`).

        Raises
        ------
        TrajectoryError
            If the audit fails (naming the step).
        """
        theta = self._theta
        assert theta is not None
        live = {n: p.detach() for n, p in self._params.items()}
        grads: dict[str, Tensor | None] = {}
        for n, g in seen.items():
            snap = None if g is None else self._tap.snapshot(n)
            grads[n] = snap if snap is not None else g
        try:
            value = self._auditor.step(theta, live, grads, updates)
        except Exception as exc:
            raise TrajectoryError(f"The update audit of step {s} failed: {type(exc).__name__}: {exc}") from exc
        handoff, self._theta_handoff = self._theta_handoff, None
        if handoff is not None:
            handoff.done()
        elif self._pooled():  # the first theta_s (written at the start, or read from a resumed store)
            self._pool.release("param.", theta)
        return AuditResult(value, dict(self._auditor.momentum))

    def _audit_job(self, s: int, theta_next: dict[str, Tensor], seen: Any, updates: dict[str, LinearUpdate]) -> Any:
        """In memory: the audit of step ``s`` as a job to run later in step order (``None`` with the audit off)."""
        theta, self._theta = self._theta, theta_next
        if not self._audit_on:
            return None
        assert theta is not None
        grads: dict[str, Tensor | None] = {}
        for n, g in seen.items():  # the snapshot itself when p.grad still equals it, else a copy
            taken = None if g is None else self._tap.take(n)
            grads[n] = taken if taken is not None or g is None else self._pool.copy("grad." + n, g)
        return audit_job(self._auditor, self._pool, s, theta, theta_next, grads, updates, self._pooled())

    def _audit_in_memory(self, s: int, job: Any) -> None:
        """Run the audit of an in-memory step on the worker and fill in its value."""
        if job is None:
            return
        if self._worker is None:
            self._worker = OrderedWorker("explaind-audit", background=self._background)
        memory = self._memory
        self._worker.submit(lambda: memory._set_audit(s, job()))

    def _check_worker(self, wait: bool = False) -> None:
        """Raise the error of a failed background audit (the recorder stops: later audits would be wrong).

        ``wait``: first wait for the audits still queued.
        """
        if self._worker is not None:
            try:
                self._worker.flush() if wait else self._worker.check()
            except BaseException as exc:
                self._broken = f"the audit ({exc})"
                raise

    def _close_worker(self, failing: bool) -> None:
        self._copier.close()  # the state copies handed to the writer are complete from here on
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.close()
        worker, self._worker = self._worker, None
        if worker is None:
            return
        try:
            worker.close()
        except BaseException as exc:
            self._broken = f"the audit ({exc})"
            if not failing:
                raise
            logger.exception("The background audit failed while handling another error.")

    @staticmethod
    def _prepare(audit: AuditResult | None, *copied: Future | None, share: StateCopy | None = None) -> Prepare | None:
        """What the writer runs before writing a step: the audit value into the record, its momentum into the state.

        ``copied``: the optimizer state's copy and the deferred coefficients on the :class:`StateCopier`,
        waited for first (their errors are the step's); ``share``: that copy, whose placeholders it resolves.
        """
        waits = [f for f in copied if f is not None]
        if audit is None and not waits:
            return None

        def prepare(record: StepRecord, state: Any) -> tuple[StepRecord, Any]:
            for future in waits:
                future.result()
            if share is not None and state is not None:
                state = (share.resolve(state[0]), state[1])
            if audit is None:
                return record, state
            record = record.model_copy(update={"audit": audit_value(audit.value)})
            # taken, so that the queued step keeps no reference to it once written; no copy: the audit replaces
            # its momentum tensors at every step, never writes into them
            momentum = audit.take_momentum()
            if state is not None:
                state = ({**state[0], **{f"audit.{k}": v.detach() for k, v in momentum.items()}}, state[1])
            return record, state

        return prepare

    def _state_due(self, s: int) -> bool:
        """Whether a dense store keeps the optimizer state after step ``s``."""
        return bool(self._state_every) and (s + 1) % self._state_every == 0

    def _dense_tensors(self, st: dict[str, Any], updates: dict[str, LinearUpdate],
                       buffers: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
        """A dense store's step-file tensors besides theta: the batch record and the packed coefficients.

        ``None`` in memory and for sparse stores (they write their own).
        """
        if self._writer is None or self._every > 1:
            return None
        return {**self._step_record(st, buffers), **pack_updates(tuple(self._params), updates)}

    def _momentum_bytes(self, s: int) -> int:
        """Bytes of the audit's momentum a dense step's queued optimizer state keeps alive (0 without either)."""
        return tensor_bytes(self._auditor.momentum.values()) if self._audit_on and self._state_due(s) else 0

    def _make_room(self, s: int, st: dict[str, Any], tensors: dict[str, Tensor] | None) -> None:
        """Before step ``s``'s copies are made: wait until the writer's queue has room for them (dense stores).

        The queue is bounded by bytes as well as steps (``StoreWriter``'s ``max_queue_bytes``), so
        when the writer is behind the loop waits here instead of holding one more step of copies.
        The room asked for is what :meth:`_write_step` then hands over: theta, ``tensors`` (the
        batch record and the tensor-valued coefficients, e.g. Adam's ``P``, of
        :meth:`_dense_tensors`), the optimizer state when it is due and the audit's momentum that state keeps,
        so a step let through here is never held back again holding its copies.
        """
        if self._writer is None or tensors is None:
            return
        theta = tensor_bytes(self._params.values())
        state = state_bytes(self.optimizer) if self._state_due(s) else 0
        self._writer.wait_for_room(theta + tensor_bytes(tensors.values()) + state + self._momentum_bytes(s))

    def _release(self, state: Any, theta: Handoff | None, coefs: dict[str, Tensor] | None = None) -> Any:
        """What the writer runs once a step is written: the optimizer state's and the coefficients' buffers are
        free, theta's read (``state``: the encoded state of pool copies, or its :class:`StateCopy`)."""
        pool = self._pool

        def done() -> None:
            if isinstance(state, StateCopy):
                state.release()
            elif state is not None:
                pool.release("state.", state[0])
            if coefs:
                pool.release(PREFIX, coefs)
            if theta is not None:
                theta.done()

        return done

    def _open_store(self, theta: dict[str, Tensor], constants: dict[str, Tensor]) -> None:
        """Open the store's writer and write the start files; a directory that cannot be written is an explaind error.

        The writer of a failed set-up is abandoned (its lock released, nothing more written): the
        directory then holds no store, or the resumed store as it was, and a later recorder can open it.
        """
        try:
            self._start_writer(theta, constants)
        except OSError as exc:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                None if writer is None else writer.abandon()
            raise setup_error(self._store, exc) from exc
        watch_writer(self, self._writer, self._store)  # a recorder never exited still commits and unlocks

    def _start_writer(self, theta: dict[str, Tensor], constants: dict[str, Tensor]) -> None:
        assert self._store is not None
        m = self._manifest
        if self._resumed:
            stored = DiskTrajectory(self._store, model=self.model, loss=self._loss).params(m.n_steps)
            differ = [n for n in self._params if not torch.equal(stored[n], theta[n].to("cpu"))]
            if differ:
                raise TrajectoryError(
                    f"Resuming {str(self._store)!r} at step {m.n_steps}, but the model's parameters {differ} differ "
                    f"from the stored theta_{m.n_steps}. Call rec.restore() before `with rec:`."
                )
            self._check_resumed_state()  # without restore(): the optimizer must hold the state saved at N
            m.complete = False
            self._writer = StoreWriter(self._store, m, fsync=self._fsync, background=self._background,
                                       keep_states=self._every > 1)
            return
        if self._data is not None:
            m.train_fingerprint = data_fingerprint(self._data)
        # the manifest goes last: until it is written the directory holds no store (store.py, _layout.py)
        self._writer = StoreWriter(self._store, m, fsync=self._fsync, background=self._background, new=True,
                                   keep_states=self._every > 1)
        m.initial_file = self._writer.write_file("initial.safetensors", {f"param.{k}": v for k, v in theta.items()})
        if constants:
            m.constants_file = self._writer.write_file(
                "constants.safetensors", {f"const.{k}": v for k, v in constants.items()}
            )
        if self._data is not None and self._store_data:
            m.data_file = self._writer.write_file("data.safetensors", self._data.flat())
        if self._start_state or self._start_optimizer is not None:
            opt, metadata = optimizer_start_file(self._start_optimizer)
            m.initial_state_file = self._writer.write_file(
                START_STATE_FILE, {**start_state_tensors(self._start_state), **opt}, metadata or None)
            self._start_optimizer = None  # in the file now: its CPU copy need not live through the recording
        self._writer.finish_setup()

    def _optimizer_state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The optimizer's ``state_dict`` as safetensors tensors (pool copies) and metadata.

        The audit's momentum of the step is added by :meth:`_prepare` on the writer.
        """
        return encode_optimizer_state(self.optimizer.state_dict(), copy=lambda k, v: self._pool.copy("state." + k, v))

    def _optimizer_state_async(self, audit: AuditResult | None) -> tuple[Any, list[Future], StateCopy]:
        """:meth:`_optimizer_state` with the CPU tensors copied on the :class:`StateCopier` thread.

        Returns the state (its CPU tensors: pool buffers being filled, or placeholders for the
        audit's momentum), the futures of the copier's jobs (none when nothing is copied there) and the
        :class:`~explaind.trajectory._state_share.StateCopy` (state tensors equal to ``audit``'s momentum
        are stored from it, not copied). Hyperparameters and the state's structure are read here, on the
        loop's thread; the next ``optimizer.step()`` waits for the copy (:meth:`_await_state_copy`,
        registered as a step pre-hook with the first copy).
        """
        names = {id(p): n for n, p in self._params.items()}
        momentum = {} if audit is None else momentum_by_state_index(self.optimizer, names, audit.momentum)
        copy = StateCopy(self._pool, momentum)
        state = encode_optimizer_state(self.optimizer.state_dict(), copy=copy.take)
        compare = copy.compare()
        futures = ([self._copier.submit(copy.pairs)] if copy.pairs else []) + (
            [self._copier.run([compare])] if compare is not None else [])
        if futures:
            self._hold_next_step()
            copy.started(futures)
        return state, futures, copy

    def _hold_next_step(self) -> None:
        """Make the next ``optimizer.step()`` wait for the :class:`StateCopier` (a step pre-hook, registered once)."""
        if self._copy_hook is None or self._copy_hook not in self._handles:
            self._copy_hook = self.optimizer.register_step_pre_hook(self._await_state_copy)
            self._handles.append(self._copy_hook)  # removed with the recorder's hooks

    def _await_state_copy(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Step pre-hook: the optimizer state's copy of the previous step is finished before this step changes it."""
        self._copier.wait()

    def _write_step(self, record: StepRecord, theta_next: dict[str, Tensor], updates: dict[str, LinearUpdate],
                    st: dict[str, Any], buffers: dict[str, Tensor] | None = None, audit: Any = None,
                    dense: dict[str, Tensor] | None = None, copying: Future | None = None) -> None:
        """Hand step ``record.step`` to the writer (``dense``: :meth:`_dense_tensors`, built once by the caller;
        ``copying``: the copy of ``theta_next`` still being made, which the writer waits for)."""
        assert self._writer is not None
        if self._every > 1:
            self._write_sparse(record, theta_next, updates, st, buffers, audit)
            return
        tensors: dict[str, Tensor] = {f"param.{n}": t for n, t in theta_next.items()}
        tensors.update(self._dense_tensors(st, updates, buffers) if dense is None else dense)
        due = self._state_due(record.step)
        state, copied, copy = self._optimizer_state_async(audit) if due else (None, [], None)
        filled = self._fill_coefficients()
        self._writer.write_step(record, tensors, state, prepare=self._prepare(audit, copying, *copied, filled,
                                                                              share=copy),
                                done=self._release(copy, self._theta_handoff,
                                                   None if self._coefs is None else self._coefs.take()),
                                held_bytes=self._momentum_bytes(record.step))

    def _step_record(self, st: dict[str, Any], buffers: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """What every step file keeps, dense or sparse: the batch, the changed buffers, the micro-batches' states."""
        tensors = {"batch.indices": st["indices"], "batch.weights": st["weights"], **pack_buffers(buffers)}
        if self._manifest.random_capture or is_batch_coupled(self._loss):  # where a coupled loss's terms stop
            tensors.update(pack_micro_batches(st["micro"]))
        return tensors

    # ----------------------------------------------------------------- sparse stores
    def _write_sparse(self, record: StepRecord, theta_next: dict[str, Tensor], updates: dict[str, LinearUpdate],
                      st: dict[str, Any], buffers: dict[str, Tensor] | None, audit: Any) -> None:
        """A step of a sparse store: a checkpoint where the layout says; others wait for the next step (or the end).

        The step before is written once this one exists; the last one is a full checkpoint (:meth:`_final_checkpoint`).
        """
        if self._deferred is not None:
            self._emit_sparse(*self._deferred, checkpoint=self._deferred_params, state=False)
            self._deferred = None
        names = {id(p): n for n, p in self.model.named_parameters()}
        replay = StepReplay(group_snapshot(self.optimizer, names), st["stepped"], tuple(sorted(st["no_input"])))
        packed = pack_updates(tuple(self._params), updates)
        tensors = {"update.scalars": packed["update.scalars"], **self._step_record(st, buffers)}
        layout = self._sparse_layout(theta_next, packed)
        pending = (record, theta_next, tensors, replay, audit)
        if layout.stores_state(record.step):
            self._emit_sparse(*pending, checkpoint=True)
        else:  # written at the next step, or as the full checkpoint of the last step when none comes
            self._deferred, self._deferred_params = pending, layout.stores_params(record.step)

    def _sparse_layout(self, theta: dict[str, Tensor], packed: dict[str, Tensor]) -> SparseLayout:
        """The :class:`SparseLayout`, chosen at the first step this recorder writes from the measured sizes."""
        if self._layout is None:
            size = tensor_bytes(theta.values())
            extra = tensor_bytes(t for k, t in packed.items() if k != "update.scalars")
            state = state_bytes(self.optimizer)
            self._layout = SparseLayout.choose(self._every, size, state, extra)
            logger.info("Sparse store %s: %s (%d theta bytes, %d optimizer state bytes, %d coefficient bytes per "
                        "dense step).", self._store, self._layout, size, state, extra)
        return self._layout

    def _emit_sparse(self, record: StepRecord, theta_next: dict[str, Tensor], tensors: dict[str, Tensor],
                     replay: StepReplay, audit: Any, *, checkpoint: bool, state: bool = True) -> None:
        assert self._writer is not None
        if checkpoint:
            tensors = {**{f"param.{n}": t for n, t in theta_next.items()}, **tensors}
        saved = self._optimizer_state() if checkpoint and state else None
        self._writer.write_step(record.model_copy(update={"has_params": checkpoint}), tensors, saved,
                                replay.encode(), prepare=self._prepare(audit), done=self._release(saved, None))

    def _final_checkpoint(self, failing: bool) -> None:
        """At the end of recording: the last step of a sparse store becomes a checkpoint (theta, optimizer state)."""
        pending, self._deferred = self._deferred, None
        if pending is None or self._writer is None or self._broken is not None:
            return
        try:
            self._emit_sparse(*pending, checkpoint=True)
        except BaseException as exc:
            self._broken = f"the final checkpoint, step {pending[0].step} ({type(exc).__name__}: {exc})"
            if not failing:
                raise
            logger.exception("Writing the final checkpoint failed while handling another error.")
