r"""Adapter for :class:`torch.optim.ASGD` (averaged SGD: step size decay, decay term ``lambd``, L2 weight decay).

Torch's update for a parameter with gradient ``g_s`` at its ``t``-th step, with the step size
:math:`\eta` held in ``state["eta"]`` (computed at the end of the previous step, ``lr`` at the first):

.. math::

    u_s &= \pm g_s + \mathrm{wd}\,\theta_s \qquad (- \text{ under maximize}) \\
    \theta_{s+1} &= (1 - \lambda\eta)\,\theta_s - \eta\,u_s \qquad \text{(single-tensor path)} \\
    \theta_{s+1} &= \theta_s - \eta\,(u_s + \lambda\theta_s) \qquad \text{(foreach path)} \\
    \eta &\leftarrow \mathrm{lr}_s / (1 + \lambda\,\mathrm{lr}_s\,t)^{\alpha}

In the notation of docs/maths.md §3: ``a, b = 0, 1`` (no momentum buffer), ``P = eta`` (``-eta`` under
``maximize``), ``q, n = 1, 0``, ``lambda_c = wd``; the decay term is decoupled on the single-tensor path,
``lambda_d = 1 - fl(1 - lambd * eta)`` (the factor torch multiplied with), and coupled on the foreach path,
``lambda_c = wd + lambd`` (``-(wd + lambd)`` under ``maximize``, which negates only the gradient there).
:math:`\eta` is read from the live state before the step; torch keeps it in its scalar dtype (float32 unless
the default dtype is float64), so the adapter reports that rounded value, as torch's ``eta.item()`` does.

ASGD also keeps the running average ``state["ax"]`` of the iterates, which it never writes into the model: the
recorded trajectory, its replica and its scores are those of the iterate ``theta`` the optimizer trains, not of
the average (evaluate the average as another model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from explaind.config import StrictModel
from explaind.recurrence import LinearUpdate

from ._adam_family import uses_foreach
from ._common import GroupSnapshot, as_used
from ._no_buffer import NoBufferAdapter

__all__ = ["ASGDAdapter", "ASGDConfig", "ASGDGroupConfig"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class ASGDGroupConfig(StrictModel):
    """Hyperparameters of one ASGD parameter group when recording started."""

    lr: NonNegative = 1e-2
    lambd: NonNegative = 1e-4
    alpha: NonNegative = 0.75
    t0: NonNegative = 1e6
    weight_decay: NonNegative = 0.0
    maximize: bool = False
    foreach: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0


class ASGDConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.ASGD` run (stored in the trajectory manifest)."""

    param_groups: list[ASGDGroupConfig] = Field(default_factory=lambda: [ASGDGroupConfig()], min_length=1)


def _scalar_dtype() -> torch.dtype:
    """The dtype torch keeps ASGD's ``eta`` in: float64 when it is the default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_size(optimizer: torch.optim.Optimizer, p: torch.Tensor, lr: float) -> float:
    r"""The :math:`\eta` torch's next step applies to ``p``: ``state["eta"]``, or ``lr`` in torch's scalar dtype at
    the first step (torch creates the state then)."""
    eta = optimizer.state.get(p, {}).get("eta")
    if eta is None:
        return float(torch.as_tensor(lr, dtype=_scalar_dtype()).item())
    return float(eta.item()) if isinstance(eta, torch.Tensor) else float(eta)


@dataclass(frozen=True)
class _ASGDBefore:
    groups: list[GroupSnapshot]
    etas: dict[int, float]  # id(param) -> the eta of this step


class ASGDAdapter(NoBufferAdapter):
    """Express every :class:`torch.optim.ASGD` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "asgd"
    optimizer_class = torch.optim.ASGD
    config_model = ASGDConfig
    group_model = ASGDGroupConfig
    float_keys = ("lr", "lambd", "alpha", "t0", "weight_decay")
    complex_why = "ASGD updates real and imaginary parts as separate real numbers"

    def before_step(self, optimizer: torch.optim.Optimizer) -> _ASGDBefore:
        """Snapshot the group hyperparameters and each stepped parameter's :math:`\\eta` (changed by the step)."""
        groups = self.checked_groups(optimizer)
        etas = {id(p): step_size(optimizer, p, float(snap.values["lr"])) for snap in groups for p in snap.with_grad}
        return _ASGDBefore(groups=groups, etas=etas)

    def after_step(self, optimizer: torch.optim.Optimizer, before: _ASGDBefore) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only)."""
        out: dict[int, LinearUpdate] = {}
        for snap in before.groups:
            v = snap.values
            sign = -1.0 if v.get("maximize", False) else 1.0
            lambd, wd = float(v["lambd"]), float(v["weight_decay"])
            foreach = uses_foreach(v, snap.with_grad)
            for p in snap.with_grad:
                dt = p.dtype
                eta = before.etas[id(p)]
                P = sign * as_used(eta, dt)
                if foreach:  # theta -= eta * (u + lambd * theta), maximize negating the gradient only
                    lambda_c = sign * (as_used(wd, dt) + as_used(lambd, dt))
                    out[id(p)] = LinearUpdate(a=0.0, b=1.0, P=P, q=1.0, n=0.0, lambda_c=lambda_c)
                    continue
                lambda_c = sign * as_used(wd, dt) if wd != 0.0 else 0.0
                lambda_d = 1.0 - as_used(1.0 - lambd * eta, dt)
                out[id(p)] = LinearUpdate(a=0.0, b=1.0, P=P, q=1.0, n=0.0, lambda_c=lambda_c, lambda_d=lambda_d)
        return out
