r"""Adapter for Hugging Face's ``transformers.optimization.Adafactor`` (``TrainingArguments(optim="adafactor")``).

transformers' Adafactor is not torch's (:mod:`explaind_optimizers.adafactor`): it adds ``eps[0]`` to
:math:`g^2` instead of clamping the estimate, normalises the row factor by its mean over the last axis,
clips by dividing, and may keep a first moment of the *scaled* update. Its update of a parameter with gradient
``g_s`` (in float32 for half-precision parameters) at its ``t``-th step (``t = state["step"]``, a Python int,
after the step):

.. math::

    \lambda_t &= \begin{cases} \min(\ell_t, 1/\sqrt{t}),\ \ell_t = 10^{-6} t \text{ (warmup\_init) or } 10^{-2}
                 & \text{relative\_step} \\ \mathrm{lr}_s & \text{otherwise} \end{cases}
                 \;\cdot\; \begin{cases} \max(\epsilon_2, \mathrm{RMS}(\theta_s)) & \text{scale\_parameter} \\
                 1 & \text{otherwise} \end{cases} \\
    r_t &= \begin{cases} \bigl(R_t / \mathrm{mean}_{-1}(R_t)\bigr)^{-1/2} \otimes C_t^{-1/2}
           & \text{factored (two or more dims)} \\ V_t^{-1/2} & \text{one dimension} \end{cases} \qquad
    \delta_t = \max\bigl(1, \mathrm{RMS}(r_t \odot g_s) / c\bigr) \\
    u_t &= (\lambda_t / \delta_t)\, r_t \odot g_s, \qquad
    m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, u_t \ \text{(with beta1)} \\
    \Delta\theta_s &= -\mathrm{wd}\,\lambda_t\,\theta_s - (m_t \text{ or } u_t)

with the factors :math:`R_t, C_t` (or :math:`V_t`) running means of :math:`g_s^2 + \epsilon_1` with weight
:math:`1 - \hat\beta_{2,t}`, :math:`\hat\beta_{2,t} = 1 - t^{\text{decay\_rate}}`, and ``c`` the
``clip_threshold``. :math:`\mathrm{RMS}(\theta_s)` is kept by the optimizer in ``state["RMS"]``.

In the notation of docs/maths.md §3: without ``beta1``, ``a, b = 0, 1`` and the diagonal
``P = (lambda_t / delta_t) r_t``; with ``beta1``, the buffer accumulates *scaled* inputs, so ``a = beta1``,
the gain ``b = (1 - beta1) (lambda_t / delta_t) r_t`` is a tensor and ``P = 1`` (as RMSprop with momentum).
Always ``q, n = 1, 0``, ``lambda_c = 0`` and ``lambda_d = wd lambda_t`` (on :math:`\theta_s`, as
``p.add_(p, alpha=-wd lr)``). Every coefficient is recomputed after the step from the updated factors with
transformers' operations in its order, and :math:`\delta_t` from ``p.grad``, which the step leaves in place.

The class is matched by its module and name (``transformers.optimization.Adafactor``), so explaind does not
import transformers to register it.
"""

from __future__ import annotations

import math
import types
from typing import Annotated, Any

import torch
from pydantic import Field

from explaind.config import StrictModel, validate_config
from explaind.recurrence import LinearUpdate

from ._common import (
    as_used,
    check_amp_scaling,
    collect_group_problems,
    complex_problems,
    raise_problems,
    snapshot_groups,
    sparse_problems,
)

__all__ = ["HFAdafactorAdapter", "HFAdafactorConfig", "HFAdafactorGroupConfig", "is_transformers_adafactor"]

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

#: ``(module, qualified name)`` of the class this adapter handles.
HANDLED = ("transformers.optimization", "Adafactor")
_FLOAT_KEYS = ("lr", "clip_threshold", "decay_rate", "beta1", "weight_decay")


def is_transformers_adafactor(optimizer: Any) -> bool:
    """Whether ``optimizer`` is exactly transformers' ``Adafactor`` (by module and name; no import)."""
    return (type(optimizer).__module__, type(optimizer).__qualname__) == HANDLED


class HFAdafactorGroupConfig(StrictModel):
    """Hyperparameters of one transformers Adafactor parameter group when recording started."""

    lr: NonNegative | None = None
    eps: tuple[NonNegative, NonNegative] = (1e-30, 1e-3)
    clip_threshold: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    decay_rate: float = -0.8
    beta1: NonNegative | None = None
    weight_decay: NonNegative = 0.0
    scale_parameter: bool = True
    relative_step: bool = True
    warmup_init: bool = False
    n_params: Annotated[int, Field(ge=0)] = 0


class HFAdafactorConfig(StrictModel):
    """Hyperparameters of a transformers Adafactor run (stored in the trajectory manifest)."""

    param_groups: list[HFAdafactorGroupConfig] = Field(default_factory=lambda: [HFAdafactorGroupConfig()],
                                                       min_length=1)


def _read_groups(optimizer: Any) -> list[dict[str, Any]]:
    """The groups as the step reads them: without ``lr`` where ``relative_step`` is on (the step computes its own size
    and never reads it; transformers' ``AdafactorSchedule`` writes a tensor there, the ``RMS(theta)`` it logs)."""
    return [{k: v for k, v in g.items() if k != "lr" or not g.get("relative_step")} for g in optimizer.param_groups]


def _problems(optimizer: Any) -> list[str]:
    """Every option the recurrence cannot express: tensor hyperparameters the step reads, complex or sparse
    parameters."""
    read = types.SimpleNamespace(param_groups=_read_groups(optimizer))
    return (collect_group_problems(read, (), _FLOAT_KEYS + ("eps",)) + sparse_problems(optimizer)
            + complex_problems(optimizer, "Adafactor squares complex gradients entrywise"))


def _step_size(group: dict[str, Any], state: dict[str, Any]) -> float:
    r""":math:`\lambda_t` as transformers' ``_get_lr`` computes it (a Python float of the value it multiplies by)."""
    size = group["lr"]
    if group["relative_step"]:
        ceiling = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
        size = min(ceiling, 1.0 / math.sqrt(state["step"]))
    scale = max(group["eps"][1], state["RMS"]) if group["scale_parameter"] else 1.0
    return float(scale * size)


def _inverse_root(state: dict[str, Any]) -> torch.Tensor:
    """``r_t`` from the updated factors, with transformers' operations in its order (new memory)."""
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        return torch.mul(r_factor, col.unsqueeze(-2).rsqrt())
    return state["exp_avg_sq"].rsqrt()


def _clip(inverse_root: torch.Tensor, grad: torch.Tensor, threshold: float) -> float:
    r""":math:`\delta_t`, as transformers divides by it (a tensor there; its value here)."""
    update = torch.mul(inverse_root, grad)
    return float((update.norm(2) / (update.numel() ** 0.5) / threshold).clamp_(min=1.0))


class HFAdafactorAdapter:
    """Express every step of transformers' ``Adafactor`` as a :class:`~explaind.recurrence.LinearUpdate`."""

    name = "hf_adafactor"
    #: matched by :func:`is_transformers_adafactor` in the plugin's resolve hook, not by class
    optimizer_class = None
    fresh_tensors: bool = True
    config_model: type[HFAdafactorConfig] = HFAdafactorConfig

    def __init__(self, config: HFAdafactorConfig):
        self._config = config

    @classmethod
    def from_optimizer(cls, optimizer: Any) -> HFAdafactorAdapter:
        """Validate ``optimizer`` and snapshot its hyperparameters.

        Raises
        ------
        explaind.exceptions.ConfigError
            For another class, tensor hyperparameters, complex or sparse parameters.
        """
        if not is_transformers_adafactor(optimizer):
            raise_problems(cls.name, optimizer, [
                f"the adapter handles exactly transformers.optimization.Adafactor, got {type(optimizer).__module__}."
                f"{type(optimizer).__qualname__} (a subclass may change step()). Fix: let "
                f"explaind.plugins.resolve_optimizer_adapter(optimizer) choose the adapter."])
        raise_problems(cls.name, optimizer, _problems(optimizer))
        fields = HFAdafactorGroupConfig.model_fields
        groups = [{**{k: g[k] for k in fields if k in g}, "n_params": len(g["params"])}
                  for g in _read_groups(optimizer)]
        return cls(validate_config(HFAdafactorConfig, {"param_groups": groups}, f"Optimizer adapter {cls.name!r}"))

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters at construction, as JSON-ready data validated by :class:`HFAdafactorConfig`."""
        return self._config.model_dump(mode="json")

    def start_state(self, optimizer: Any) -> dict[int, torch.Tensor]:
        r"""``exp_avg`` of every parameter that holds one (``beta1`` set): :math:`m_{-1}`; the factors are read live."""
        return {id(p): optimizer.state[p]["exp_avg"].detach().clone() for group in optimizer.param_groups
                for p in group["params"] if "exp_avg" in optimizer.state.get(p, {})}

    def before_step(self, optimizer: Any) -> list[Any]:
        """Snapshot the groups (schedulers may change ``lr``) and refuse what the recurrence cannot express."""
        check_amp_scaling(self.name, optimizer)
        raise_problems(self.name, optimizer, _problems(optimizer))
        return snapshot_groups(optimizer)

    def after_step(self, optimizer: Any, before: list[Any], **_: Any) -> dict[int, LinearUpdate]:
        """Coefficients of the step just taken, keyed by ``id(param)`` (parameters with a gradient only)."""
        updates: dict[int, LinearUpdate] = {}
        for snap in before:
            group = snap.values
            beta1, wd = group.get("beta1"), float(group["weight_decay"])
            for p in snap.with_grad:
                state = optimizer.state[p]
                grad = p.grad.float() if p.grad.dtype in (torch.float16, torch.bfloat16) else p.grad
                size = _step_size(group, state)
                inverse_root = _inverse_root(state)
                gain = inverse_root.mul_(as_used(size, grad.dtype) / _clip(inverse_root, grad,
                                                                            float(group["clip_threshold"])))
                lambda_d = as_used(wd * size, grad.dtype) if wd != 0.0 else 0.0
                if beta1 is None:
                    updates[id(p)] = LinearUpdate(a=0.0, b=1.0, P=gain, q=1.0, n=0.0, lambda_d=lambda_d)
                else:
                    updates[id(p)] = LinearUpdate(a=float(beta1), b=gain.mul_(1.0 - float(beta1)), P=1.0, q=1.0,
                                                  n=0.0, lambda_d=lambda_d)
        return updates
