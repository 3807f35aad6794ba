r"""Adapter for :class:`torch.optim.Adagrad` (learning-rate decay, L2 weight decay, initial accumulator, maximize).

Torch's update for a parameter with gradient ``g_s`` at its ``t``-th step (``t = state["step"]`` after the
step; single-tensor and foreach paths compute the same elementwise arithmetic):

.. math::

    u_s &= \pm g_s + \mathrm{wd}\,\theta_s \qquad (- \text{ under maximize}) \\
    \Sigma_s &= \Sigma_{s-1} + u_s^2, \qquad \Sigma_{-1} = \text{initial\_accumulator\_value} \\
    \mathrm{clr}_t &= \mathrm{lr}_s / (1 + (t-1)\,\mathrm{lr\_decay}) \\
    \Delta\theta_s &= -\mathrm{clr}_t\, u_s / (\sqrt{\Sigma_s} + \epsilon)

In the notation of docs/maths.md §3: ``a, b = 0, 1`` (no momentum buffer), the diagonal preconditioner
``P = clr_t / (sqrt(sum) + eps)`` recomputed after the step from ``state["sum"]`` with torch's operation order
(``sqrt``, then ``add eps``), ``q, n = 1, 0`` and ``lambda_c = wd``. ``maximize=True`` is modelled by
``P -> -P`` and ``lambda_c -> -lambda_c``. Torch creates Adagrad's state (``step = 0`` and the accumulator) when
the optimizer is built, so every recording opens on "held state": :meth:`AdagradAdapter.start_state` has no
buffer to report (``m_{-1}`` is unused with ``a = 0``), and the accumulator and step count are read from the
live state at every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import Field

from explaind.config import StrictModel
from explaind.recurrence import LinearUpdate

from ._common import DIFFERENTIABLE_RULE, GroupSnapshot, OptionRule, as_used
from ._no_buffer import NoBufferAdapter
from ._pooled import Pending, StepSlots

__all__ = ["AdagradAdapter", "AdagradConfig", "AdagradGroupConfig", "adagrad_step_size"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

_RULES = (
    DIFFERENTIABLE_RULE,
    OptionRule(
        key="fused",
        allowed=(None, False),
        reason="the fused kernel runs its own arithmetic (and unscales gradients inside when a GradScaler "
        "drives it), which the adapter does not reproduce",
        fix="build the optimizer with fused=False (the foreach or single-tensor path)",
    ),
)
_FLOAT_KEYS = ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value")


class AdagradGroupConfig(StrictModel):
    """Hyperparameters of one Adagrad parameter group when recording started."""

    lr: NonNegative = 1e-2
    lr_decay: NonNegative = 0.0
    eps: NonNegative = 1e-10
    weight_decay: NonNegative = 0.0
    initial_accumulator_value: NonNegative = 0.0
    maximize: bool = False
    foreach: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0


class AdagradConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.Adagrad` run (stored in the trajectory manifest)."""

    param_groups: list[AdagradGroupConfig] = Field(default_factory=lambda: [AdagradGroupConfig()], min_length=1)


def adagrad_step_size(lr: float, lr_decay: float, step: float) -> float:
    """``clr = lr / (1 + (t - 1) lr_decay)`` as torch computes it (Python floats); ``t``: step count after the step."""
    return lr / (1 + (step - 1) * lr_decay)


def _preconditioner(scale: float, state_sum: torch.Tensor, eps: float, out: torch.Tensor | None) -> torch.Tensor:
    """``P = scale / (sqrt(sum) + eps)`` in ``out`` (or new memory); torch: ``state_sum.sqrt().add_(eps)``."""
    std = torch.sqrt(state_sum, out=out).add_(eps)
    return torch.div(torch.tensor(scale, dtype=std.dtype), std, out=std)


class AdagradAdapter(NoBufferAdapter):
    """Express every :class:`torch.optim.Adagrad` step as a :class:`~explaind.recurrence.LinearUpdate`.

    Torch builds the accumulator and step count with the optimizer, so the recorder calls :meth:`start_state` (no
    buffer) for every Adagrad run; both are read from the live state at each step.
    """

    name = "adagrad"
    optimizer_class = torch.optim.Adagrad
    #: ``after_step``'s ``P`` is a new tensor each step (or the recorder's ``out`` buffer), never touched again: the
    #: recorder keeps it without a copy.
    fresh_tensors: bool = True
    config_model = AdagradConfig
    group_model = AdagradGroupConfig
    rules = _RULES
    float_keys = _FLOAT_KEYS
    complex_why = "Adagrad accumulates real and imaginary parts separately"

    def before_step(self, optimizer: torch.optim.Optimizer) -> list[GroupSnapshot]:
        """Snapshot the group hyperparameters (schedulers may change ``lr`` between steps)."""
        return self.checked_groups(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer, before: list[GroupSnapshot], *,
                   out: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                   defer: Callable[[Callable[[], None]], None] | None = None) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only).

        ``out`` and ``defer``: the recorder's coefficient buffers for ``P`` and the job that fills them
        (docs/optimizers.md, "Coefficient buffers"); without them every ``P`` is new memory.
        """
        updates: dict[int, LinearUpdate] = {}
        slots = StepSlots(out, defer)
        for snap in before:
            v = snap.values
            sign = -1.0 if v.get("maximize", False) else 1.0
            lr, lr_decay, eps, wd = (float(v[k]) for k in ("lr", "lr_decay", "eps", "weight_decay"))
            for p in snap.with_grad:
                dt = p.dtype
                state = optimizer.state[p]
                step = float(state["step"].item()) if isinstance(state["step"], torch.Tensor) else float(state["step"])
                clr = as_used(adagrad_step_size(lr, lr_decay, step), dt)
                P = slots.tensor(p, Pending(state["sum"], functools.partial(_preconditioner, sign * clr,
                                                                            state["sum"], eps)))
                lambda_c = sign * as_used(wd, dt) if wd != 0.0 else 0.0
                updates[id(p)] = LinearUpdate(a=0.0, b=1.0, P=P, q=1.0, n=0.0, lambda_c=lambda_c)
        slots.close()
        return updates
