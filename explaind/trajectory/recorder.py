r"""Recording a training run from the user's own loop (docs/recording.md).

:class:`TrajectoryRecorder` attaches to a live model and optimizer through hooks only
(``optimizer.register_step_pre_hook`` / ``register_step_post_hook`` and
``Tensor.register_post_accumulate_grad_hook``) and records, for every ``optimizer.step()``:
``theta_{s+1}``, one :class:`~explaind.recurrence.LinearUpdate` per trainable parameter (from the
optimizer adapter), the logged batch ``(indices, weights)``, the measured gradient scale ``c_s``
and the audit residual. Steps go to an :class:`~explaind.trajectory.memory.InMemoryTrajectory`
or to a store directory (:mod:`explaind.trajectory.store`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..exceptions import ConfigError, TrajectoryError
from ._attribute_check import RecorderAttributesMixin, attribute_watch
from ._audit import UpdateAudit
from ._buffers import BufferTracker
from ._checks import AUTO_CHECK_EVERY, AUTO_CHECK_STEPS, autocast_tolerance, default_tolerance, unscaled_without_scaler
from ._common import (
    TrainData,
    architecture_spec,
    loss_name,
    note_full_graph,
    resolve_loss_record,
    split_model_tensors,
    validate_indices,
    validate_weights,
)
from ._forward_probe import AutocastProbe
from ._gradients import GradientTap, is_power_of_two
from ._interrupts import refuse_second_run
from ._optimizer_state_watch import OptimizerStateWatch
from ._participation import (
    check_optimizer_params,
    collect_updates,
    refuse_unknown_grad_scaler,
    stepped_parameters,
    stepped_without_backward,
)
from ._processes import left_in_fork, mark_owner, refuse_step_in_fork
from ._random import RandomCapture
from ._recorder_checks import LoggedBatch, RecorderChecksMixin
from ._recorder_store import RecorderStoreMixin
from ._setup import framework_originals, prepare_directory, refuse_invalid_arguments, store_root
from ._start_optimizer import OptimizerStart, capture_optimizer_start
from ._start_state import capture_start_state
from .disk import DiskTrajectory
from .manifest import StepRecord, TrajectoryManifest, dtype_name, tensor_specs
from .memory import InMemoryTrajectory
from .store import StoreWriter

__all__ = ["TrajectoryRecorder", "AUTO_CHECK_STEPS", "AUTO_CHECK_EVERY"]

logger = logging.getLogger(__name__)

class TrajectoryRecorder(RecorderStoreMixin, RecorderChecksMixin, RecorderAttributesMixin):
    r"""Record a training run for exact kernel replicas and influence scores.

    Parameters
    ----------
    model : nn.Module
        The model being trained. Parameters with ``requires_grad=True`` are recorded per step
        (``trajectory.param_names``); frozen parameters and buffers are stored once as constants (``record_frozen``).
    optimizer : torch.optim.Optimizer
        Handled by a registered optimizer adapter; Fabric's and accelerate's wrappers: the optimizer they wrap.
    loss : str, LossRecord or callable
        The training loss: a registered name (``"cross_entropy"``, ``"nll"``, ``"mse"``) or
        ``loss_fn(outputs, targets) -> mean loss``.
    train_data : (X, y) or Dataset, optional
        The training set the logged indices refer to (validates indices, enables the gradient check,
        stored with the run when ``store_data``).
    store : str or Path, optional
        Directory of an on-disk store; ``None`` keeps the trajectory in memory.
    overwrite, resume : bool
        What to do when ``store`` already holds a run: replace it, or continue after its last
        complete step (call :meth:`restore` before the loop). Otherwise it is refused.
    audit : bool or "auto"
        Replay every step with the adapter's coefficients and the gradient the optimizer saw and
        record :math:`\|E_s\|/\|\Delta\theta_s\|` (``trajectory.audit()``; NaN when off). ``"auto"``: on.
    check_gradients : bool, int, "auto" or collection of int
        Recompute :math:`\sum_k w_k\nabla\ell_k(\theta_s)` from ``train_data`` and the loss and compare
        it with the gradient of ``backward()`` over the parameters the optimizer steps: ``True`` every
        step, an int ``k`` every ``k``-th step, a collection of step numbers exactly those, ``"auto"``
        steps ``0..AUTO_CHECK_STEPS-1``, every power of 4 and every :data:`AUTO_CHECK_EVERY`-th step
        when ``train_data`` is given and the model has no active dropout or batch norm. A mismatch
        raises ``TrajectoryError`` naming the step; the measured mismatch is kept per step
        (``trajectory.gradient_check()``). The check also measures the user's loss scale
        :math:`\sigma` (e.g. ``1/k`` when the loop divides the loss by ``k`` micro-batches); the latest
        measured :math:`\sigma` multiplies ``c_s`` of every later step (1 until measured). Once it moves
        between two checks (a loss-weight warm-up), every later step is checked, with a warning naming
        the steps recorded in between.
    store_data : bool
        Store ``train_data`` in the store (``data.safetensors``).
    save_optimizer_state : bool or int
        Store the optimizer's ``state_dict`` after every step (``True``), every ``k``-th step (an int
        ``k``) or never, keeping the latest two, so :meth:`restore` can resume exactly. Resuming
        continues after the last stored state: with ``k > 1`` the steps recorded after it are
        dropped and recorded again. With ``checkpoint_every > 1`` the state is stored at every full checkpoint.
    checkpoint_every : int
        A sparse store (docs/recording.md "Sparse checkpoints") of at most ``1/k`` of the dense store's
        bytes plus the per-step records: :math:`\theta` every ``k`` steps and the optimizer state every
        ``m k`` steps, or both every ``m k`` steps when the state is larger than what ``k`` dense steps
        hold (``m`` chosen from the measured sizes), and both at the last step; the other steps keep
        their batch, scalars, changed buffers and random states and are replayed from the nearest
        checkpoint when read (needs the training data). ``1``: every step.
    background_writes : bool
        Write step files on the store's writer thread, and in memory run the update audit on a worker
        thread, at most 4 steps behind; failures surface at the next step or exit. With a store the audit
        runs at the step (it then needs one copy of the parameters, not two; docs/recording.md).
    fsync : bool
        ``fsync`` every stored file.
    gradient_tolerance : float, optional
        Relative tolerance of the gradient comparisons (default 1e-7 in float64, 1e-3 in float32; the
        gradient check widens it to 3e-2 when the forward ran under float16 autocast, 1.5e-1 under bfloat16).
    grad_scaler : torch.amp.GradScaler, optional
        The loop's loss scaler. Its scale ``S_s`` at each step is recorded (``raw = S_s * gradient``),
        so ``c_s`` is the factor between the unscaled gradient the optimizer sees and the batch gradient
        (1 without clipping). Required when ``optimizer.step()`` is called through ``scaler.step``.
    record_frozen : bool
        Also record the parameters with ``requires_grad=False`` at the start (as not moving while
        frozen), so they may be unfrozen later; by default they are constants and stepping one is refused.
    extras : dict, optional
        JSON metadata stored in ``manifest.extras``.
    capture_random : bool or "auto"
        Save the random generators' state before every training forward and tie it to its
        micro-batch, so dropout masks and batch statistics are replayed exactly (docs/recording.md,
        "Dropout and batch norm"); ``"auto"``: when the model has dropout, batch norm or a private generator.
        ``True`` for a forward that draws random numbers outside such modules (``F.dropout``,
        ``torch.rand`` in ``forward``): its training forwards are then always replayed.
    generators : list of torch.Generator, optional
        Private generators the model draws from (``torch.rand(..., generator=g)`` in a custom layer) that are not
        attributes of its modules; those held as module attributes, directly or in list, tuple and dict attributes,
        are found without this (a helper object's are not). A loss callable holding a generator is refused (it is
        applied one sample at a time). Their states are captured with the global ones and replayed
        (docs/recording.md, "Private generators"); a stored run needs them again,
        ``Trajectory.load(path, generators=[...])``. One neither found nor passed is not replayed: the gradient
        check fails on it.
    ignore_attributes : list of str
        ``fnmatch`` patterns of the Python attributes (``"tau"``, ``"encoder.*.p"``) not watched for changes between
        steps (docs/recording.md, "Python attributes changed between steps"); ``["*"]`` watches none.

    Notes
    -----
    Call :meth:`log_batch` after ``backward()`` and before ``optimizer.step()``; several calls before one step are
    micro-batches of gradient accumulation. The scale ``c_s`` is measured: gradients are snapshotted after
    ``backward()`` and compared with what the optimizer sees, so ``clip_grad_norm_`` (a global factor) is recorded
    exactly; a per-coordinate change is an error. Gradients are compared by value, so in-place changes
    (``GradScaler.unscale_``, clipping, edits) are all seen. A step that ``GradScaler`` skips (inf/nan gradients)
    records nothing: its logged batch is dropped when the next accumulation begins. The parameters a step moves are
    read from the live optimizer at every step (subsets, ``add_param_group``, freezing mid-run).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss: Any,
        train_data: Any = None,
        store: str | Path | None = None,
        overwrite: bool = False,
        resume: bool = False,
        audit: bool | str = "auto",
        check_gradients: bool | int | str = "auto",
        store_data: bool = True,
        save_optimizer_state: bool | int = True,
        checkpoint_every: int = 1,
        background_writes: bool = True,
        fsync: bool = True,
        gradient_tolerance: float | None = None,
        extras: dict[str, Any] | None = None,
        grad_scaler: Any = None,
        record_frozen: bool = False,
        capture_random: bool | str = "auto",
        generators: Any = None,
        ignore_attributes: Any = (),
    ):
        from ..plugins import resolve_optimizer_adapter
        self.model, self.optimizer = model, optimizer = framework_originals(model, optimizer)  # Fabric, accelerate
        refuse_invalid_arguments(model, optimizer, loss=loss, audit=audit, grad_scaler=grad_scaler, switches={
            "store_data": store_data, "background_writes": background_writes, "fsync": fsync})
        self._loss = resolve_loss_record(loss)
        self._adapter_record = resolve_optimizer_adapter(optimizer)
        self._adapter = self._adapter_record.implementation.from_optimizer(optimizer)
        self._restored = False  # restore() called, or the optimizer found holding the resumed store's state
        self._params, constants = split_model_tensors(model)
        self._constant_params = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        if record_frozen:
            self._params = dict(model.named_parameters())
            constants = {n: t for n, t in constants.items() if n not in self._constant_params}
            self._constant_params = {}
        self._constant_names = tuple(constants)
        self._random = RandomCapture(model, capture_random, generators, loss)
        self._buffers = BufferTracker(model, self._constant_names)
        self._attributes = attribute_watch(model, ignore_attributes)
        if not self._params:
            raise ConfigError("The model has no trainable parameters (requires_grad=True); nothing to record.")
        check_optimizer_params(model, optimizer, self._params, loss)
        self._data = TrainData(train_data) if train_data is not None else None
        first = next(iter(self._params.values()))
        self._dtype = first.dtype
        self._tol = float(gradient_tolerance) if gradient_tolerance is not None else default_tolerance(self._dtype)
        self._audit_on = audit is not False
        self._scaler = grad_scaler
        self._schedule = self._resolve_check(check_gradients)
        self._store = store_root(store) if store is not None else None  # '~' expanded; fixed against os.chdir
        self._storage_options(save_optimizer_state, checkpoint_every)
        self._store_data = bool(store_data)
        self._background, self._fsync = bool(background_writes), bool(fsync)
        hp = json.loads(json.dumps(self._adapter.hyperparameters(), default=str))
        self._manifest = TrajectoryManifest(
            explaind_version=__version__, dtype=dtype_name(self._dtype),
            params=tensor_specs({n: p.detach() for n, p in self._params.items()}), constants=tensor_specs(constants),
            adapter=self._adapter_record.name, adapter_hyperparameters=hp,
            optimizer_class=f"{type(optimizer).__module__}.{type(optimizer).__name__}", loss=loss_name(self._loss),
            architecture=architecture_spec(model), n_train=len(self._data) if self._data is not None else None,
            extras=dict(extras or {}), coupled=self._random.coupled, random_capture=self._random.enabled,
            generators=self._random.generator_names, buffer_names=list(self._buffers.names), param_stride=self._every,
        )
        self._resumed = self._restarted = False
        if self._store is not None:
            self._resumed = prepare_directory(self._store, overwrite=overwrite, resume=resume)
            self._restarted = resume and not self._resumed
            if self._resumed:
                self._manifest = self._validate_resume()
        elif resume:
            raise ConfigError("resume=True needs store=<path of the stored run>.")
        self._n = self._manifest.n_steps if self._resumed else 0
        self._schedule.start = self._n
        self._sigma, self._sigma_shape, self._sigma_at, self._sigma_moved = 1.0, None, None, False
        self._checked_c: float | None = None  # the in-between factor at the latest checked step
        self._loss_checked = False
        self.skipped_batches = 0  # micro-batches of steps GradScaler skipped
        self._active = False
        self._broken: str | None = None
        self._pending: list[LoggedBatch] = []
        self._step_state: dict[str, Any] | None = None
        self._last_indices: Tensor | None = None  # the last step's samples (the attribute test at the end)
        self._handles: list[Any] = []
        self._tap = GradientTap(self._params, self._pool.copy, self._copier)
        self._probe = AutocastProbe(model, self._tap, first.device.type, self._manifest.extras)
        self._auditor = UpdateAudit()
        self._memory: InMemoryTrajectory | None = None
        self._writer: StoreWriter | None = None
        self._theta: dict[str, Tensor] | None = None
        self._frozen: dict[str, Tensor] = {}
        self._start_state: dict[str, Tensor] = {}  # m_{-1} of an optimizer that holds state at the start
        self._start_optimizer: OptimizerStart | None = None  # and its whole state (replays of the optimizer)

    # ----------------------------------------------------------------- public API
    @property
    def n_steps(self) -> int:
        """Number of steps recorded so far (including those of a resumed run)."""
        return self._n

    def log_batch(self, indices: Any, weights: Any = None) -> None:
        r"""Log the samples of the current (micro-)batch; call after ``backward()``, before ``optimizer.step()``.

        Parameters
        ----------
        indices : 1-D int tensor, array or sequence, shape (n,)
            Dataset positions of the samples (repeats allowed).
        weights : 1-D float tensor, shape (n,), optional
            :math:`w_{s,k}`; default ``1/n`` each (the mean reduction), or token shares for e.g. ``"causal_lm"``.
        """
        if not self._active:
            raise TrajectoryError(
                "rec.log_batch() was called outside the recorder: wrap the training loop in `with rec:`."
            )
        idx = validate_indices(indices, len(self._data) if self._data is not None else None)
        w = validate_weights(weights, idx, self._dtype, self._loss, self._data)
        self._drop_skipped_step()
        forwards, state, eval_forwards = self._random.take()
        self._refuse_forwards(forwards, eval_forwards)  # none, or several (R-drop's two calls of the model)
        self._pending.append(LoggedBatch(idx, w, self._tap.seq, self._tap.finite_since(-1), forwards, state,
                                         eval_forwards, backwards=self._tap.take_backwards()))

    def _drop_skipped_step(self) -> None:
        """Forget the batches of a step ``GradScaler`` skipped: the last one saw a non-finite accumulated gradient,
        and finite gradients since mean the accumulation restarted (a non-finite sum stays non-finite) without a step.
        """
        if not self._pending or self._pending[-1].finite is not False:
            return
        last = self._pending[-1].seq
        if self._tap.finite_since(last) is not True:
            return
        logger.info("Step %d was skipped (non-finite gradients, e.g. GradScaler overflow): %d logged micro-batch(es) "
                    "dropped, nothing recorded for it.", self._n, len(self._pending))
        self.skipped_batches += len(self._pending)
        self._pending.clear()
        self._tap.forget_until(last)

    @property
    def trajectory(self) -> Any:
        """The recorded :class:`~explaind.trajectory.base.Trajectory` (in memory, or read from the store)."""
        if self._store is None:
            if self._memory is None:
                raise TrajectoryError("Nothing recorded yet: use the recorder as a context manager (`with rec:`).")
            self._check_worker(wait=True)  # the audits still running
            return self._memory
        if self._writer is not None:
            self._writer.flush()
        return self._with_final_state(DiskTrajectory(self._store, model=self.model, train_data=self._data,
                                                     loss=self._loss, generators=self._random.extra))

    # ----------------------------------------------------------------- context
    def __enter__(self) -> TrajectoryRecorder:
        if self._active:
            raise TrajectoryError("This recorder is already active; `with rec:` cannot be nested.")
        refuse_second_run(self, self._store, self._memory is not None)  # _interrupts.py
        mark_owner(self)  # a forked process neither steps nor closes the store (_processes.py)
        if self._data is not None and not self._resumed:
            self._data.follow()  # an edit of X or y before `with rec:` is the data the first step reads
        theta = {n: p.detach().clone() for n, p in self._params.items()}
        state = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        constants = {k: state[k].detach().clone() for k in self._constant_names}
        if not self._resumed:  # a resumed store keeps its own start; restore() loaded the state it saved
            self._start_state = capture_start_state(self._adapter, self._adapter_record.name, self.optimizer,
                                                    self._params)
            self._start_optimizer = capture_optimizer_start(self.optimizer, self.model)
            self._auditor.momentum = {n: m.clone() for n, m in self._start_state.items()}
        if self._store is None:
            self._memory = InMemoryTrajectory(self.model, loss=self._loss, initial_params=theta, constants=constants,
                                              train_data=self._data, manifest=self._manifest,
                                              generators=self._random.extra, initial_state=self._start_state,
                                              optimizer_start=self._start_optimizer)
        else:
            self._open_store(theta, constants)
        self._theta = theta
        self._frozen = {n: constants[n] for n in self._constant_params}  # as stored: edits are refused
        self._tap.attach()
        self._probe.attach()
        self._random.attach()
        self._buffers.start()
        self._attributes.start()
        watch = OptimizerStateWatch(self._adapter_record.name, self._params, lambda: self._n, self._copier,
                                    self._schedule.due)
        self._handles = [  # the momentum watch's hooks first: an edit of the optimizer's state is refused first
            *watch.hooks(self.optimizer), self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step), *watch.settle_hooks(self.optimizer),
        ]
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if left_in_fork(self):
            return
        self._end_attributes(exc_type is None and self._n > self._schedule.start, self._last_indices)  # hooks on
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for part in (self._tap, self._probe, self._random):
            part.detach()
        self._buffers.stop()
        note_full_graph(exc)  # torch.compile(fullgraph=True) refusing the recorder's hooks: say so
        self._active = False
        if exc_type is None and (self._n > self._schedule.start or self._pending):
            self._warn_final_edits()
        if self._pending:
            if self._pending[-1].finite is False:
                logger.info("The last step was skipped (non-finite gradients); its %d micro-batch(es) were dropped.",
                            len(self._pending))
                self.skipped_batches += len(self._pending)
            else:
                logger.warning("%d logged micro-batch(es) were not followed by optimizer.step(); dropped.",
                               len(self._pending))
            self._pending.clear()
        self._close_worker(exc_type is not None)
        if self._writer is not None:
            try:
                self._final_checkpoint(exc_type is not None)
            finally:
                writer, self._writer = self._writer, None
                try:
                    writer.close(complete=exc_type is None and self._broken is None)
                except TrajectoryError:
                    if exc_type is None:
                        raise
                    logger.exception("Closing the trajectory store failed while handling another error.")

    # ----------------------------------------------------------------- hooks
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        refuse_step_in_fork(self)
        if self._broken is not None:
            raise TrajectoryError(f"Recording stopped after an error at {self._broken}; start a new recorder.")
        if self._writer is not None:
            self._writer.check()
        self._check_worker()
        refuse_unknown_grad_scaler(self._scaler, self._n)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            return self._begin_step(optimizer)

        def run() -> Any:  # step(closure) (e.g. Lightning): the gradients exist once the closure has run
            value = closure()
            self._begin_step(optimizer)
            return value

        return (args if "closure" in kwargs else args[:1] + args[2:]), {**kwargs, "closure": run}

    def _begin_step(self, optimizer: Any) -> None:
        s = self._n
        if not self._pending:
            return self._skip_or_refuse_empty(s)
        try:
            self._step_state = self._prepare_step(optimizer, s)
        except BaseException:
            self._pending.clear()
            self._tap.reset()
            self._probe.reset()
            raise

    def _prepare_step(self, optimizer: Any, s: int) -> dict[str, Any]:
        """Everything the pre-step hook measures: participation, ``c_s``, the gradient check, the adapter's state."""
        with self._edits_checked(s):  # parameters changed outside the step are refused first
            indices = torch.cat([e.indices for e in self._pending])
            weights = torch.cat([e.weights for e in self._pending])
            stepped = stepped_parameters(self.model, optimizer, self._params, self._constant_params, s)
            seen = {n: self._params[n].grad for n in stepped}
            no_input = stepped_without_backward(self._tap, seen, s)
            c_in = self._tap.measure(seen, s, self._tol)
        amp = float(self._scaler.get_scale()) if self._scaler is not None and self._scaler.is_enabled() else None
        autocast = self._probe.dtype
        tol = autocast_tolerance(autocast, self._tol)
        suspicious = amp is None and c_in != 1.0 and is_power_of_two(c_in) and c_in != self._checked_c
        moved = self._buffers.take_moved()  # buffers changed between steps: check this step, or warn
        self._check_attributes(s)  # Python attributes, submodules, modes, hooks changed between steps: refused
        moved_scale = self._probe.cotangents.moved(self._pending, self._data, self._loss, autocast, s,
                                                   self._schedule.never) and not self._schedule.never
        due = (self._schedule.due(s) or (suspicious and self._data is not None) or self._sigma_stale() or moved_scale
               or (bool(moved) and self._data is not None and not self._schedule.never))
        if suspicious and not due:
            raise unscaled_without_scaler(s, c_in)
        device = next(iter(self._params.values())).device
        if not self._loss_checked and self._data is not None:
            self._check_loss_callable(device)
        check = None
        if due:  # what the recorder holds only for later gives its memory to the check
            with self._room_for_check():
                check = self._check_gradient(seen, no_input, indices, weights, device, s, tol, autocast, moved)
        else:
            self._warn_moved_buffers(moved, s)
        if check is not None:
            self._take_sigma(check.sigma / (amp or 1.0), autocast, tol, c_in, s)
        before = self._adapter.before_step(optimizer)
        return {"indices": indices, "weights": weights, "micro": self._micro_batches(),
                "scale": c_in * (amp or 1.0) * self._sigma, "stepped": tuple(stepped), "check": check, "amp": amp,
                "autocast": autocast, "no_input": no_input, "seen": seen if self._audit_on else None,
                "before": before}

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        s, st, copying = self._n, self._step_state, None
        if st is not None and st.get("skipped"):  # no logged batch and no gradient: _skip_or_refuse_empty
            self._step_state = None
            return self._attributes.arm()  # the next step's values are those of its own first forward
        assert st is not None and self._theta is not None
        try:
            copying = None if self._pooled() else self._copy_params()  # theta_{s+1}, beside the bookkeeping below
            updates = collect_updates(self._params, self._adapter_updates(optimizer, st["before"]),
                                      st["no_input"], s, getattr(self._adapter, "fresh_tensors", False) is True)
            buffers, self._last_indices = self._buffers.changed(), st["indices"]
            self._attributes.arm()
            dense = self._dense_tensors(st, updates, buffers)
            theta_next, audit, copying = self._next_theta(s, st, updates, dense, copying)  # store: the audit too
            check = st["check"]
            record = StepRecord(step=s, n_samples=int(st["indices"].shape[0]), grad_scale=float(st["scale"]),
                                loss_scale=None if check is None else check.sigma,
                                gradient_check=None if check is None else check.mismatch, amp_scale=st["amp"],
                                autocast=None if st["autocast"] is None else dtype_name(st["autocast"]),
                                buffers=True if buffers is not None else None)
            if self._memory is not None:
                self._memory._append(theta_next, updates, st["indices"], st["weights"], record.grad_scale, math.nan,
                                     record.loss_scale, validate=False, record=record, micro=st["micro"],
                                     buffers=buffers)
                self._audit_in_memory(s, audit)
            else:
                self._write_step(record, theta_next, updates, st, buffers, audit, dense, copying.future)
                copying.wait()  # the loop may edit the parameters once this hook returns
        except BaseException as exc:
            self._broken = f"step {s} ({type(exc).__name__}: {exc})"
            raise
        finally:
            if copying is not None and copying.future is not None:
                copying.future.exception()  # not reading the parameters any more (its error was raised above)
            self._pending.clear()
            self._tap.reset()
            self._probe.reset()
            self._step_state = None
        self._n += 1
