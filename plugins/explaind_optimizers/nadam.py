r"""Adapter for :class:`torch.optim.NAdam` (momentum decay, L2 or decoupled weight decay, maximize).

Torch's update for a parameter with gradient ``g_s`` at its ``t``-th step (``t = state["step"]`` after
the step; the single-tensor and foreach paths differ only in the rounding of the denominator):

.. math::

    \mu_t &= \beta_1 \bigl(1 - \tfrac12\, 0.96^{\,t\,\psi}\bigr), \qquad
    \Pi_t = \Pi_{t-1}\,\mu_t \quad(\text{state } \texttt{mu\_product}) \\
    u_s &= g_s + \mathrm{wd}\,\theta_s \quad\text{(L2; skipped when decoupled)} \\
    m_s &= \beta_1 m_{s-1} + (1-\beta_1) u_s, \qquad v_s = \beta_2 v_{s-1} + (1-\beta_2) u_s^2 \\
    d_s &= \sqrt{v_s / (1-\beta_2^t)} + \epsilon \\
    \Delta\theta_s &= -\frac{\mathrm{lr}_s (1-\mu_t)}{1-\Pi_t}\,\frac{u_s}{d_s}
        - \frac{\mathrm{lr}_s\,\mu_{t+1}}{1-\Pi_t \mu_{t+1}}\,\frac{m_s}{d_s}
        - \mathrm{lr}_s \mathrm{wd}\,\theta_s \quad\text{(last term: decoupled only)}

with ``psi = momentum_decay``. In the notation of docs/maths.md §3: ``a = beta1``, ``b = 1 - beta1``, the
diagonal preconditioner ``P = 1 / d_s`` (shape of the parameter), and the two scalars
``q = lr mu_{t+1} / (1 - Pi_t mu_{t+1})`` (weight of the new buffer) and ``n = lr (1 - mu_t) / (1 - Pi_t)``
(weight of the current input), computed from the post-step ``step`` and ``mu_product`` exactly as torch
computes them (Python floats, then the computation dtype).
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

__all__ = ["NAdamAdapter", "NAdamConfig", "NAdamGroupConfig", "nadam_scalars"]


class NAdamGroupConfig(FamilyGroupConfig):
    """Hyperparameters of one NAdam parameter group when recording started."""

    lr: NonNegative = 2e-3
    momentum_decay: NonNegative = 4e-3
    decoupled_weight_decay: bool = False


class NAdamConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.NAdam` run."""

    param_groups: list[NAdamGroupConfig] = Field(default_factory=lambda: [NAdamGroupConfig()], min_length=1)


def nadam_scalars(lr: float, beta1: float, momentum_decay: float, step: float,
                  mu_product: float) -> tuple[float, float]:
    r"""``(q, n)`` of one NAdam step, in torch's operation order (Python floats).

    Parameters
    ----------
    lr, beta1, momentum_decay : float
        Group hyperparameters at the step.
    step : float
        ``t``, the parameter's step count after the step.
    mu_product : float
        :math:`\Pi_t`, ``state["mu_product"]`` after the step (it already includes :math:`\mu_t`).

    Returns
    -------
    q, n : float
        ``lr mu_{t+1} / (1 - Pi_t mu_{t+1})`` and ``lr (1 - mu_t) / (1 - Pi_t)``.
    """
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    n = -(-lr * (1.0 - mu) / (1.0 - mu_product))
    q = -((-lr * mu_next) / (1.0 - mu_product * mu_next))
    return q, n


def _inverse_denominator(exp_avg_sq: torch.Tensor, bias_correction2: float, eps: float, foreach: bool,
                         out: torch.Tensor | None) -> torch.Tensor:
    """``1 / d_s`` in ``out`` (or new memory), with the denominator of the path torch ran."""
    if foreach:  # torch: sqrt(v), then / sqrt(1 - beta2^t), then + eps
        denom = torch.sqrt(exp_avg_sq, out=out).div_(bias_correction2**0.5).add_(eps)
    else:  # torch: (v / (1 - beta2^t)).sqrt() + eps
        denom = torch.div(exp_avg_sq, bias_correction2, out=out).sqrt_().add_(eps)
    return denom.reciprocal_()


class NAdamAdapter(AdamFamilyAdapter):
    """Express every :class:`torch.optim.NAdam` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "nadam"
    optimizer_class = torch.optim.NAdam
    group_model = NAdamGroupConfig
    config_model = NAdamConfig
    float_keys = ("lr", "betas", "eps", "weight_decay", "momentum_decay")

    def coefficients(self, values: dict[str, Any], state: dict[str, Any], p: torch.Tensor,
                     foreach: bool) -> tuple[Pending, float, float]:
        """``P = 1 / d_s`` with the path's denominator, and the scalars ``q``, ``n``."""
        beta1, beta2 = (float(b) for b in values["betas"])
        eps, step = float(values["eps"]), step_count(state["step"])
        q, n = nadam_scalars(float(values["lr"]), beta1, float(values["momentum_decay"]), step,
                             step_count(state["mu_product"]))
        fill = functools.partial(_inverse_denominator, state["exp_avg_sq"], 1 - beta2**step, eps, foreach)
        return Pending(state["exp_avg_sq"], fill), as_used(q, p.dtype), as_used(n, p.dtype)
