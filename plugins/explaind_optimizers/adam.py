r"""Adapter for :class:`torch.optim.Adam` (L2 or decoupled weight decay, AMSGrad).

Torch's update for a parameter with gradient ``g_s`` at its ``t``-th step (``t = state["step"]``
after the step; single-tensor, foreach and CPU-fused paths compute the same arithmetic):

.. math::

    u_s &= g_s + \mathrm{wd}\,\theta_s \quad\text{(L2; skipped when decoupled)} \\
    m_s &= \mathrm{lerp}(m_{s-1}, u_s, 1-\beta_1) = \beta_1 m_{s-1} + (1-\beta_1) u_s \\
    v_s &= \beta_2 v_{s-1} + (1-\beta_2) u_s^2 \quad(\text{AMSGrad: } \hat v_s = \max(\hat v_{s-1}, v_s)) \\
    \Delta\theta_s &= -\frac{\mathrm{lr}_s}{1-\beta_1^t}\,
        \frac{m_s}{\sqrt{v_s}/\sqrt{1-\beta_2^t} + \epsilon} \;-\; \mathrm{lr}_s \mathrm{wd}\,\theta_s
        \quad\text{(last term: decoupled only)}

In the notation of docs/maths.md §3: ``a = beta1``, ``b = 1 - beta1`` (the first step needs no special case:
``m_{-1} = 0``), ``q, n = 1, 0``, the diagonal preconditioner
``P = lr / (1 - beta1^t) / (sqrt(v) / sqrt(1 - beta2^t) + eps)`` (shape of the parameter),
recomputed from ``exp_avg_sq`` (or ``max_exp_avg_sq``) with torch's own operation order, and
``lambda_c = wd`` (L2) or ``lambda_d = lr * wd`` (decoupled, acting on ``theta_s`` since torch
scales the parameter before adding the Adam step). ``maximize=True`` is modelled by
``P -> -P`` and ``lambda_c -> -lambda_c``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from explaind.config import StrictModel, validate_config
from explaind.exceptions import warn_at_caller
from explaind.recurrence import LinearUpdate

from ._common import (
    GroupSnapshot,
    OptionRule,
    as_used,
    check_amp_scaling,
    collect_group_problems,
    complex_problems,
    maximize_switch_problems,
    raise_problems,
    remember_maximize,
    snapshot_groups,
    start_buffers,
    wrong_class_problem,
)
from ._pooled import Pending, StepSlots, fits, negated

__all__ = ["AdamAdapter", "AdamConfig", "AdamGroupConfig"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]

_RULES = (
    OptionRule(
        key="differentiable",
        allowed=(False,),
        reason="differentiating through the optimizer step is outside the recorded linear recurrence",
        fix="build the optimizer with differentiable=False",
    ),
    OptionRule(
        key="capturable",
        allowed=(False,),
        reason="the capturable path computes the bias corrections from a device step tensor in its own "
        "dtype and operation order, which the adapter does not reproduce, and CUDA-graph capture cannot "
        "record per-step coefficients",
        fix="build the optimizer with capturable=False",
    ),
)
_FLOAT_KEYS = ("lr", "betas", "eps", "weight_decay")


class AdamGroupConfig(StrictModel):
    """Hyperparameters of one Adam/AdamW parameter group when recording started."""

    lr: NonNegative = 1e-3
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    amsgrad: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False
    foreach: bool | None = None
    fused: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0


class AdamConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.Adam` / :class:`torch.optim.AdamW` run."""

    param_groups: list[AdamGroupConfig] = Field(default_factory=lambda: [AdamGroupConfig()], min_length=1)


@dataclass(frozen=True)
class _AdamBefore:
    groups: list[GroupSnapshot]


def _step_count(value: Any) -> float:
    """``state["step"]`` as the Python float torch uses (``.item()`` of the step tensor)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def preconditioner(
    state: dict[str, Any], lr: float, beta1: float, beta2: float, eps: float, amsgrad: bool, dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Adam's diagonal ``P`` with the operation order of torch's non-capturable paths.

    Parameters
    ----------
    state : dict
        ``optimizer.state[param]`` *after* the step (``step``, ``exp_avg_sq``, ``max_exp_avg_sq``).
    lr, beta1, beta2, eps : float
        Group hyperparameters at this step.
    amsgrad : bool
        Use the running maximum ``max_exp_avg_sq``.
    dtype : torch.dtype
        Parameter dtype (fixes the rounding of the scalar step size).
    out : Tensor, optional
        Where to write ``P`` (shape, dtype and device of the second moment; anything else is
        ignored and a new tensor made). The same elementwise operations run in it, so the bits equal
        those of a new tensor; a reused buffer spares the page faults of fresh memory every step.

    Returns
    -------
    Tensor
        ``P = step_size / (sqrt(v) / sqrt(1 - beta2^t) + eps)`` with
        ``step_size = lr / (1 - beta1^t)``; shape of the parameter.
    """
    step = _step_count(state["step"])
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    second = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    # torch's (second.sqrt() / bias_correction2_sqrt).add_(eps) and step_size / denom, elementwise in the
    # same order and dtype, in one buffer (the same bits as with a new tensor for every operation). The
    # dividend is a 0-d CPU tensor on every device: kernels take it as a scalar, where a 0-d tensor made on a
    # GPU would be a blocking host-to-device copy for every parameter at every step
    out = torch.sqrt(second, out=out) if fits(out, second) else torch.sqrt(second)
    out.div_(bias_correction2_sqrt).add_(eps)
    return torch.div(torch.tensor(as_used(step_size, dtype), dtype=out.dtype), out, out=out)


def _warn_fused_cuda_low_precision(name: str, optimizer: torch.optim.Optimizer) -> None:
    """Warn that the CUDA fused kernel in single precision leaves a larger (still measured) residual."""
    for group in optimizer.param_groups:
        if group.get("fused") and any(p.is_cuda and p.dtype != torch.float64 for p in group["params"]):
            warn_at_caller(
                f"Optimizer adapter {name!r}: fused=True on CUDA with {group['params'][0].dtype} parameters "
                f"runs its own single-precision arithmetic; the recorded coefficients reproduce its updates to "
                f"about 1e-5 relative (measured per-step residual; about 1e-6 with fused=False). Use fused=False "
                f"for a tighter replay.")
            return


class AdamAdapter:
    """Express every :class:`torch.optim.Adam` step as a :class:`~explaind.recurrence.LinearUpdate`.

    A group with ``decoupled_weight_decay=True`` (``Adam(..., decoupled_weight_decay=True)`` or
    :class:`torch.optim.AdamW`) gets ``lambda_d = lr * wd`` instead of ``lambda_c = wd``.
    """

    name = "adam"
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam
    #: Treat every group as decoupled (AdamW semantics, also on torch versions without the group flag).
    always_decoupled: bool = False
    #: ``after_step``'s ``P`` is a new tensor each step, never touched again: the recorder keeps it without a copy.
    fresh_tensors: bool = True
    config_model: type[AdamConfig] = AdamConfig

    def __init__(self, config: AdamConfig):
        self._config = config
        self._maximize: dict[int, bool] = {}  # maximize at each parameter's last step (id(param))

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> AdamAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            Listing every option the recurrence cannot express (``differentiable=True``,
            ``capturable=True``, tensor hyperparameters, complex parameters, a different class).
        """
        problems = wrong_class_problem(optimizer, cls.optimizer_class)
        if not problems:
            problems = collect_group_problems(optimizer, _RULES, _FLOAT_KEYS)
            problems += complex_problems(optimizer, "Adam normalises real and imaginary parts separately")
        raise_problems(cls.name, optimizer, problems)
        _warn_fused_cuda_low_precision(cls.name, optimizer)
        groups = []
        for group in optimizer.param_groups:
            values = {k: group[k] for k in AdamGroupConfig.model_fields if k in group}
            values["betas"] = tuple(float(b) for b in group["betas"])
            values["n_params"] = len(group["params"])
            values["decoupled_weight_decay"] = cls.always_decoupled or bool(group.get("decoupled_weight_decay", False))
            groups.append(values)
        config = validate_config(cls.config_model, {"param_groups": groups}, f"Optimizer adapter {cls.name!r}")
        return cls(config)

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by :class:`AdamConfig`."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        r"""The ``exp_avg`` buffers at the start of recording: :math:`m_{-1}` of docs/maths.md §4.

        Called by the recorder when its ``with`` block opens on an optimizer restored from a checkpoint or
        that took unrecorded steps. Everything else the optimizer carries on with (a buffer's first-step
        flag, Adam's second moment and step count) is read from the live state at every step, so only
        the first moment needs a start value. Returns ``id(param) -> m_{-1}`` for the parameters holding
        one.
        """
        return start_buffers(optimizer, "exp_avg", self._maximize)

    def resumed(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by ``TrajectoryRecorder.restore()`` once the recorded optimizer state is loaded.

        The loaded ``exp_avg`` buffers were built with the loaded ``maximize``; switching it afterwards
        is refused at the next step, as a switch mid-run is.
        """
        remember_maximize(optimizer, self._maximize)

    def before_step(self, optimizer: torch.optim.Optimizer) -> _AdamBefore:
        """Snapshot the group hyperparameters (schedulers may change ``lr`` and ``betas`` between steps)."""
        check_amp_scaling(self.name, optimizer)
        raise_problems(self.name, optimizer, collect_group_problems(optimizer, _RULES, _FLOAT_KEYS) +
                       maximize_switch_problems(optimizer, self._maximize, "exp_avg"))
        return _AdamBefore(groups=snapshot_groups(optimizer))

    def after_step(self, optimizer: torch.optim.Optimizer, before: _AdamBefore, *,
                   out: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                   defer: Callable[[Callable[[], None]], None] | None = None) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only).

        ``out(param)``, when given, returns a buffer shaped like ``param`` to compute its ``P`` in
        (or ``None``); the buffer is then the caller's, and the adapter never touches it again.
        ``defer(job)``, when given with ``out``, receives one job that fills those buffers: the
        updates returned hold them unfilled until the caller ran the job, which it must do before the
        next ``optimizer.step()`` changes the state (docs/optimizers.md, "Coefficient buffers").
        """
        updates: dict[int, LinearUpdate] = {}
        slots = StepSlots(out, defer)
        for snap in before.groups:
            v = snap.values
            beta1, beta2 = (float(b) for b in v["betas"])
            lr, eps, wd = float(v["lr"]), float(v["eps"]), float(v["weight_decay"])
            sign = -1.0 if v.get("maximize", False) else 1.0
            decoupled = self.always_decoupled or bool(v.get("decoupled_weight_decay", False))
            amsgrad = bool(v.get("amsgrad", False))
            for p in snap.with_grad:
                dt, state = p.dtype, optimizer.state[p]
                fill = functools.partial(preconditioner, state, lr, beta1, beta2, eps, amsgrad, dt)
                P = slots.tensor(p, Pending(state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"],
                                            negated(fill) if sign < 0 else fill))
                b = as_used(1.0 - beta1, dt)  # torch: exp_avg.lerp_(u, 1 - beta1)
                lambda_c = 0.0
                lambda_d = 0.0
                if wd != 0.0:
                    if decoupled:  # torch: param.mul_(1 - lr * wd) before the Adam step
                        lambda_d = 1.0 - as_used(1.0 - lr * wd, dt)
                    else:
                        lambda_c = sign * as_used(wd, dt)
                updates[id(p)] = LinearUpdate(a=1.0 - b, b=b, P=P, q=1.0, n=0.0, lambda_c=lambda_c, lambda_d=lambda_d)
        slots.close()
        return updates
