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
from ..recurrence import LinearUpdate
from ._common import (
    TrainData,
    architecture_spec,
    loss_name,
    resolve_loss_record,
    split_model_tensors,
    validate_indices,
    validate_weights,
)
from ._gradients import GradientTap, UpdateAudit, check_batch_gradient, default_tolerance, has_stochastic_layers
from ._io import decode_optimizer_state, encode_optimizer_state, read_tensors
from .disk import DiskTrajectory, check_model_matches
from .manifest import StepRecord, TrajectoryManifest, dtype_name, tensor_specs
from .memory import InMemoryTrajectory
from .store import StoreWriter, pack_updates, prepare_directory, read_manifest

__all__ = ["TrajectoryRecorder", "AUTO_CHECK_STEPS"]

logger = logging.getLogger(__name__)

#: With ``check_gradients="auto"`` the first steps checked (when possible).
AUTO_CHECK_STEPS = 3
_UNCHANGED = LinearUpdate(a=1.0, b=0.0, P=0.0)


def _own(u: LinearUpdate) -> LinearUpdate:
    """``u`` with detached copies of its tensor coefficients (an adapter may reuse its buffers next step)."""
    values = vars(u)
    if not any(isinstance(v, Tensor) for v in values.values()):
        return u
    return LinearUpdate(**{k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in values.items()})


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[tuple[int, int, Tensor]]:
    return [(g, i, p) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])]


class TrajectoryRecorder:
    r"""Record a training run for exact kernel replicas and influence scores.

    Parameters
    ----------
    model : nn.Module
        The model being trained. Parameters with ``requires_grad=True`` are recorded per step
        (``trajectory.param_names``); frozen parameters and buffers are stored once as constants.
    optimizer : torch.optim.Optimizer
        Its class must be handled by a registered optimizer adapter.
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
    check_gradients : bool, int or "auto"
        Recompute :math:`\sum_k w_k\nabla\ell_k(\theta_s)` from ``train_data`` and the loss and compare
        it with the gradient of ``backward()``: ``True`` every step, an int ``k`` every ``k``-th step,
        ``"auto"`` the first :data:`AUTO_CHECK_STEPS` steps when ``train_data`` is given and the model has
        no active dropout or batch norm. A mismatch raises ``TrajectoryError`` naming the step. The
        check also measures the user's loss scale :math:`\sigma` (e.g. ``1/k`` when the loop divides
        the loss by ``k`` micro-batches); the latest measured :math:`\sigma` multiplies ``c_s`` of every
        later step (1 until measured), so a loop that rescales its loss must be checked at least once.
    store_data : bool
        Store ``train_data`` in the store (``data.safetensors``).
    save_optimizer_state : bool or int
        Store the optimizer's ``state_dict`` after every step (``True``), every ``k``-th step (an int
        ``k``) or never, keeping the latest two, so :meth:`restore` can resume exactly. Resuming
        continues after the last stored state: with ``k > 1`` the steps recorded after it are
        dropped and recorded again.
    background_writes : bool
        Write step files on a worker thread (bounded queue); failures surface at the next step or at exit.
    fsync : bool
        ``fsync`` every stored file.
    gradient_tolerance : float, optional
        Relative tolerance of the gradient comparisons (default 1e-7 in float64, 1e-3 in float32).
    extras : dict, optional
        JSON metadata stored in ``manifest.extras``.

    Notes
    -----
    Call :meth:`log_batch` after ``backward()`` and before ``optimizer.step()``; several calls
    before one step are micro-batches of gradient accumulation. The scale ``c_s`` is measured:
    gradients are snapshotted after ``backward()`` and compared with what the optimizer sees, so
    ``clip_grad_norm_`` (a global factor) is recorded exactly; a per-coordinate change is an error.
    A torch ``GradScaler`` changes the loss scale between steps: record it with ``check_gradients=True``.
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
        background_writes: bool = True,
        fsync: bool = True,
        gradient_tolerance: float | None = None,
        extras: dict[str, Any] | None = None,
    ):
        from ..plugins import resolve_optimizer_adapter

        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if not (audit is True or audit is False or audit == "auto"):
            raise ConfigError(f"audit={audit!r} is not allowed. Choose one of: 'auto', True, False.")
        flag = check_gradients is True or check_gradients is False or check_gradients == "auto"
        if not (flag or (type(check_gradients) is int and check_gradients > 0)):
            raise ConfigError(
                f"check_gradients={check_gradients!r} is not allowed. Choose 'auto', True, False or a positive int k "
                f"(check every k-th step)."
            )
        self.model, self.optimizer = model, optimizer
        self._loss = resolve_loss_record(loss)
        self._adapter_record = resolve_optimizer_adapter(optimizer)
        self._adapter = self._adapter_record.implementation.from_optimizer(optimizer)
        self._params, constants = split_model_tensors(model)
        if not self._params:
            raise ConfigError("The model has no trainable parameters (requires_grad=True); nothing to record.")
        self._check_optimizer_params()
        self._data = TrainData(train_data) if train_data is not None else None
        first = next(iter(self._params.values()))
        self._dtype = first.dtype
        self._tol = float(gradient_tolerance) if gradient_tolerance is not None else default_tolerance(self._dtype)
        self._audit_on = audit is not False
        self._check = self._resolve_check(check_gradients)
        self._store = Path(store) if store is not None else None
        if not (isinstance(save_optimizer_state, bool) or (type(save_optimizer_state) is int and
                                                           save_optimizer_state > 0)):
            raise ConfigError(
                f"save_optimizer_state={save_optimizer_state!r} is not allowed. Choose True, False or a positive int "
                f"k (store the optimizer state every k steps)."
            )
        self._store_data = bool(store_data)
        self._state_every = int(save_optimizer_state) if save_optimizer_state is not False else 0
        self._background, self._fsync = bool(background_writes), bool(fsync)
        hp = json.loads(json.dumps(self._adapter.hyperparameters(), default=str))
        self._manifest = TrajectoryManifest(
            explaind_version=__version__, dtype=dtype_name(self._dtype),
            params=tensor_specs({n: p.detach() for n, p in self._params.items()}), constants=tensor_specs(constants),
            adapter=self._adapter_record.name, adapter_hyperparameters=hp,
            optimizer_class=f"{type(optimizer).__module__}.{type(optimizer).__name__}", loss=loss_name(self._loss),
            architecture=architecture_spec(model), n_train=len(self._data) if self._data is not None else None,
            extras=dict(extras or {}),
        )
        self._resumed = False
        if self._store is not None:
            self._resumed = prepare_directory(self._store, overwrite=overwrite, resume=resume)
            if self._resumed:
                self._manifest = self._validate_resume()
        elif resume:
            raise ConfigError("resume=True needs store=<path of the stored run>.")
        self._n = self._manifest.n_steps if self._resumed else 0
        self._sigma = 1.0
        self._active = False
        self._broken: str | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._step_state: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._tap = GradientTap(self._params)
        self._auditor = UpdateAudit()
        self._memory: InMemoryTrajectory | None = None
        self._writer: StoreWriter | None = None
        self._theta: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- validation
    def _check_optimizer_params(self) -> None:
        model_ids = {id(p) for p in self.model.parameters()}
        foreign = [(g, i, p) for g, i, p in _optimizer_params(self.optimizer) if id(p) not in model_ids]
        if foreign:
            listed = "; ".join(f"group {g} position {i} shape {tuple(p.shape)}" for g, i, p in foreign)
            raise TrajectoryError(
                f"The optimizer holds {len(foreign)} parameter tensor(s) that are not parameters of the model: "
                f"{listed}. Build the optimizer from model.parameters() of the model passed to the recorder."
            )
        in_opt = {id(p) for _, _, p in _optimizer_params(self.optimizer)}
        idle = [n for n, p in self._params.items() if id(p) not in in_opt]
        if idle:
            logger.warning("Trainable parameters not in the optimizer are recorded as unchanged: %s", idle)

    def _resolve_check(self, check: bool | int | str) -> int:
        """0 = never, -1 = first AUTO_CHECK_STEPS steps, k = every k-th step."""
        if check is False:
            return 0
        if check == "auto":
            if self._data is None or has_stochastic_layers(self.model):
                return 0
            return -1
        if self._data is None:
            raise ConfigError(
                f"check_gradients={check!r} needs the training data: pass train_data=(X, y) or set "
                f"check_gradients=False."
            )
        return 1 if check is True else int(check)

    def _validate_resume(self) -> TrajectoryManifest:
        assert self._store is not None
        stored = read_manifest(self._store)
        check_model_matches(self.model, stored, repr(str(self._store)))
        for field, new in (("adapter", self._manifest.adapter), ("loss", self._manifest.loss)):
            if getattr(stored, field) != new:
                raise TrajectoryError(
                    f"Cannot resume the run at {str(self._store)!r}: it was recorded with {field} "
                    f"{getattr(stored, field)!r}, this recorder uses {new!r}."
                )
        point = len(stored.steps)
        while point > 0 and stored.steps[point - 1].optimizer_state is None:
            point -= 1
        if point < len(stored.steps):
            logger.warning("Resuming %s at step %d, the last step with a stored optimizer state; the %d later "
                           "step(s) are recorded again.", self._store, point, len(stored.steps) - point)
            stored.steps = stored.steps[:point]
            stored.n_steps = point
        return stored

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
            :math:`w_{s,k}`; default ``1/n`` for every sample (the mean reduction of this micro-batch).
        """
        if not self._active:
            raise TrajectoryError(
                "rec.log_batch() was called outside the recorder: wrap the training loop in `with rec:`."
            )
        idx = validate_indices(indices, len(self._data) if self._data is not None else None)
        self._pending.append((idx, validate_weights(weights, idx, self._dtype)))

    def restore(self) -> int:
        """Load ``theta_N`` and the stored optimizer state into the model and optimizer; returns ``N``.

        Use with ``resume=True`` before the loop, then continue training from step ``N``. An LR
        scheduler is the loop's own: recreate it at step ``N`` (e.g. ``last_epoch=N - 1``).
        """
        if self._store is None or not self._resumed:
            raise TrajectoryError("restore() needs a recorder opened with store=<path> and resume=True.")
        n = self._manifest.n_steps  # the last step with a stored optimizer state
        final = DiskTrajectory(self._store, model=self.model, loss=self._loss).params(n)
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(final[name])
        if n > 0:
            rec = self._manifest.steps[n - 1].optimizer_state
            assert rec is not None  # _validate_resume chose n so
            tensors, meta = read_tensors(self._store, rec, step=n - 1)
            audit = {k[len("audit."):]: v for k, v in tensors.items() if k.startswith("audit.")}
            state = {k: v for k, v in tensors.items() if not k.startswith("audit.")}
            self.optimizer.load_state_dict(decode_optimizer_state(state, meta, self.optimizer.state_dict()))
            self._auditor.momentum = {k: v.to(self._params[k].device) for k, v in audit.items()}
        return n

    @property
    def trajectory(self) -> Any:
        """The recorded :class:`~explaind.trajectory.base.Trajectory` (in memory, or read from the store)."""
        if self._store is None:
            if self._memory is None:
                raise TrajectoryError("Nothing recorded yet: use the recorder as a context manager (`with rec:`).")
            return self._memory
        if self._writer is not None:
            self._writer.flush()
        return DiskTrajectory(self._store, model=self.model, train_data=self._data, loss=self._loss)

    # ----------------------------------------------------------------- context
    def __enter__(self) -> TrajectoryRecorder:
        if self._active:
            raise TrajectoryError("This recorder is already active; `with rec:` cannot be nested.")
        theta = {n: p.detach().clone() for n, p in self._params.items()}
        constants = {k: v.clone() for k, v in split_model_tensors(self.model)[1].items()}
        if self._store is None:
            if self._memory is not None:
                raise TrajectoryError("An in-memory recorder records one run; create a new TrajectoryRecorder.")
            self._memory = InMemoryTrajectory(self.model, loss=self._loss, initial_params=theta, constants=constants,
                                              train_data=self._data, manifest=self._manifest)
        else:
            self._open_store(theta, constants)
        self._theta = theta
        self._tap.attach()
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step),
        ]
        self._active = True
        return self

    def _open_store(self, theta: dict[str, Tensor], constants: dict[str, Tensor]) -> None:
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
            m.complete = False
            self._writer = StoreWriter(self._store, m, fsync=self._fsync, background=self._background)
            return
        self._writer = StoreWriter(self._store, m, fsync=self._fsync, background=self._background)
        m.initial_file = self._writer.write_file("initial.safetensors", {f"param.{k}": v for k, v in theta.items()})
        if constants:
            m.constants_file = self._writer.write_file(
                "constants.safetensors", {f"const.{k}": v for k, v in constants.items()}
            )
        if self._data is not None and self._store_data:
            x, y = self._data.tensors()
            m.data_file = self._writer.write_file("data.safetensors", {"X": x, "y": y})
        self._writer.write_manifest()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._tap.detach()
        self._active = False
        if self._pending:
            logger.warning("%d logged micro-batch(es) were not followed by optimizer.step(); dropped.",
                           len(self._pending))
            self._pending.clear()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close(complete=exc_type is None and self._broken is None)
            except TrajectoryError:
                if exc_type is None:
                    raise
                logger.exception("Closing the trajectory store failed while handling another error.")

    # ----------------------------------------------------------------- hooks
    def _check_due(self, s: int) -> bool:
        if self._check == 0:
            return False
        if self._check == -1:
            return s - (self._manifest.n_steps if self._resumed else 0) < AUTO_CHECK_STEPS
        return s % self._check == 0

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        s = self._n
        if self._broken is not None:
            raise TrajectoryError(f"Recording stopped after an error at {self._broken}; start a new recorder.")
        if self._writer is not None:
            self._writer.check()
        if not self._pending:
            raise TrajectoryError(
                f"Step {s}: optimizer.step() was called without a logged batch: call rec.log_batch(indices) before "
                f"optimizer.step() (after backward)."
            )
        try:
            indices = torch.cat([i for i, _ in self._pending])
            weights = torch.cat([w for _, w in self._pending])
            seen = {n: p.grad for n, p in self._params.items()}
            scale = self._tap.measure(seen, s, self._tol)
            sigma = None
            if self._check_due(s):
                raw = {n: (self._tap.raw(n, g) if g is not None else torch.zeros_like(self._params[n]))
                       for n, g in seen.items()}
                device = next(iter(self._params.values())).device
                x, y = self._data.get(indices)  # type: ignore[union-attr]
                sigma = check_batch_gradient(self.model, self._params, raw, self._loss, x.to(device), y.to(device),
                                             weights.to(device), s, self._tol)
                self._sigma = sigma
            before = self._adapter.before_step(optimizer)
        except BaseException:
            self._pending.clear()
            self._tap.reset()
            raise
        self._step_state = {"indices": indices, "weights": weights, "scale": scale * self._sigma, "sigma": sigma,
                            "seen": seen if self._audit_on else None, "before": before}

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        s, st = self._n, self._step_state
        assert st is not None and self._theta is not None
        try:
            by_id = self._adapter.after_step(optimizer, st["before"])
            updates = {n: (_own(by_id[id(p)]) if id(p) in by_id else _UNCHANGED)
                       for n, p in self._params.items()}
            theta_next = {n: p.detach().clone() for n, p in self._params.items()}
            audit = self._auditor.step(self._theta, theta_next, st["seen"], updates) if self._audit_on else math.nan
            record = StepRecord(step=s, n_samples=int(st["indices"].shape[0]), grad_scale=float(st["scale"]),
                                audit=None if math.isnan(audit) else audit, loss_scale=st["sigma"])
            if self._memory is not None:
                self._memory._append(theta_next, updates, st["indices"], st["weights"], record.grad_scale, audit,
                                     st["sigma"], validate=False)
            else:
                self._write_step(record, theta_next, updates, st)
        except BaseException as exc:
            self._broken = f"step {s} ({type(exc).__name__}: {exc})"
            raise
        finally:
            self._pending.clear()
            self._tap.reset()
            self._step_state = None
        self._theta = theta_next
        self._n += 1

    def _write_step(self, record: StepRecord, theta_next: dict[str, Tensor], updates: dict[str, LinearUpdate],
                    st: dict[str, Any]) -> None:
        assert self._writer is not None
        tensors: dict[str, Tensor] = {f"param.{n}": t for n, t in theta_next.items()}
        tensors.update(pack_updates(tuple(self._params), updates))
        tensors["batch.indices"] = st["indices"]
        tensors["batch.weights"] = st["weights"]
        state = None
        if self._state_every and (record.step + 1) % self._state_every == 0:
            state_tensors, meta = encode_optimizer_state(self.optimizer.state_dict())
            if self._audit_on:
                state_tensors.update({f"audit.{k}": v.detach().clone() for k, v in self._auditor.momentum.items()})
            state = (state_tensors, meta)
        self._writer.write_step(record, tensors, state)
