r"""The loss's derivative at the model's outputs, compared at every step: a loss weight that moves is checked.

The gradient check (``check_gradients="auto"``) recomputes a step's gradient at a sparse set of steps and measures
there the loss scale :math:`\sigma` the loop applies (docs/maths.md §1, :math:`c_s`). A loss weight that changes at
a step the check skips (a loss scale, a class weight, a per-sample weight the loop applies and does not log) was
recorded with the last measured scale, its difference left in the residual; in float32 a change of 1e-3 at one step
stays below the residual tolerance of a float32 run and passed without a word.

What this module adds costs no model evaluation. A forward hook on the model keeps each training forward's output
:math:`o` (at most :data:`MAX_ENTRIES` entries) and a tensor hook on it the cotangent :math:`a = \partial L/\partial o`
that the loop's ``backward()`` sends through it. Before each step the derivative of the recorded loss,
:math:`b = \partial (\sum_k w_k \ell_k(o_k)) / \partial o` (the loss on the outputs only, no backward through the
model), is fitted to it: :math:`c = \langle a, b\rangle / \langle b, b\rangle` and the relative misfit
:math:`r = \|a - c b\| / \|a\|`. When :math:`c` moved since the previous step by more than :data:`UNITS` unit
roundoffs of the outputs' dtype, or :math:`r` rose above that level, the step is checked (the gradient check then
measures its scale, or refuses it naming the cause). The same outputs give a user loss callable's value at each
step; it is evaluated again on them before the next step, and another value (the callable changed between the
steps: a weight kept as its attribute, an EMA teacher or a target network it reads) is refused here, since the
engine replays every step with the callable as it is when explaining.

What it does not see: a step whose training forwards are not one per logged micro-batch, a forward whose output's
hook gets no gradient (a compiled graph may call it so), an output that is not a
tensor (``model_output`` picks it) or that is larger than :data:`MAX_ENTRIES`, a batch-coupled loss, an output under
autocast (whose rounding, about 1e-3, hides such a change), a loss weight applied to a term that does not pass
through the model's output (a penalty on the parameters), and a change below :data:`UNITS` unit roundoffs
(float32: 6.0e-5 relative; float64: 1.1e-13), which the residual share measures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ..outputs import model_output
from ._common import ModelHook, warn_user

__all__ = ["MAX_ENTRIES", "UNITS", "OutputCotangents"]

logger = logging.getLogger("explaind.trajectory.recorder")

#: The most entries of a training forward's output kept with its cotangent (a larger one, a language model's logits
#: over its vocabulary, is not compared: the loss's derivative there costs a few percent of such a step).
MAX_ENTRIES = 2 ** 18

#: Unit roundoffs of the outputs' dtype by which the fitted loss scale may move between steps unnoticed.
UNITS = 1000


class OutputCotangents:
    """Keep each training forward's output and the cotangent ``backward()`` sends through it; compare at the step.

    Parameters
    ----------
    model : nn.Module
        The recorded model (a forward hook on its root).
    paused : callable
        True while the recorder evaluates the model itself (its own forwards are not the loop's).
    """

    def __init__(self, model: nn.Module, paused: Callable[[], bool]) -> None:
        self._model, self._paused = model, paused
        self._handle: Any = None
        #: per training forward since the last step: [output (detached), cotangent or None]
        self._kept: list[list[Tensor | None]] = []
        self._last: tuple[float, float] | None = None  # (c, r) of the previous compared step
        self._dtype = torch.float64  # the outputs' dtype at the last fit
        #: per micro-batch of the last compared step: output, targets, weights and the loss's value there
        self._values: list[tuple[Tensor, Any, Tensor, float]] = []
        self._warned = False  # a changed loss callable named once (check_gradients=False)

    def attach(self) -> None:
        self._handle = self._model.register_forward_hook(ModelHook(self._hook))

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._kept = []

    def reset(self) -> None:
        """Forget the forwards of the finished step."""
        self._kept = []

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._paused() or not module.training or not torch.is_grad_enabled():
            return
        try:
            out = model_output(output)
        except Exception:  # noqa: BLE001 - an output the adapter cannot read is not compared
            out = None
        if not isinstance(out, Tensor) or not out.requires_grad or out.numel() > MAX_ENTRIES \
                or not out.is_floating_point():
            self._kept.append([None, None])
            return
        entry: list[Tensor | None] = [out.detach(), None]

        def keep(grad: Tensor | None) -> None:
            if grad is None:  # a compiled graph may call the hook without a gradient: nothing to compare
                entry[0] = None
                return
            entry[1] = grad.detach() if entry[1] is None else entry[1] + grad.detach()

        out.register_hook(keep)
        self._kept.append(entry)

    def moved(self, pending: Sequence[Any], data: Any, loss: Any, autocast: Any, step: int = 0,
              unchecked: bool = False) -> bool:
        """Whether the loss scale fitted at the outputs moved since the previous step (check this step).

        Parameters
        ----------
        pending : sequence
            The step's logged micro-batches (``indices`` and ``weights`` each).
        data : object or None
            The recorder's training data (``get(indices) -> (inputs, targets)``); ``None``: nothing compared.
        loss : LossRecord
            The recorded loss (its ``implementation(outputs, targets)`` gives the per-sample losses).
        autocast : torch.dtype or None
            The autocast dtype of the step's forwards (``None``: no autocast; else nothing is compared).
        step : int
            The step about to be recorded (named by the refusal).
        unchecked : bool
            True when the recording checks no gradient (``check_gradients=False``): a changed loss callable is
            warned about once (an ``ExplaindWarning``) instead of refused, as the recorder's other checks do then.

        Raises
        ------
        TrajectoryError
            When the loss callable gives another value on the previous step's outputs than it gave there (it was
            changed between the steps).
        """
        self._same_loss(loss, step, unchecked)
        fit = None if data is None or autocast is not None else self._fit(pending, data, loss)
        last, self._last = self._last, fit
        if fit is None or last is None:
            return False
        tol = UNITS * torch.finfo(self._dtype).eps / 2
        c, r = fit
        return abs(c - last[0]) > tol * max(abs(c), abs(last[0])) or (r > tol and not last[1] > tol)

    def _same_loss(self, loss: Any, step: int, unchecked: bool = False) -> None:
        """Evaluate the loss again on the previous step's outputs: another value means the callable changed."""
        previous, self._values = self._values, []
        if not loss.name.startswith("custom:"):  # a registered loss does not change
            return
        for out, targets, w, value in previous:
            try:
                with torch.no_grad():
                    again = float((loss.implementation(out, targets) * w).sum())
            except Exception:  # noqa: BLE001 - not comparable: the gradient check's to judge
                continue
            if again == value or (math.isnan(again) and math.isnan(value)) \
                    or abs(again - value) <= UNITS * torch.finfo(out.dtype).eps * abs(value):
                continue
            message = (
                f"Step {step}: the loss callable {loss.name!r} gives {again:.8g} on the outputs of step {step - 1}, "
                f"where it gave {value:.8g} when that step was recorded: it was changed between the steps (a weight, "
                f"a temperature or a margin kept as its attribute or in its closure, set by the loop; an EMA "
                f"teacher or a DQN target network it reads, moved by the loop). explaind "
                f"evaluates every recorded step with the loss callable as it is when explaining, so the steps before "
                f"the change would be explained with another loss than they were trained with, its difference left "
                f"in the residual (in float32 below the residual tolerance). The steps recorded before are kept. Fix: "
                f"keep the loss callable unchanged while recording and apply a weight that changes in the loop, "
                f"loss = w_s * loss_fn(out, y), which the recorder measures at the steps it moves as the step's "
                f"gradient scale; a per-sample or class weight as logged weights, rec.log_batch(idx, weights=...); "
                f"a temperature or margin the loss needs as an output column the forward derives from a buffer it "
                f"counts up; a teacher or target network as buffers the training forward moves (its outputs as "
                f"output columns the loss callable reads, capture_random=True).")
            if not unchecked:
                raise TrajectoryError(message)
            if not self._warned:
                self._warned = True  # once per run: such a loop changes it at every step
                warn_user(logger, message)
            return

    def _fit(self, pending: Sequence[Any], data: Any, loss: Any) -> tuple[float, float] | None:
        """``(c, r)`` of the step's micro-batches, or ``None`` when they cannot be compared."""
        kept = self._kept
        if not pending or len(kept) != len(pending) or getattr(loss, "batch_coupled", False):
            return None
        ab = bb = aa = 0.0
        cross: list[tuple[Tensor, Tensor]] = []
        for (out, cot), batch in zip(kept, pending):
            if out is None or cot is None or out.shape[0] != len(batch.indices) or not out.shape[0]:
                return None
            try:
                targets = data.get(batch.indices)[1]
                targets = targets.to(out.device) if isinstance(targets, Tensor) else targets
                with torch.enable_grad():
                    o = out.detach().requires_grad_(True)  # a new leaf on the same memory, no copy
                    terms = loss.implementation(o, targets)
                    w = batch.weights.to(device=o.device, dtype=terms.dtype)
                    total = (terms * w).sum()
                    (b,) = torch.autograd.grad(total, o)
                if loss.name.startswith("custom:"):
                    self._values.append((out, targets, w, float(total.detach())))
            except Exception:  # noqa: BLE001 - a loss that cannot be evaluated here: the gradient check's to judge
                return None
            a, b = cot.reshape(-1), b.reshape(-1).to(cot.dtype)  # dot products in the outputs' dtype
            ab, bb, aa = ab + float(a @ b), bb + float(b @ b), aa + float(a @ a)
            cross.append((a, b))
        if not bb > 0 or not aa > 0:
            return None
        self._dtype = kept[0][0].dtype
        c = ab / bb
        misfit = sum(float((a - c * b).square().sum()) for a, b in cross) ** 0.5
        return c, misfit / aa ** 0.5
