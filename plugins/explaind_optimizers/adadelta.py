r"""Adapter for :class:`torch.optim.Adadelta` (running averages of squared gradients and updates, L2 weight decay).

Torch's update for a parameter with gradient ``g_s`` (single-tensor and foreach paths run the same elementwise
operations in the same order):

.. math::

    u_s &= \pm g_s + \mathrm{wd}\,\theta_s \qquad (- \text{ under maximize}) \\
    v_s &= \rho\, v_{s-1} + (1-\rho)\, u_s^2 \qquad (\text{``square\_avg''}) \\
    \delta_s &= \sqrt{d_{s-1} + \epsilon} \,/\, \sqrt{v_s + \epsilon} \odot u_s, \qquad
    d_s = \rho\, d_{s-1} + (1-\rho)\, \delta_s^2 \qquad (\text{``acc\_delta''}) \\
    \Delta\theta_s &= -\mathrm{lr}_s\, \delta_s

In the notation of docs/maths.md §3: ``a, b = 0, 1`` (no momentum buffer), the diagonal preconditioner
``P = lr_s sqrt(d_{s-1} + eps) / sqrt(v_s + eps)``, ``q, n = 1, 0`` and ``lambda_c = wd``; ``maximize=True`` is
modelled by ``P -> -P`` and ``lambda_c -> -lambda_c``. ``sqrt(d_{s-1} + eps)`` is taken before the step (the step
overwrites ``acc_delta``) and ``sqrt(v_s + eps)`` after it, each with torch's operations (``add(eps).sqrt_()``).
Both running averages are recorded coefficients, not decomposed, as Adam's second moment is; torch builds them
(zeros) at a parameter's first step, and a held state is read from the live optimizer, so no start buffer exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from explaind.config import StrictModel
from explaind.recurrence import LinearUpdate

from ._common import GroupSnapshot, as_used
from ._no_buffer import NoBufferAdapter

__all__ = ["AdadeltaAdapter", "AdadeltaConfig", "AdadeltaGroupConfig"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class AdadeltaGroupConfig(StrictModel):
    """Hyperparameters of one Adadelta parameter group when recording started."""

    lr: NonNegative = 1.0
    rho: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    eps: NonNegative = 1e-6
    weight_decay: NonNegative = 0.0
    maximize: bool = False
    foreach: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0


class AdadeltaConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.Adadelta` run (stored in the trajectory manifest)."""

    param_groups: list[AdadeltaGroupConfig] = Field(default_factory=lambda: [AdadeltaGroupConfig()], min_length=1)


@dataclass(frozen=True)
class _AdadeltaBefore:
    groups: list[GroupSnapshot]
    numerators: dict[int, torch.Tensor]  # id(param) -> sqrt(acc_delta + eps) before the step


class AdadeltaAdapter(NoBufferAdapter):
    """Express every :class:`torch.optim.Adadelta` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "adadelta"
    optimizer_class = torch.optim.Adadelta
    #: ``after_step``'s ``P`` is a new tensor each step, never touched again: the recorder keeps it without a copy.
    fresh_tensors: bool = True
    config_model = AdadeltaConfig
    group_model = AdadeltaGroupConfig
    float_keys = ("lr", "rho", "eps", "weight_decay")
    complex_why = "Adadelta averages real and imaginary parts separately"

    def before_step(self, optimizer: torch.optim.Optimizer) -> _AdadeltaBefore:
        """Snapshot the group hyperparameters and ``sqrt(acc_delta + eps)`` of each stepped parameter."""
        groups = self.checked_groups(optimizer)
        numerators = {}
        for snap in groups:
            eps = float(snap.values["eps"])
            for p in snap.with_grad:
                acc = optimizer.state.get(p, {}).get("acc_delta")
                acc = torch.zeros_like(p) if acc is None else acc
                numerators[id(p)] = acc.add(eps).sqrt_()
        return _AdadeltaBefore(groups=groups, numerators=numerators)

    def after_step(self, optimizer: torch.optim.Optimizer, before: _AdadeltaBefore) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only)."""
        out: dict[int, LinearUpdate] = {}
        for snap in before.groups:
            v = snap.values
            sign = -1.0 if v.get("maximize", False) else 1.0
            eps, wd = float(v["eps"]), float(v["weight_decay"])
            for p in snap.with_grad:
                dt = p.dtype
                std = optimizer.state[p]["square_avg"].add(eps).sqrt_()
                P = before.numerators[id(p)].div_(std).mul_(sign * as_used(float(v["lr"]), dt))
                lambda_c = sign * as_used(wd, dt) if wd != 0.0 else 0.0
                out[id(p)] = LinearUpdate(a=0.0, b=1.0, P=P, q=1.0, n=0.0, lambda_c=lambda_c)
        return out
