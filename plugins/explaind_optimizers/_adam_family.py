r"""What the NAdam, RAdam and Adamax adapters share: validation, start state, the per-parameter loop.

The three optimizers keep Adam's first moment ``exp_avg`` (``m_s = lerp(m_{s-1}, u_s, 1 - beta1)``, so
``a = beta1``, ``b = 1 - beta1`` in the recurrence of docs/maths.md §3) and differ only in how the update
is formed from it: :class:`AdamFamilyAdapter` validates the optimizer, snapshots the groups before the
step, hands each parameter's post-step state to the subclass's :meth:`AdamFamilyAdapter.coefficients`,
and adds the weight-decay terms (L2: ``lambda_c = wd``; decoupled: ``lambda_d = 1 - fl(1 - lr wd)``, the
factor torch multiplied ``theta_s`` with). ``maximize=True`` is modelled as for Adam: ``P -> -P`` and
``lambda_c -> -lambda_c`` (the modelled buffer is the negative of torch's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field

from explaind.config import StrictModel, validate_config
from explaind.recurrence import LinearUpdate

from ._common import (
    GroupSnapshot,
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
from ._pooled import Pending, StepSlots, negated
from .adam import _RULES as ADAM_RULES
from .adam import Beta, NonNegative

__all__ = ["AdamFamilyAdapter", "FamilyGroupConfig", "RULES", "step_count", "uses_foreach"]

#: ``differentiable=True`` and ``capturable=True`` are refused, for the reasons given for Adam.
RULES = ADAM_RULES


class FamilyGroupConfig(StrictModel):
    """The group hyperparameters the three optimizers share (subclasses add theirs and torch's ``lr`` default)."""

    lr: NonNegative = 1e-3
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.0
    maximize: bool = False
    foreach: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0


def step_count(value: Any) -> float:
    """``state["step"]`` as the Python float torch uses (``.item()`` of the step tensor)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def uses_foreach(values: dict[str, Any], params: tuple[torch.Tensor, ...]) -> bool:
    """Whether torch ran the group's ``foreach`` path (``foreach=None``: only when every parameter is on CUDA/XPU)."""
    flag = values.get("foreach")
    if flag is not None:
        return bool(flag)
    return bool(params) and all(p.device.type in ("cuda", "xpu") for p in params)


@dataclass(frozen=True)
class _Before:
    groups: list[GroupSnapshot]


class AdamFamilyAdapter:
    """Base of the NAdam, RAdam and Adamax adapters (subclasses set the class attributes and ``coefficients``).

    Attributes
    ----------
    name : str
        Registry name.
    optimizer_class : type
        The torch class handled (exact match).
    group_model, config_model : type
        Pydantic models of one group and of the whole ``hyperparameters()``.
    float_keys : tuple of str
        Group hyperparameters that must be Python floats.
    decoupled_key : bool
        Whether the class has the group option ``decoupled_weight_decay``.
    """

    name: ClassVar[str]
    optimizer_class: ClassVar[type[torch.optim.Optimizer]]
    group_model: ClassVar[type[StrictModel]]
    config_model: ClassVar[type[StrictModel]]
    float_keys: ClassVar[tuple[str, ...]] = ("lr", "betas", "eps", "weight_decay")
    decoupled_key: ClassVar[bool] = True
    #: every tensor ``after_step`` returns is new (or the recorder's ``out`` buffer) and never touched again: the
    #: recorder keeps it without a copy.
    fresh_tensors: ClassVar[bool] = True

    def __init__(self, config: StrictModel):
        self._config = config
        self._maximize: dict[int, bool] = {}  # maximize at each parameter's last step (id(param))

    @classmethod
    def _problems(cls, optimizer: torch.optim.Optimizer) -> list[str]:
        problems = collect_group_problems(optimizer, RULES, cls.float_keys)
        problems += complex_problems(optimizer, f"{cls.optimizer_class.__name__} normalises real and imaginary "
                                                "parts separately")
        return problems

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> AdamFamilyAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            Listing every option the recurrence cannot express (``differentiable=True``,
            ``capturable=True``, tensor hyperparameters, complex parameters, a different class).
        """
        problems = wrong_class_problem(optimizer, cls.optimizer_class) or cls._problems(optimizer)
        raise_problems(cls.name, optimizer, problems)
        groups = []
        for group in optimizer.param_groups:
            values = {k: group[k] for k in cls.group_model.model_fields if k in group}
            values["betas"] = tuple(float(b) for b in group["betas"])
            values["n_params"] = len(group["params"])
            groups.append(values)
        return cls(validate_config(cls.config_model, {"param_groups": groups}, f"Optimizer adapter {cls.name!r}"))

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by ``config_model``."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        r"""The ``exp_avg`` buffers at the start of recording: :math:`m_{-1}` of docs/maths.md §4.

        Everything else (second moment, step count, NAdam's ``mu_product``) is read from the live state
        at every step, so only the first moment needs a start value. ``id(param) -> m_{-1}``, negated
        under ``maximize``.
        """
        return start_buffers(optimizer, "exp_avg", self._maximize)

    def resumed(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by ``TrajectoryRecorder.restore()``: a later ``maximize`` switch is refused while buffers exist."""
        remember_maximize(optimizer, self._maximize)

    def before_step(self, optimizer: torch.optim.Optimizer) -> _Before:
        """Re-check the group options and snapshot the hyperparameters (schedulers change ``lr``, ``betas``)."""
        check_amp_scaling(self.name, optimizer)
        raise_problems(self.name, optimizer, self._problems(optimizer) +
                       maximize_switch_problems(optimizer, self._maximize, "exp_avg"))
        return _Before(groups=snapshot_groups(optimizer))

    def coefficients(self, values: dict[str, Any], state: dict[str, Any], p: torch.Tensor,
                     foreach: bool) -> tuple[float | Pending, float, float]:
        """``(P, q, n)`` of one parameter from its post-step ``state`` and the group ``values`` (unsigned).

        A tensor ``P`` is returned :class:`~._pooled.Pending` (how to compute it), so that it can go into the
        recorder's buffer, now or in the deferred job; a scalar ``P`` as a float.
        """
        raise NotImplementedError

    def after_step(self, optimizer: torch.optim.Optimizer, before: _Before, *,
                   out: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                   defer: Callable[[Callable[[], None]], None] | None = None) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only).

        ``out`` and ``defer``: the recorder's coefficient buffers for ``P`` and the job that fills them
        (docs/optimizers.md, "Coefficient buffers"); without them every tensor ``P`` is new memory.
        """
        updates: dict[int, LinearUpdate] = {}
        slots = StepSlots(out, defer)
        for snap in before.groups:
            v = dict(snap.values)
            beta1 = float(v["betas"][0])
            lr, wd = float(v["lr"]), float(v["weight_decay"])
            negate = bool(v.get("maximize", False))
            decoupled = self.decoupled_key and bool(v.get("decoupled_weight_decay", False))
            foreach = uses_foreach(v, snap.with_grad)
            for p in snap.with_grad:
                dt = p.dtype
                P, q, n = self.coefficients(v, optimizer.state[p], p, foreach)
                if isinstance(P, Pending):
                    P = slots.tensor(p, Pending(P.like, negated(P.fill)) if negate else P)
                elif negate:
                    P = -P
                b = as_used(1.0 - beta1, dt)  # torch: exp_avg.lerp_(u, 1 - beta1)
                lambda_c = lambda_d = 0.0
                if wd != 0.0:
                    if decoupled:  # torch: param.mul_(1 - lr * wd) before the step
                        lambda_d = 1.0 - as_used(1.0 - lr * wd, dt)
                    else:
                        lambda_c = (-1.0 if negate else 1.0) * as_used(wd, dt)
                updates[id(p)] = LinearUpdate(a=1.0 - b, b=b, P=P, q=q, n=n, lambda_c=lambda_c, lambda_d=lambda_d)
        slots.close()
        return updates
