r"""The recorder's own forward passes: the loss-callable check and the gradient check (docs/recording.md).

Kept apart from the hooks so that each module reads on its own; the methods use the recorder's
attributes (``_pending``, ``_tap``, ``_probe``, ``_random``, ...) set in its ``__init__``. Every
forward here runs *quietly*: the autocast probe and the random-state capture ignore it, and the
loop's random generators are left as they were (a check never changes the masks the loop draws
next).

With captured random states the gradient check recomputes each micro-batch as one batched
training forward under its recorded state (:func:`~explaind.trajectory._random.replayed`), so
runs with dropout or batch norm are checked like any other.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ExplaindWarning, TrajectoryError
from ._buffers import BufferTracker
from ._checks import CheckSchedule, GradientCheck, check_batch_gradient, check_loss_decomposes
from ._gradients import AutocastProbe, GradientTap
from ._random import MicroBatch, RandomCapture, RandomState, replay_parts

__all__ = ["RecorderChecksMixin"]

logger = logging.getLogger("explaind.trajectory.recorder")


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in evaluation mode inside the block; each module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class RecorderChecksMixin:
    """Check methods of the recorder (see :class:`~explaind.TrajectoryRecorder`)."""

    model: nn.Module
    _params: dict[str, nn.Parameter]
    _pending: list[Any]
    _tap: GradientTap
    _probe: AutocastProbe
    _random: RandomCapture
    _buffers: BufferTracker
    _loss: Any
    _data: Any
    _n: int
    _loss_checked: bool
    _schedule: CheckSchedule

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """The recorder's own forwards: unseen by the probe and the capture, the loop's generators untouched."""
        self._probe.paused = True
        try:
            with self._random.quiet():
                yield
        finally:
            self._probe.paused = False

    def _micro_batches(self) -> list[MicroBatch]:
        """The pending micro-batches as the trajectory stores them."""
        return [MicroBatch(e.indices, e.weights, e.forwards, e.state, e.eval_forwards) for e in self._pending]

    def _replay_plan(self, s: int) -> tuple[bool, list[tuple[slice, RandomState]] | None]:
        """``(checkable, replay)``: the micro-batches' positions and states when the forwards were captured.

        A run with dropout or batch norm whose micro-batch saw no or several training forwards cannot
        be recomputed: not checkable (the engine refuses such steps, naming the fix).
        """
        if not (self._random.enabled and self._random.coupled):
            return True, None
        try:
            parts = replay_parts(self._micro_batches(), self._random.coupled, f"Step {s}")
        except TrajectoryError as exc:
            logger.info("%s Its gradient is not checked.", exc)
            return False, None
        return True, None if parts is None else [(slice(lo, hi), state) for lo, hi, state in parts]

    def _check_gradient(self, seen: dict[str, Tensor], no_input: Any, indices: Tensor, weights: Tensor,
                        device: torch.device, s: int, tol: float, autocast: Any) -> GradientCheck | None:
        """The gradient check of step ``s`` (``None`` when its forwards cannot be replayed)."""
        checkable, replay = self._replay_plan(s)
        if not checkable:
            return None
        raw = {n: self._tap.raw(n, g) for n, g in seen.items() if n not in no_input}
        x, y = self._data.get(indices)
        # without forwards to replay the engine recomputes gradients in evaluation mode: so does the check, and
        # a training forward that differs from it in a way no module shows (F.dropout, torch.rand) fails here
        hint = ""
        if replay is None and self.model.training:
            hint = (" The loop's forward ran in training mode and no training forward of this run is replayed, so "
                    "explaind recomputes gradients in evaluation mode: if the forward draws random numbers "
                    "(F.dropout, torch.rand) or reads a buffer it updates, record with "
                    "TrajectoryRecorder(..., capture_random=True), which replays every training forward.")
        with self._quiet(), _evaluation_mode(self.model) if replay is None else contextlib.nullcontext():
            return check_batch_gradient(self.model, self._params, raw, self._loss,
                                        (x.to(device), y.to(device), weights.to(device)), s, tol, autocast, replay,
                                        self._random.generators, self._buffers.recorded(), hint)

    def _check_loss_callable(self, device: torch.device) -> None:
        """Once, on the first logged micro-batch: a user loss callable must equal sum_k w_k * per-sample loss."""
        self._loss_checked = True
        first = self._pending[0]
        x, y = self._data.get(first.indices)
        with self._quiet():  # one forward: its masks need not be the loop's
            message = check_loss_decomposes(self.model, self._params, self._loss, x.to(device), y.to(device),
                                            first.weights)
        if message is None:
            return
        if not self._schedule.never:
            raise TrajectoryError(f"Step {self._n}: {message}")
        logger.warning("%s", message)
        warnings.warn(message, ExplaindWarning, stacklevel=5)

