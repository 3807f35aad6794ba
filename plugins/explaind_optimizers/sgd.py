r"""Adapter for :class:`torch.optim.SGD` (momentum, dampening, Nesterov, L2 weight decay).

Torch's update for a parameter with gradient ``g_s`` (single-tensor, foreach and fused paths
all compute the same arithmetic):

.. math::

    u_s &= g_s + \mathrm{wd}\,\theta_s \\
    m_s &= \begin{cases} u_s & \text{buffer created at this step} \\
                         \mu m_{s-1} + (1-\tau) u_s & \text{otherwise} \end{cases} \\
    \Delta\theta_s &= -\mathrm{lr}_s\,(m_s \text{ or } \mu m_s + u_s \text{ (Nesterov)})

so, in the notation of docs/maths.md §3: ``a = mu`` and ``b = 1 - tau`` (``a = 0, b = 1`` on the step
that creates the buffer), ``P = lr_s``, ``q, n = 1, 0`` (Nesterov: ``mu, 1``), ``lambda_c = wd``.
Without momentum the update is ``a = 0, b = 1, q = 1, n = 0``; when a group's momentum was set to
zero after a buffer existed, torch leaves that buffer untouched and the adapter reports
``a = 1, b = 0, q = 0, n = 1`` so the modelled buffer stays what torch holds.
``maximize=True`` negates the gradient; it is modelled exactly by ``P -> -P`` and
``lambda_c -> -lambda_c`` (the modelled buffer is then the negative of torch's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from explaind.config import StrictModel, validate_config
from explaind.recurrence import LinearUpdate

from ._common import (
    GroupSnapshot,
    OptionRule,
    as_used,
    check_amp_scaling,
    collect_group_problems,
    maximize_switch_problems,
    raise_problems,
    remember_maximize,
    snapshot_groups,
    start_buffers,
    wrong_class_problem,
)

__all__ = ["SGDAdapter", "SGDConfig", "SGDGroupConfig"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

_RULES = (
    OptionRule(
        key="differentiable",
        allowed=(False,),
        reason="differentiating through the optimizer step is outside the recorded linear recurrence",
        fix="build the optimizer with differentiable=False",
    ),
)
_FLOAT_KEYS = ("lr", "momentum", "dampening", "weight_decay")


class SGDGroupConfig(StrictModel):
    """Hyperparameters of one SGD parameter group when recording started."""

    lr: NonNegative = 1e-3
    momentum: NonNegative = 0.0
    dampening: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    weight_decay: NonNegative = 0.0
    nesterov: bool = False
    maximize: bool = False
    foreach: bool | None = None
    fused: bool | None = None
    n_params: Annotated[int, Field(ge=0)] = 0


class SGDConfig(StrictModel):
    """Hyperparameters of a :class:`torch.optim.SGD` run (stored in the trajectory manifest)."""

    param_groups: list[SGDGroupConfig] = Field(default_factory=lambda: [SGDGroupConfig()], min_length=1)


@dataclass(frozen=True)
class _SGDBefore:
    groups: list[GroupSnapshot]
    buffered: frozenset[int]  # id(param) of parameters holding a momentum buffer before the step


class SGDAdapter:
    """Express every :class:`torch.optim.SGD` step as a :class:`~explaind.recurrence.LinearUpdate`.

    Build it with :meth:`from_optimizer`; the recorder calls :meth:`before_step` and
    :meth:`after_step` around each ``optimizer.step()``.
    """

    name = "sgd"
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD

    def __init__(self, config: SGDConfig):
        self._config = config
        self._maximize: dict[int, bool] = {}  # maximize at each parameter's last step (id(param))

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> SGDAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            Listing every option the recurrence cannot express (``differentiable=True``,
            tensor hyperparameters, a different class).
        """
        problems = wrong_class_problem(optimizer, cls.optimizer_class)
        if not problems:
            problems = collect_group_problems(optimizer, _RULES, _FLOAT_KEYS)
        raise_problems(cls.name, optimizer, problems)
        groups = []
        for group in optimizer.param_groups:
            values = {k: group[k] for k in SGDGroupConfig.model_fields if k in group}
            values["n_params"] = len(group["params"])
            groups.append(values)
        config = validate_config(SGDConfig, {"param_groups": groups}, f"Optimizer adapter {cls.name!r}")
        return cls(config)

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by :class:`SGDConfig`."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
        r"""The ``momentum_buffer`` buffers at the start of recording: :math:`m_{-1}` of docs/maths.md §4.

        Called by the recorder when its ``with`` block opens on an optimizer restored from a checkpoint or
        that took unrecorded steps (the same contract as the Adam adapter's, with the momentum buffer as
        the first moment; negated under ``maximize``). Returns ``id(param) -> m_{-1}`` for the parameters
        holding one.
        """
        return start_buffers(optimizer, "momentum_buffer", self._maximize)

    def resumed(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by ``TrajectoryRecorder.restore()`` once the recorded optimizer state is loaded.

        The loaded ``momentum_buffer`` buffers were built with the loaded ``maximize``; switching it afterwards
        is refused at the next step, as a switch mid-run is.
        """
        remember_maximize(optimizer, self._maximize)

    def before_step(self, optimizer: torch.optim.Optimizer) -> _SGDBefore:
        """Snapshot the group hyperparameters and which parameters already hold a momentum buffer."""
        check_amp_scaling(self.name, optimizer)
        raise_problems(self.name, optimizer, collect_group_problems(optimizer, _RULES, _FLOAT_KEYS) +
                       maximize_switch_problems(optimizer, self._maximize, "momentum_buffer"))
        groups = snapshot_groups(optimizer)
        buffered = frozenset(
            id(p)
            for snap in groups
            for p in snap.with_grad
            if optimizer.state.get(p, {}).get("momentum_buffer") is not None
        )
        return _SGDBefore(groups=groups, buffered=buffered)

    def after_step(self, optimizer: torch.optim.Optimizer, before: _SGDBefore) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only)."""
        out: dict[int, LinearUpdate] = {}
        for snap in before.groups:
            v = snap.values
            sign = -1.0 if v.get("maximize", False) else 1.0
            momentum = float(v["momentum"])
            for p in snap.with_grad:
                dt = p.dtype
                lr = sign * as_used(v["lr"], dt)
                wd = sign * as_used(v["weight_decay"], dt)
                had_buffer = id(p) in before.buffered
                if momentum == 0.0:
                    if had_buffer:  # torch keeps the old buffer and does not use it
                        out[id(p)] = LinearUpdate(a=1.0, b=0.0, P=lr, q=0.0, n=1.0, lambda_c=wd)
                    else:
                        out[id(p)] = LinearUpdate(a=0.0, b=1.0, P=lr, q=1.0, n=0.0, lambda_c=wd)
                    continue
                a = as_used(momentum, dt) if had_buffer else 0.0
                b = as_used(1.0 - float(v["dampening"]), dt) if had_buffer else 1.0
                if v.get("nesterov", False):
                    q, n = as_used(momentum, dt), 1.0
                else:
                    q, n = 1.0, 0.0
                out[id(p)] = LinearUpdate(a=a, b=b, P=lr, q=q, n=n, lambda_c=wd)
        return out
