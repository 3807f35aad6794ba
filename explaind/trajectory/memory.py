"""A trajectory held in memory: every ``theta_s`` and coefficient as tensors (small runs, tests)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..exceptions import TrajectoryError
from ..recurrence import LinearUpdate
from ._common import TrainData, architecture_spec, loss_name, resolve_loss_record, split_model_tensors
from ._random import MicroBatch
from ._start_state import check_initial_state
from .manifest import StepRecord, TrajectoryManifest, dtype_name, tensor_specs
from .recorded import RecordedTrajectory, check_param_index, check_step

__all__ = ["InMemoryTrajectory"]


class InMemoryTrajectory(RecordedTrajectory):
    """A :class:`~explaind.trajectory.base.Trajectory` whose tensors all live in memory.

    Build one with :meth:`from_steps` or get one from a :class:`~explaind.TrajectoryRecorder`
    without a ``store``. Returned tensors are the stored ones: do not modify them in place.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: Any,
        initial_params: dict[str, Tensor],
        constants: dict[str, Tensor] | None = None,
        train_data: Any = None,
        manifest: TrajectoryManifest | None = None,
        generators: Any = None,
        initial_state: dict[str, Tensor] | None = None,
        optimizer_start: Any = None,
    ):
        self._model = model
        self._initial_state = check_initial_state(initial_state, initial_params)
        self._optimizer_start = optimizer_start
        self._generators = tuple(generators or ())
        self._loss = resolve_loss_record(loss)
        self._names = tuple(initial_params)
        self._params: list[dict[str, Tensor]] = [dict(initial_params)]
        self._updates: list[dict[str, LinearUpdate]] = []
        self._batches: list[tuple[Tensor, Tensor]] = []
        self._scales: list[float] = []
        self._audit: list[float] = []
        self._micro: list[list[MicroBatch] | None] = []
        self._buffers: list[dict[str, Tensor]] = []  # beta_{s+1} of every step (the previous one when unchanged)
        if constants is None:
            _, constants = split_model_tensors(model)
            constants = {k: v.detach().clone() for k, v in constants.items()}
        self._constants = dict(constants)
        self._data = TrainData(train_data) if train_data is not None else None
        if manifest is None:
            first = next(iter(initial_params.values()), None)
            manifest = TrajectoryManifest(
                explaind_version=__version__,
                dtype=dtype_name(first.dtype) if first is not None else "float32",
                architecture=architecture_spec(model),
            )
        manifest.params = tensor_specs(self._params[0])
        manifest.constants = tensor_specs(self._constants)
        manifest.loss = loss_name(self._loss)
        manifest.n_train = len(self._data) if self._data is not None else manifest.n_train
        self._manifest = manifest

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_steps(
        cls,
        model: nn.Module,
        *,
        loss: Any,
        params: Sequence[dict[str, Tensor]],
        updates: Sequence[dict[str, LinearUpdate]],
        batches: Sequence[tuple[Tensor, Tensor]],
        grad_scales: Sequence[float] | None = None,
        audit: Any = None,
        train_data: Any = None,
        constants: dict[str, Tensor] | None = None,
        initial_state: dict[str, Tensor] | None = None,
        **extras: Any,
    ) -> InMemoryTrajectory:
        """Assemble a trajectory from explicit per-step values (tests, synthetic runs, conversions).

        Parameters
        ----------
        model : nn.Module
            Template module for ``functional_call``.
        loss : str, LossRecord or callable
            The training loss.
        params : list of dict
            ``theta_0 .. theta_N`` (length ``N + 1``), each name -> tensor, same names and shapes.
        updates : list of dict
            Length ``N``; ``updates[s][name]`` is the :class:`LinearUpdate` of step ``s``. A missing name
            means the parameter did not move (``a=1, b=0, P=0``).
        batches : list of (LongTensor, Tensor)
            Length ``N``; ``(indices, weights)`` of step ``s``, both of shape ``(n_s,)``.
        grad_scales : list of float, optional
            ``c_s`` (default all 1).
        audit : array-like, optional
            Per-step relative residuals (default NaN: not measured).
        train_data : (X, y) or Dataset, optional
        constants : dict, optional
            Frozen parameters and buffers (default: taken from ``model``).
        initial_state : dict, optional
            The momentum buffers :math:`m_{-1}` before step 0, name -> tensor shaped like the parameter
            (default: none, every buffer starts at zero; see :meth:`initial_state`).
        **extras
            Manifest fields (``adapter``, ``adapter_hyperparameters``, ``optimizer_class``, ...); unknown
            keys go to ``manifest.extras``.
        """
        params = list(params)
        n = len(updates)
        if len(params) != n + 1:
            raise TrajectoryError(
                f"from_steps: got {len(params)} parameter states for {n} updates; pass n_steps + 1 = {n + 1} "
                f"states theta_0..theta_N."
            )
        if len(batches) != n:
            raise TrajectoryError(f"from_steps: got {len(batches)} batches for {n} steps; pass one per step.")
        if grad_scales is not None and len(grad_scales) != n:
            raise TrajectoryError(f"from_steps: got {len(grad_scales)} grad_scales for {n} steps.")
        audit_arr = None if audit is None else np.asarray(audit, dtype=np.float64).reshape(-1)
        if audit_arr is not None and audit_arr.shape[0] != n:
            raise TrajectoryError(f"from_steps: audit has {audit_arr.shape[0]} values for {n} steps.")
        fields = set(TrajectoryManifest.model_fields)
        known = {k: v for k, v in extras.items() if k in fields}
        unknown = {k: v for k, v in extras.items() if k not in fields}
        first = next(iter(params[0].values()), None)
        manifest = TrajectoryManifest(
            explaind_version=__version__,
            dtype=dtype_name(first.dtype) if first is not None else "float32",
            architecture=architecture_spec(model),
            **known,
        )
        manifest.extras.update(unknown)
        traj = cls(model, loss=loss, initial_params=params[0], constants=constants, train_data=train_data,
                   manifest=manifest, initial_state=initial_state)
        for s in range(n):
            idx, w = batches[s]
            traj._append(
                params[s + 1],
                updates[s],
                idx,
                w,
                1.0 if grad_scales is None else float(grad_scales[s]),
                float("nan") if audit_arr is None else float(audit_arr[s]),
            )
        return traj

    def _append(
        self,
        params_next: dict[str, Tensor],
        updates: dict[str, LinearUpdate],
        indices: Tensor,
        weights: Tensor,
        grad_scale: float,
        audit: float,
        loss_scale: float | None = None,
        validate: bool = True,
        record: StepRecord | None = None,
        micro: list[MicroBatch] | None = None,
        buffers: dict[str, Tensor] | None = None,
    ) -> None:
        """Add one step (used by :meth:`from_steps` and the recorder, which passes checked values and its record).

        The recorder also passes the step's micro-batches and :math:`\beta_{s+1}` when buffers changed.
        """
        s = len(self._updates)
        beta = buffers if buffers is not None else self.buffers(s)
        if not validate:
            self._micro.append(micro)
            self._buffers.append(beta)
            self._params.append(params_next)
            self._updates.append(updates)
            self._batches.append((indices, weights))
            self._scales.append(float(grad_scale))
            self._audit.append(float(audit))
            self._manifest.steps.append(
                record if record is not None else
                StepRecord(step=s, n_samples=int(indices.shape[0]), grad_scale=float(grad_scale),
                           audit=None if math.isnan(audit) else float(audit), loss_scale=loss_scale)
            )
            self._manifest.n_steps = s + 1
            return
        shapes = {k: tuple(v.shape) for k, v in self._params[0].items()}
        got = {k: tuple(v.shape) for k, v in params_next.items()}
        if got != shapes:
            raise TrajectoryError(
                f"Step {s}: parameter names/shapes {got} do not match theta_0 {shapes}."
            )
        extra = sorted(set(updates) - set(self._names))
        if extra:
            raise TrajectoryError(f"Step {s}: updates for unknown parameters {extra}; known: {list(self._names)}.")
        full = {k: updates.get(k, LinearUpdate(a=1.0, b=0.0, P=0.0)) for k in self._names}
        indices = torch.as_tensor(indices)
        if indices.dtype != torch.long or indices.dim() != 1:
            raise TrajectoryError(
                f"Step {s}: batch indices must be a 1-D int64 tensor, got dtype {indices.dtype} and shape "
                f"{tuple(indices.shape)}."
            )
        weights = torch.as_tensor(weights)
        if tuple(weights.shape) != tuple(indices.shape):
            raise TrajectoryError(
                f"Step {s}: batch weights of shape {tuple(weights.shape)} do not match indices {tuple(indices.shape)}."
            )
        self._micro.append(micro)
        self._buffers.append(beta)
        self._params.append(dict(params_next))
        self._updates.append(full)
        self._batches.append((indices, weights))
        self._scales.append(float(grad_scale))
        self._audit.append(float(audit))
        self._manifest.steps.append(
            StepRecord(
                step=s,
                n_samples=int(indices.shape[0]),
                grad_scale=float(grad_scale),
                audit=None if np.isnan(audit) else float(audit),
                loss_scale=loss_scale,
            )
        )
        self._manifest.n_steps = len(self._updates)

    def _set_audit(self, s: int, audit: float) -> None:
        """Fill in the audit of step ``s`` (the recorder's audit runs after the step was appended)."""
        self._audit[s] = float(audit)
        self._manifest.steps[s] = self._manifest.steps[s].model_copy(
            update={"audit": None if math.isnan(audit) else float(audit)})

    # ----------------------------------------------------------------- structure
    @property
    def n_steps(self) -> int:
        return len(self._updates)

    @property
    def param_names(self) -> tuple[str, ...]:
        return self._names

    def _missing_data_message(self) -> str:
        return (
            "This trajectory has no training data attached. Pass train_data=(X, y) to the recorder or to "
            "Trajectory.load."
        )

    # ----------------------------------------------------------------- per step
    def params(self, s: int) -> dict[str, Tensor]:
        return dict(self._params[check_param_index(s, self.n_steps)])

    def constants(self) -> dict[str, Tensor]:
        return dict(self._constants)

    def initial_state(self) -> dict[str, Tensor]:
        return dict(self._initial_state)

    def optimizer_start(self) -> Any:
        return self._optimizer_start

    def updates(self, s: int) -> dict[str, LinearUpdate]:
        return dict(self._updates[check_step(s, self.n_steps)])

    def micro_batches(self, s: int) -> list[MicroBatch]:
        micro = self._micro[check_step(s, self.n_steps)]
        return list(micro) if micro is not None else super().micro_batches(s)

    def buffers(self, s: int) -> dict[str, Tensor]:
        s = check_param_index(s, self.n_steps)
        if s == 0 or not self._manifest.buffer_names:
            return {n: self._constants[n] for n in self._manifest.buffer_names}
        return dict(self._buffers[s - 1])

    def batch(self, s: int) -> tuple[Tensor, Tensor]:
        return self._batches[check_step(s, self.n_steps)]

    def grad_scale(self, s: int) -> float:
        return self._scales[check_step(s, self.n_steps)]

    def audit(self) -> np.ndarray:
        return np.asarray(self._audit, dtype=np.float64)

    def train_samples(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        if self._data is None:
            raise TrajectoryError(
                "This trajectory has no training data attached. Pass train_data=(X, y) to the recorder (or "
                "to Trajectory.load(path, train_data=...))."
            )
        return self._data.get(indices)

    def __repr__(self) -> str:
        return (
            f"InMemoryTrajectory(n_steps={self.n_steps}, params={len(self._names)} tensors, "
            f"loss={self._loss.name!r}, adapter={self._manifest.adapter!r})"
        )
