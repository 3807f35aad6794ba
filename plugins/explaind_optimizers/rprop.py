r"""Adapter for :class:`torch.optim.Rprop` (resilient backpropagation: a step size per entry, moved by sign only).

Torch's update for a parameter with gradient ``g_s`` (single-tensor and foreach paths run the same elementwise
operations), with the previous step's (modified) gradient ``prev`` and the step sizes ``step_size`` in the state:

.. math::

    u_s &= \pm g_s \qquad (- \text{ under maximize}) \\
    \sigma &= \mathrm{sign}(u_s \odot \mathrm{prev}) \mapsto \eta_+ \ (>0),\ \eta_- \ (<0),\ 1 \ (=0) \\
    \mathrm{step\_size} &\leftarrow \mathrm{clamp}(\mathrm{step\_size} \odot \sigma,\ \mathrm{step\_min},
                                                  \mathrm{step\_max}) \\
    u'_s &= u_s \text{ with the entries where } \sigma = \eta_- \text{ set to } 0,
    \qquad \Delta\theta_s = -\mathrm{step\_size} \odot \mathrm{sign}(u'_s), \qquad \mathrm{prev} \leftarrow u'_s

Every entry moves by its step size against the sign of its gradient, or not at all where the sign flipped, so the
step is ``Delta theta_s = -P_s g_s`` with the diagonal ``P_s = step_size / |g_s|`` where ``u'_s != 0`` and ``0``
elsewhere (``-P_s`` under ``maximize``), read after the step from ``state["step_size"]``, ``state["prev"]``
(which holds ``u'_s``) and ``p.grad``: ``a, b = 0, 1``, ``q, n = 1, 0``, no weight decay (torch's Rprop has none).
``P_s`` depends on ``g_s`` through its sign and magnitude, as Adam's does through ``v``: it is recorded, not
decomposed, and a sample's share of the step is ``P_s`` times its share of the gradient. ``lr`` only fills the step
sizes at a parameter's first step (a scheduler changing it later changes nothing, in torch and here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from explaind.config import StrictModel
from explaind.recurrence import LinearUpdate

from ._common import GroupSnapshot
from ._no_buffer import NoBufferAdapter

__all__ = ["RpropAdapter", "RpropConfig", "RpropGroupConfig", "rprop_preconditioner"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class RpropGroupConfig(StrictModel):
    """Hyperparameters of one Rprop parameter group when recording started."""

    lr: NonNegative = 1e-2
    etas: tuple[NonNegative, NonNegative] = (0.5, 1.2)
    step_sizes: tuple[NonNegative, NonNegative] = (1e-6, 50.0)
    maximize: bool = False
    foreach: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0


class RpropConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.Rprop` run (stored in the trajectory manifest)."""

    param_groups: list[RpropGroupConfig] = Field(default_factory=lambda: [RpropGroupConfig()], min_length=1)


def rprop_preconditioner(step_size: torch.Tensor, prev: torch.Tensor, grad: torch.Tensor,
                         sign: float) -> torch.Tensor:
    """``P = sign * step_size / |grad|`` where ``prev`` (the step's modified gradient) is nonzero, else ``0``."""
    moved = prev != 0
    safe = torch.where(moved, grad.abs(), torch.ones_like(grad))
    return torch.where(moved, step_size / safe, torch.zeros_like(step_size)).mul_(sign)


@dataclass(frozen=True)
class _RpropBefore:
    groups: list[GroupSnapshot]


class RpropAdapter(NoBufferAdapter):
    """Express every :class:`torch.optim.Rprop` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "rprop"
    optimizer_class = torch.optim.Rprop
    #: ``after_step``'s ``P`` is a new tensor each step, never touched again: the recorder keeps it without a copy.
    fresh_tensors: bool = True
    config_model = RpropConfig
    group_model = RpropGroupConfig
    float_keys = ("lr", "etas", "step_sizes")
    complex_why = "Rprop steps real and imaginary parts by their own signs"

    def before_step(self, optimizer: torch.optim.Optimizer) -> _RpropBefore:
        """Snapshot the group options (``maximize``) and the parameters with a gradient."""
        return _RpropBefore(groups=self.checked_groups(optimizer))

    def after_step(self, optimizer: torch.optim.Optimizer, before: _RpropBefore) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only)."""
        out: dict[int, LinearUpdate] = {}
        for snap in before.groups:
            sign = -1.0 if snap.values.get("maximize", False) else 1.0
            for p in snap.with_grad:
                state = optimizer.state[p]
                P = rprop_preconditioner(state["step_size"], state["prev"], p.grad, sign)
                out[id(p)] = LinearUpdate(a=0.0, b=1.0, P=P, q=1.0, n=0.0)
        return out
