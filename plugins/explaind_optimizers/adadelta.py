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
from typing import Annotated, Any

import torch
from pydantic import Field

from explaind.config import StrictModel
from explaind.recurrence import LinearUpdate

from ._common import (
    DIFFERENTIABLE_RULE,
    GroupSnapshot,
    OptionRule,
    as_used,
    check_amp_scaling,
    checked_config,
    collect_group_problems,
    raise_problems,
    snapshot_groups,
    sparse_problems,
)

__all__ = ["AdadeltaAdapter", "AdadeltaConfig", "AdadeltaGroupConfig"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

_RULES = (
    DIFFERENTIABLE_RULE,
    OptionRule(
        key="capturable",
        allowed=(False,),
        reason="the capturable path is for CUDA graphs, which cannot record per-step coefficients",
        fix="build the optimizer with capturable=False",
    ),
)
_FLOAT_KEYS = ("lr", "rho", "eps", "weight_decay")


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


class AdadeltaAdapter:
    """Express every :class:`torch.optim.Adadelta` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "adadelta"
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adadelta
    #: ``after_step``'s ``P`` is a new tensor each step, never touched again: the recorder keeps it without a copy.
    fresh_tensors: bool = True
    config_model: type[AdadeltaConfig] = AdadeltaConfig
    group_model: type[AdadeltaGroupConfig] = AdadeltaGroupConfig

    def __init__(self, config: AdadeltaConfig):
        self._config = config

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> AdadeltaAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            Listing every option the recurrence cannot express (``differentiable=True``, ``capturable=True``,
            tensor hyperparameters, complex parameters, a different class).
        """
        return cls(checked_config(cls, optimizer, _RULES, _FLOAT_KEYS, "Adadelta averages real and imaginary "
                                  "parts separately"))

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by :class:`AdadeltaConfig`."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        r"""No start buffer: Adadelta has no momentum (``a = 0``), so :math:`m_{-1}` never enters an update.

        Its running averages are read from the live state at each step (docs/maths.md §4, "Optimizer state at
        the start").
        """
        return {}

    def before_step(self, optimizer: torch.optim.Optimizer) -> _AdadeltaBefore:
        """Snapshot the group hyperparameters and ``sqrt(acc_delta + eps)`` of each stepped parameter."""
        check_amp_scaling(self.name, optimizer)
        raise_problems(self.name, optimizer, collect_group_problems(optimizer, _RULES, _FLOAT_KEYS)
                       + sparse_problems(optimizer))
        groups = snapshot_groups(optimizer)
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
