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

__all__ = ["ASGDAdapter", "ASGDConfig", "ASGDGroupConfig"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

_RULES = (
    DIFFERENTIABLE_RULE,
    OptionRule(
        key="capturable",
        allowed=(False,),
        reason="the capturable path multiplies by the step size as a device tensor, for CUDA graphs, which cannot "
        "record per-step coefficients",
        fix="build the optimizer with capturable=False",
    ),
)
_FLOAT_KEYS = ("lr", "lambd", "alpha", "t0", "weight_decay")


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


class ASGDAdapter:
    """Express every :class:`torch.optim.ASGD` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "asgd"
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.ASGD
    config_model: type[ASGDConfig] = ASGDConfig
    group_model: type[ASGDGroupConfig] = ASGDGroupConfig

    def __init__(self, config: ASGDConfig):
        self._config = config

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> ASGDAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            Listing every option the recurrence cannot express (``differentiable=True``, ``capturable=True``,
            tensor hyperparameters, complex parameters, a different class).
        """
        return cls(checked_config(cls, optimizer, _RULES, _FLOAT_KEYS, "ASGD updates real and imaginary parts "
                                  "as separate real numbers"))

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by :class:`ASGDConfig`."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        r"""No start buffer: ASGD has no momentum (``a = 0``), so :math:`m_{-1}` never enters an update.

        A held state (a restored checkpoint) carries only :math:`\eta`, the step count and the average, read from
        the live state at each step (docs/maths.md §4, "Optimizer state at the start").
        """
        return {}

    def before_step(self, optimizer: torch.optim.Optimizer) -> _ASGDBefore:
        """Snapshot the group hyperparameters and each stepped parameter's :math:`\\eta` (changed by the step)."""
        check_amp_scaling(self.name, optimizer)
        raise_problems(self.name, optimizer, collect_group_problems(optimizer, _RULES, _FLOAT_KEYS)
                       + sparse_problems(optimizer))
        groups = snapshot_groups(optimizer)
        etas = {id(p): step_size(optimizer, p, float(snap.values["lr"])) for snap in groups for p in snap.with_grad}
        return _ASGDBefore(groups=groups, etas=etas)

    def after_step(self, optimizer: torch.optim.Optimizer, before: _ASGDBefore) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only)."""
        out: dict[int, LinearUpdate] = {}
        for snap in before.groups:
            v = snap.values
            sign = -1.0 if v.get("maximize", False) else 1.0
            lambd, wd = float(v["lambd"]), float(v["weight_decay"])
            foreach = bool(v.get("foreach")) or (v.get("foreach") is None and bool(snap.with_grad) and all(
                p.device.type in ("cuda", "xpu") for p in snap.with_grad))
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
