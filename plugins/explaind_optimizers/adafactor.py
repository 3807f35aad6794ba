r"""Adapter for :class:`torch.optim.Adafactor` (factored second moment, relative step size, update clipping).

Torch's update of a parameter :math:`\theta` with gradient ``g_s`` at its ``t``-th step (``t = state["step"]``
after the step; the single-tensor and foreach paths compute the same arithmetic), with ``sigma = -1`` under
``maximize`` and ``1`` otherwise:

.. math::

    \rho_t &= \min(\mathrm{lr}_s, 1/\sqrt{t}), \qquad
    \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_s))\,\rho_t \\
    \hat V_t &= \begin{cases} R_t C_t / \max(\bar R_t, \epsilon_1) & \text{factored (two or more dims)} \\
                             V_t & \text{one dimension} \end{cases} \\
    U_t &= \sigma\, g_s \odot \max(\hat V_t, \epsilon_1^2)^{-1/2}, \qquad
    \delta_t = \max\bigl(1, \mathrm{RMS}(U_t) / d\bigr) \\
    \Delta\theta_s &= -\mathrm{lr}_s\,\mathrm{wd}\;\theta_s - (\alpha_t / \delta_t)\, U_t

where the row and column factors :math:`R_t, C_t` (or the full :math:`V_t` of a vector) are running means of
:math:`g_s^2` over the last and the second-to-last axis, with weight :math:`t^{\text{beta2\_decay}}` for the new
term, and :math:`\bar R_t` is the mean of :math:`R_t` over its second-to-last axis. Every quantity here
depends on ``g_s`` only through :math:`g_s^2` or through norms, so the step is linear in ``g_s`` once the
diagonal preconditioner is read after it.

In the notation of docs/maths.md §3: ``a, b = 0, 1`` (no momentum buffer), ``q, n = 1, 0``,
``lambda_c = 0``, ``lambda_d = lr_s wd`` (decoupled, on :math:`\theta_s`, as torch's ``mul_(1 - lr wd)``), and

.. math::

    P_s = \sigma\, \frac{\alpha_t}{\delta_t}\, \max(\hat V_t, \epsilon_1^2)^{-1/2},

computed after the step from the updated factors with torch's operations in torch's order (so
:math:`\hat V_t` is bit-identical to torch's), :math:`\mathrm{RMS}(\theta_s)` taken before the step (torch takes
it before the weight decay) and :math:`\delta_t` from ``p.grad``, which the step leaves in place.
``eps[0] = None`` is the machine epsilon of the parameter's dtype, as in torch.

Like Adam's, the preconditioner is read from the gradient of the step itself; the per-sample atoms of
docs/maths.md §3 split the update exactly with it held fixed. Torch creates the state lazily at the first
step, and Adafactor has no first moment, so a recording that opens on held state (after unrecorded steps or
a restored checkpoint) needs no start buffer: the factors and the step count are read from the live state
at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from explaind.config import StrictModel
from explaind.recurrence import LinearUpdate

from ._common import (
    DIFFERENTIABLE_RULE,
    GroupSnapshot,
    as_used,
    check_amp_scaling,
    checked_config,
    collect_group_problems,
    raise_problems,
    snapshot_groups,
)

__all__ = ["AdafactorAdapter", "AdafactorConfig", "AdafactorGroupConfig", "adafactor_preconditioner"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

_RULES = (DIFFERENTIABLE_RULE,)
_FLOAT_KEYS = ("lr", "beta2_decay", "eps", "d", "weight_decay")


class AdafactorGroupConfig(StrictModel):
    """Hyperparameters of one Adafactor parameter group when recording started.

    ``eps`` is torch's ``(eps1, eps2)``; ``eps1 = None`` means the machine epsilon of the parameter's dtype,
    resolved per parameter at each step.
    """

    lr: NonNegative = 1e-2
    beta2_decay: Annotated[float, Field(le=0.0, allow_inf_nan=False)] = -0.8
    eps: tuple[NonNegative | None, NonNegative] = (None, 1e-3)
    d: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 1.0
    weight_decay: NonNegative = 0.0
    maximize: bool = False
    foreach: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0
    #: ``eps[0]`` as torch applies it: the machine epsilon of the group's parameter dtype when ``eps[0]`` is None
    eps1_used: NonNegative | None = None


class AdafactorConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.Adafactor` run (stored in the trajectory manifest)."""

    param_groups: list[AdafactorGroupConfig] = Field(default_factory=lambda: [AdafactorGroupConfig()], min_length=1)


def _rms(t: torch.Tensor) -> float:
    """``||t||_2 / sqrt(numel)`` as torch's Adafactor computes it (a Python float)."""
    return t.norm(2).item() / (t.numel() ** 0.5)


def _variance_estimate(state: dict[str, Any], eps1: float) -> torch.Tensor:
    r""":math:`\hat V_t` from the updated state, with torch's operations in torch's order (new memory)."""
    if "row_var" in state:
        row_var, col_var = state["row_var"], state["col_var"]
        estimate = row_var @ col_var
        return estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    return state["variance"].clone()


def adafactor_preconditioner(state: dict[str, Any], grad: torch.Tensor, rms_before: float, lr: float,
                             eps1: float, eps2: float, d: float, sign: float) -> torch.Tensor:
    r"""``P_s`` of one parameter after torch's Adafactor step (module docstring), as a new tensor.

    Parameters
    ----------
    state : dict
        ``optimizer.state[p]`` after the step (``step`` and ``row_var``/``col_var`` or ``variance``).
    grad : Tensor
        ``p.grad`` of the step (shape of the parameter), unsigned.
    rms_before : float
        :math:`\mathrm{RMS}(\theta_s)` before the step.
    lr, eps1, eps2, d : float
        The group's values at the step (``eps1`` resolved).
    sign : float
        ``-1`` under ``maximize``, else ``1``.

    Returns
    -------
    Tensor
        Shape of the parameter, its dtype.
    """
    step = state["step"]
    t = step.item() if isinstance(step, torch.Tensor) else float(step)
    alpha = max(eps2, rms_before) * min(lr, 1 / (t ** 0.5))
    inv_root = _variance_estimate(state, eps1).clamp_(min=eps1 * eps1).rsqrt_()
    update_norm = torch.mul(inv_root, grad).norm(2).item()
    denom = max(1.0, update_norm / ((grad.numel() ** 0.5) * d))
    return inv_root.mul_(as_used(sign * alpha / denom, grad.dtype))


@dataclass(frozen=True)
class _AdafactorBefore:
    """The groups at the step and :math:`\\mathrm{RMS}(\\theta_s)` of every parameter with a gradient."""

    groups: list[GroupSnapshot]
    rms: dict[int, float]


def _eps1(value: float | None, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if value is None else float(value)


def _scalar_problems(optimizer: torch.optim.Optimizer) -> list[str]:
    """A problem per group whose ``eps`` is not a pair (torch unpacks it as ``eps1, eps2``)."""
    return [
        f"param_groups[{g}]['eps']={group.get('eps')!r} is not a pair (eps1, eps2). Allowed: a tuple of "
        f"(None or a float, a float). Fix: pass eps=(None, 1e-3) (torch's default) or your own pair."
        for g, group in enumerate(optimizer.param_groups)
        if not (isinstance(group.get("eps"), tuple | list) and len(group["eps"]) == 2)
    ]


class AdafactorAdapter:
    """Express every :class:`torch.optim.Adafactor` step as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "adafactor"
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adafactor
    #: ``after_step``'s ``P`` is a new tensor each step, never touched again: the recorder keeps it without a copy.
    fresh_tensors: bool = True
    config_model: type[AdafactorConfig] = AdafactorConfig
    group_model: type[AdafactorGroupConfig] = AdafactorGroupConfig

    def __init__(self, config: AdafactorConfig):
        self._config = config

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> AdafactorAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            Listing every option the recurrence cannot express (``differentiable=True``, tensor hyperparameters,
            an ``eps`` that is not a pair, complex parameters, a different class).
        """
        raise_problems(cls.name, optimizer, _scalar_problems(optimizer))
        config = checked_config(cls, optimizer, _RULES, _FLOAT_KEYS, "Adafactor does not support them")
        groups = [g.model_copy(update={"eps1_used": _eps1(g.eps[0], group["params"][0].dtype) if group["params"]
                                       else g.eps[0]})
                  for g, group in zip(config.param_groups, optimizer.param_groups)]
        return cls(config.model_copy(update={"param_groups": groups}))

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by :class:`AdafactorConfig`."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        r"""No start buffer: Adafactor has no first moment (``a = 0``), so :math:`m_{-1}` never enters an update.

        Its factors and step count are read from the live state at every step (docs/maths.md §4, "Optimizer state
        at the start").
        """
        return {}

    def before_step(self, optimizer: torch.optim.Optimizer) -> _AdafactorBefore:
        r"""Snapshot the groups (schedulers may change ``lr``) and :math:`\mathrm{RMS}(\theta_s)` of every parameter
        with a gradient (torch reads it before its weight decay changes :math:`\theta`)."""
        check_amp_scaling(self.name, optimizer)
        raise_problems(self.name, optimizer, collect_group_problems(optimizer, _RULES, _FLOAT_KEYS)
                       + _scalar_problems(optimizer))
        groups = snapshot_groups(optimizer)
        return _AdafactorBefore(groups, {id(p): _rms(p.detach()) for snap in groups for p in snap.with_grad})

    def after_step(self, optimizer: torch.optim.Optimizer, before: _AdafactorBefore, *,
                   out: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                   defer: Callable[[Callable[[], None]], None] | None = None) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only).

        ``P`` needs ``p.grad`` of the step (through :math:`\\delta_t`), so it is computed here, in new memory;
        ``out`` and ``defer`` are accepted and not used.
        """
        updates: dict[int, LinearUpdate] = {}
        for snap in before.groups:
            v = snap.values
            sign = -1.0 if v.get("maximize", False) else 1.0
            lr, d, wd = float(v["lr"]), float(v["d"]), float(v["weight_decay"])
            eps1_value, eps2 = v["eps"]
            for p in snap.with_grad:
                dt = p.dtype
                P = adafactor_preconditioner(optimizer.state[p], p.grad, before.rms[id(p)], lr,
                                             _eps1(eps1_value, dt), float(eps2), d, sign)
                lambda_d = 1.0 - as_used(1.0 - lr * wd, dt) if wd != 0.0 else 0.0
                updates[id(p)] = LinearUpdate(a=0.0, b=1.0, P=P, q=1.0, n=0.0, lambda_c=0.0, lambda_d=lambda_d)
        return updates
