r"""Adapter for :class:`torch.optim.RAdam` (rectification, L2 or decoupled weight decay, maximize).

Torch's update for a parameter with gradient ``g_s`` at its ``t``-th step (``t = state["step"]`` after
the step):

.. math::

    u_s &= g_s + \mathrm{wd}\,\theta_s \quad\text{(L2; skipped when decoupled)} \\
    m_s &= \beta_1 m_{s-1} + (1-\beta_1) u_s, \qquad v_s = \beta_2 v_{s-1} + (1-\beta_2) u_s^2 \\
    \rho_\infty &= \frac{2}{1-\beta_2} - 1, \qquad
    \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t}, \qquad
    r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
    \Delta\theta_s &= -\frac{\mathrm{lr}_s}{1-\beta_1^t}\, m_s \cdot
        \begin{cases} r_t \sqrt{1-\beta_2^t} / (\sqrt{v_s} + \epsilon) & \rho_t > 5 \\
        1 & \rho_t \le 5 \end{cases}
        \;-\; \mathrm{lr}_s \mathrm{wd}\,\theta_s \quad\text{(last term: decoupled only)}

In the notation of docs/maths.md §3: ``a = beta1``, ``b = 1 - beta1``, ``q, n = 1, 0``, and ``P`` the
rectified diagonal preconditioner ``lr r_t sqrt(1 - beta2^t) / (1 - beta1^t) / (sqrt(v) + eps)`` (shape of
the parameter) when ``rho_t > 5``, else the scalar ``lr / (1 - beta1^t)`` of an un-preconditioned momentum
step. The foreach path's ``P`` is recomputed in its own operation order.
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

__all__ = ["RAdamAdapter", "RAdamConfig", "RAdamGroupConfig", "radam_rectification"]


class RAdamGroupConfig(FamilyGroupConfig):
    """Hyperparameters of one RAdam parameter group when recording started."""

    decoupled_weight_decay: bool = False


class RAdamConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.RAdam` run."""

    param_groups: list[RAdamGroupConfig] = Field(default_factory=lambda: [RAdamGroupConfig()], min_length=1)


def radam_rectification(beta2: float, step: float) -> float | None:
    r"""The rectification :math:`r_t` of step ``t``, or ``None`` when :math:`\rho_t \le 5` (torch's arithmetic)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)
    if not rho_t > 5.0:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def _foreach_P(exp_avg_sq: torch.Tensor, eps: float, scale: float, out: torch.Tensor | None) -> torch.Tensor:
    """The foreach path's rectified ``P`` in ``out`` (or new memory): ``-(1 / ((sqrt(v) + eps) / scale))``."""
    return torch.sqrt(exp_avg_sq, out=out).add_(eps).div_(scale).reciprocal_().neg_()


def _single_tensor_P(exp_avg_sq: torch.Tensor, eps: float, sqrt_bc2: float, step_size: float, rect: float,
                     out: torch.Tensor | None) -> torch.Tensor:
    """The single-tensor path's rectified ``P`` in ``out`` (or new memory): ``sqrt(bc2) / (sqrt(v) + eps)``
    times ``lr / bc1``, times ``r_t`` (the scalars already rounded as torch uses them)."""
    adaptive = torch.sqrt(exp_avg_sq, out=out).add_(eps)
    adaptive = torch.div(torch.tensor(sqrt_bc2, dtype=adaptive.dtype), adaptive, out=adaptive)
    return adaptive.mul_(step_size).mul_(rect)


class RAdamAdapter(AdamFamilyAdapter):
    """Express every :class:`torch.optim.RAdam` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "radam"
    optimizer_class = torch.optim.RAdam
    group_model = RAdamGroupConfig
    config_model = RAdamConfig

    def coefficients(self, values: dict[str, Any], state: dict[str, Any], p: torch.Tensor,
                     foreach: bool) -> tuple[float | Pending, float, float]:
        """``P`` (a tensor when rectified, else a float) and ``q, n = 1, 0``."""
        beta1, beta2 = (float(b) for b in values["betas"])
        lr, eps, step = float(values["lr"]), float(values["eps"]), step_count(state["step"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rect = radam_rectification(beta2, step)
        if rect is None:  # torch: param.add_(exp_avg / bc1 * lr, alpha=-1)
            return as_used(lr / bias_correction1, p.dtype), 1.0, 0.0
        v = state["exp_avg_sq"]
        if foreach:  # torch: 1 / ((sqrt(v) + eps) / (-sqrt(bc2) lr r / bc1)), added to -0.0, times m
            scale = (bias_correction2**0.5) * (lr * rect / bias_correction1) * -1
            return Pending(v, functools.partial(_foreach_P, v, eps, scale)), 1.0, 0.0
        scalars = tuple(as_used(x, p.dtype) for x in (bias_correction2**0.5, lr / bias_correction1, rect))
        return Pending(v, functools.partial(_single_tensor_P, v, eps, *scalars)), 1.0, 0.0
