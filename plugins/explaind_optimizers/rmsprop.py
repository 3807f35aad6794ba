r"""Adapter for :class:`torch.optim.RMSprop` (L2 weight decay, momentum, centered, maximize).

Torch's update for a parameter with gradient ``g_s`` (single-tensor and foreach paths compute the same
elementwise arithmetic):

.. math::

    u_s &= \pm g_s + \mathrm{wd}\,\theta_s \qquad (- \text{ under maximize}) \\
    v_s &= \alpha v_{s-1} + (1-\alpha) u_s^2, \qquad
    \bar g_s = \mathrm{lerp}(\bar g_{s-1}, u_s, 1-\alpha) \quad\text{(centered only)} \\
    d_s &= \sqrt{v_s} + \epsilon \quad\text{or, centered,}\quad \sqrt{v_s - \bar g_s^2} + \epsilon \\
    \Delta\theta_s &= -\mathrm{lr}_s\, u_s / d_s \quad\text{(momentum 0)} \\
    \mathrm{buf}_s &= \mu\,\mathrm{buf}_{s-1} + u_s / d_s, \qquad \Delta\theta_s = -\mathrm{lr}_s\,\mathrm{buf}_s
    \quad\text{(momentum } \mu > 0\text{)}

In the notation of docs/maths.md §3 (recurrence of :mod:`explaind.recurrence`):

* momentum 0: ``a, b = 0, 1``, the diagonal preconditioner ``P = lr_s / d_s``, ``q, n = 1, 0``;
* momentum ``mu > 0``: the buffer accumulates *preconditioned* inputs, so ``a = mu``, the tensor gain
  ``b = 1 / d_s``, ``P = lr_s`` (a scalar), ``q, n = 1, 0``; torch starts the buffer at zero, so no first
  step is special;
* momentum set to 0 after a buffer existed: torch keeps the buffer untouched and steps without it,
  ``a, b = 1, 0``, ``P = lr_s / d_s``, ``q, n = 0, 1``;

and ``lambda_c = wd`` (``lambda_d = 0``). ``d_s`` is recomputed after the step from ``square_avg``
(and ``grad_avg``) with torch's own operations and order (``addcmul(..., value=-1)``, ``sqrt``, ``add eps``),
so it holds the bits torch divided by. ``maximize=True`` is modelled by ``P -> -P`` and
``lambda_c -> -lambda_c``: the modelled buffer is the negative of torch's.
"""

from __future__ import annotations

import functools
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
    OptionRule,
    as_used,
    check_amp_scaling,
    checked_config,
    collect_group_problems,
    maximize_switch_problems,
    raise_problems,
    remember_maximize,
    snapshot_groups,
    start_buffers,
)
from ._pooled import Pending, StepSlots

__all__ = ["RMSpropAdapter", "RMSpropConfig", "RMSpropGroupConfig", "denominator"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

_RULES = (
    DIFFERENTIABLE_RULE,
    OptionRule(
        key="capturable",
        allowed=(False,),
        reason="CUDA-graph capture cannot record per-step coefficients, and the capturable path divides by a "
        "device learning rate in its own operation order",
        fix="build the optimizer with capturable=False",
    ),
)
_FLOAT_KEYS = ("lr", "alpha", "eps", "weight_decay", "momentum")


class RMSpropGroupConfig(StrictModel):
    """Hyperparameters of one RMSprop parameter group when recording started."""

    lr: NonNegative = 1e-2
    alpha: NonNegative = 0.99
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    momentum: NonNegative = 0.0
    centered: bool = False
    maximize: bool = False
    foreach: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0


class RMSpropConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.RMSprop` run (stored in the trajectory manifest)."""

    param_groups: list[RMSpropGroupConfig] = Field(default_factory=lambda: [RMSpropGroupConfig()], min_length=1)


@dataclass(frozen=True)
class _RMSpropBefore:
    groups: list[GroupSnapshot]
    buffered: frozenset[int]  # id(param) of parameters holding a momentum buffer before the step


def denominator(state: dict[str, Any], centered: bool, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    r"""RMSprop's ``d_s`` from ``optimizer.state[param]`` *after* the step, with torch's operation order.

    Parameters
    ----------
    state : dict
        ``square_avg`` (and ``grad_avg`` when centered), shape of the parameter.
    centered : bool
        Subtract the square of the running mean of the inputs.
    eps : float
        Added after the square root.
    out : Tensor, optional
        Where to compute ``d_s`` (shape, dtype and device of ``square_avg``, contiguous); ``None``: new memory.
        The same elementwise operations run in it, so the bits are those of new memory.

    Returns
    -------
    Tensor
        ``sqrt(square_avg) + eps`` or ``sqrt(square_avg - grad_avg^2) + eps`` (``out`` or a new tensor, shape
        of the parameter), computed as torch does: ``square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()``
        (or ``square_avg.sqrt()``), then ``add_(eps)``.
    """
    square = state["square_avg"]
    if centered:
        avg = torch.addcmul(square, state["grad_avg"], state["grad_avg"], value=-1, out=out).sqrt_()
    else:
        avg = torch.sqrt(square, out=out)
    return avg.add_(eps)


def _gain(state: dict[str, Any], centered: bool, eps: float, out: torch.Tensor | None) -> torch.Tensor:
    """``b = 1 / d_s`` (momentum > 0), in ``out`` or new memory."""
    return denominator(state, centered, eps, out).reciprocal_()


def _scaled_inverse(scale: float, state: dict[str, Any], centered: bool, eps: float,
                    out: torch.Tensor | None) -> torch.Tensor:
    """``P = scale / d_s`` in ``d_s``'s memory (``out`` or new); the scalar as a 0-d CPU tensor."""
    d = denominator(state, centered, eps, out)
    return torch.div(torch.tensor(scale, dtype=d.dtype), d, out=d)


class RMSpropAdapter:
    """Express every :class:`torch.optim.RMSprop` step as a :class:`~explaind.recurrence.LinearUpdate`.

    Build it with :meth:`from_optimizer`; the recorder calls :meth:`before_step` and :meth:`after_step`
    around each ``optimizer.step()``.
    """

    name = "rmsprop"
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.RMSprop
    #: Every tensor ``after_step`` returns (``P`` or ``b``) is new (or the recorder's ``out`` buffer) and never
    #: touched again.
    fresh_tensors: bool = True
    config_model: type[RMSpropConfig] = RMSpropConfig
    group_model: type[RMSpropGroupConfig] = RMSpropGroupConfig

    def __init__(self, config: RMSpropConfig):
        self._config = config
        self._maximize: dict[int, bool] = {}  # maximize at each parameter's last step (id(param))

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> RMSpropAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            Listing every option the recurrence cannot express (``differentiable=True``,
            ``capturable=True``, tensor hyperparameters, complex parameters, a different class).
        """
        return cls(checked_config(cls, optimizer, _RULES, _FLOAT_KEYS, "RMSprop divides real and imaginary parts "
                                  "by separate denominators"))

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by :class:`RMSpropConfig`."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        r"""The ``momentum_buffer`` buffers at the start of recording: :math:`m_{-1}` of docs/maths.md §4.

        Called by the recorder when its ``with`` block opens on an optimizer restored from a checkpoint or that
        took unrecorded steps. The second moment ``square_avg`` and ``grad_avg`` are read from the live state at
        every step (they enter ``d_s`` only), so only the momentum buffer needs a start value (negated under
        ``maximize``). Returns ``id(param) -> m_{-1}`` for the parameters holding one.
        """
        return start_buffers(optimizer, "momentum_buffer", self._maximize)

    def resumed(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by ``TrajectoryRecorder.restore()`` once the recorded optimizer state is loaded.

        The loaded momentum buffers were built with the loaded ``maximize``; switching it afterwards is
        refused at the next step, as a switch mid-run is.
        """
        remember_maximize(optimizer, self._maximize)

    def before_step(self, optimizer: torch.optim.Optimizer) -> _RMSpropBefore:
        """Snapshot the group hyperparameters and which parameters already hold a momentum buffer."""
        check_amp_scaling(self.name, optimizer)
        problems = collect_group_problems(optimizer, _RULES, _FLOAT_KEYS)
        # grad_avg (centered) carries the sign of the inputs too: a switch is refused while either buffer exists
        problems += maximize_switch_problems(optimizer, dict(self._maximize), "grad_avg")
        problems += maximize_switch_problems(optimizer, self._maximize, "momentum_buffer")
        raise_problems(self.name, optimizer, problems)
        groups = snapshot_groups(optimizer)
        buffered = frozenset(id(p) for snap in groups for p in snap.with_grad
                             if optimizer.state.get(p, {}).get("momentum_buffer") is not None)
        return _RMSpropBefore(groups=groups, buffered=buffered)

    def after_step(self, optimizer: torch.optim.Optimizer, before: _RMSpropBefore, *,
                   out: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                   defer: Callable[[Callable[[], None]], None] | None = None) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only).

        ``out`` and ``defer``: the recorder's coefficient buffers for ``b`` or ``P`` and the job that fills them
        (docs/optimizers.md, "Coefficient buffers"); without them every tensor coefficient is new memory.
        """
        updates: dict[int, LinearUpdate] = {}
        slots = StepSlots(out, defer)
        for snap in before.groups:
            v = snap.values
            sign = -1.0 if v.get("maximize", False) else 1.0
            momentum, centered, eps = float(v["momentum"]), bool(v.get("centered", False)), float(v["eps"])
            for p in snap.with_grad:
                dt, state = p.dtype, optimizer.state[p]
                lr = sign * as_used(float(v["lr"]), dt)
                wd = float(v["weight_decay"])
                lambda_c = sign * as_used(wd, dt) if wd != 0.0 else 0.0
                if momentum > 0.0:  # torch: buf.mul_(mu).addcdiv_(u, d); param.add_(buf, alpha=-lr)
                    b = slots.tensor(p, Pending(state["square_avg"], functools.partial(_gain, state, centered, eps)))
                    updates[id(p)] = LinearUpdate(a=as_used(momentum, dt), b=b, P=lr, q=1.0, n=0.0,
                                                  lambda_c=lambda_c)
                    continue
                P = slots.tensor(p, Pending(state["square_avg"],
                                            functools.partial(_scaled_inverse, lr, state, centered, eps)))
                if id(p) in before.buffered:  # momentum switched off: the stale buffer stays, unused
                    updates[id(p)] = LinearUpdate(a=1.0, b=0.0, P=P, q=0.0, n=1.0, lambda_c=lambda_c)
                else:  # torch: param.addcdiv_(u, d, value=-lr)
                    updates[id(p)] = LinearUpdate(a=0.0, b=1.0, P=P, q=1.0, n=0.0, lambda_c=lambda_c)
        slots.close()
        return updates
