r"""Adapter for :class:`torch.optim.Adamax` (infinity-norm denominator, L2 weight decay, maximize).

Torch's update for a parameter with gradient ``g_s`` at its ``t``-th step (``t = state["step"]`` after
the step; single-tensor and foreach paths compute the same arithmetic):

.. math::

    u_s &= g_s + \mathrm{wd}\,\theta_s \\
    m_s &= \beta_1 m_{s-1} + (1-\beta_1) u_s, \qquad
    e_s = \max(\beta_2 e_{s-1},\ |u_s| + \epsilon) \quad(\text{state } \texttt{exp\_inf}) \\
    \Delta\theta_s &= -\frac{\mathrm{lr}_s}{1-\beta_1^t}\,\frac{m_s}{e_s}

In the notation of docs/maths.md §3: ``a = beta1``, ``b = 1 - beta1``, ``q, n = 1, 0``, ``lambda_c = wd``
and the per-step diagonal preconditioner ``P = lr / (1 - beta1^t) / e_s`` (shape of the parameter), read
from the post-step ``exp_inf``. Adamax has no decoupled weight decay.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from pydantic import Field

from explaind.config import StrictModel

from ._adam_family import AdamFamilyAdapter, FamilyGroupConfig, step_count
from ._common import as_used
from ._pooled import Pending
from .adam import NonNegative

__all__ = ["AdamaxAdapter", "AdamaxConfig", "AdamaxGroupConfig"]


class AdamaxGroupConfig(FamilyGroupConfig):
    """Hyperparameters of one Adamax parameter group when recording started."""

    lr: NonNegative = 2e-3


class AdamaxConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.Adamax` run."""

    param_groups: list[AdamaxGroupConfig] = Field(default_factory=lambda: [AdamaxGroupConfig()], min_length=1)


class AdamaxAdapter(AdamFamilyAdapter):
    """Express every :class:`torch.optim.Adamax` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "adamax"
    optimizer_class = torch.optim.Adamax
    group_model = AdamaxGroupConfig
    config_model = AdamaxConfig
    decoupled_key = False

    def coefficients(self, values: dict[str, Any], state: dict[str, Any], p: torch.Tensor,
                     foreach: bool) -> tuple[Pending, float, float]:
        """``P = clr / e_s`` with ``clr = lr / (1 - beta1^t)`` (torch: ``addcdiv_(m, e, value=-clr)``)."""
        beta1 = float(values["betas"][0])
        clr = float(values["lr"]) / (1 - beta1 ** step_count(state["step"]))
        exp_inf = state["exp_inf"]
        return Pending(exp_inf, functools.partial(_over_exp_inf, as_used(clr, p.dtype), exp_inf)), 1.0, 0.0


def _over_exp_inf(clr: float, exp_inf: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``P = clr / exp_inf`` in ``out`` (or new memory); the scalar as a 0-d CPU tensor."""
    return torch.div(torch.tensor(clr, dtype=exp_inf.dtype), exp_inf, out=out)
