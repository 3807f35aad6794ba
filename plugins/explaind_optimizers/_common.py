"""Shared machinery of the first-party optimizer adapters.

Every adapter validates the live optimizer the same way: it walks the parameter groups,
collects *every* option the linear recurrence of docs/maths.md §3 cannot express, and raises one
:class:`explaind.exceptions.ConfigError` listing them all, each naming the option, the value
found, the values allowed and the fix.

Coefficients are reported as the values torch actually used. Torch casts a Python scalar
hyperparameter (``alpha=-lr``, ``mul_(momentum)``, ``lerp_(g, 1 - beta1)``) to the *computation*
dtype of the tensor it is applied to (``float64`` for ``float64`` tensors, ``float32`` for every
lower precision); :func:`as_used` reproduces that rounding so the replay in float64 sees the
scalar torch multiplied with, not the one the user typed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from explaind.config import validate_config
from explaind.exceptions import ConfigError

__all__ = [
    "DIFFERENTIABLE_RULE",
    "GroupSnapshot",
    "OptionRule",
    "as_used",
    "collect_group_problems",
    "raise_problems",
    "snapshot_groups",
    "sparse_problems",
    "check_amp_scaling",
    "checked_config",
    "complex_problems",
    "start_buffers",
    "wrong_class_problem",
]


def as_used(value: float, dtype: torch.dtype) -> float:
    """The Python float torch multiplies with when ``value`` meets a tensor of ``dtype``.

    Parameters
    ----------
    value : float
        The scalar hyperparameter as stored in the parameter group.
    dtype : torch.dtype
        dtype of the parameter tensor.

    Returns
    -------
    float
        ``value`` rounded to the computation dtype (float64 for float64 tensors, else float32).
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if compute == torch.float64:
        return float(value)
    return float(np.float32(float(value)))  # IEEE round-to-nearest, as torch.tensor(value, dtype=float32)


@dataclass(frozen=True)
class OptionRule:
    """A boolean-like group option and the values the adapter accepts.

    Attributes
    ----------
    key : str
        Key of the torch parameter group (``"differentiable"``, ``"capturable"``, ...).
    allowed : tuple
        Accepted values.
    reason : str
        Why other values cannot be modelled.
    fix : str
        What the user should change.
    """

    key: str
    allowed: tuple[Any, ...]
    reason: str
    fix: str


#: ``differentiable=True`` refused (the RMSprop and Adagrad adapters share it).
DIFFERENTIABLE_RULE = OptionRule(
    key="differentiable",
    allowed=(False,),
    reason="differentiating through the optimizer step is outside the recorded linear recurrence",
    fix="build the optimizer with differentiable=False",
)


def collect_group_problems(
    optimizer: torch.optim.Optimizer,
    rules: Iterable[OptionRule],
    float_keys: Iterable[str],
) -> list[str]:
    """Every problem found in the optimizer's parameter groups and state.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The live optimizer.
    rules : iterable of OptionRule
        Options with a restricted set of values.
    float_keys : iterable of str
        Hyperparameters that must be Python numbers (not tensors); a tuple value (``betas``) is
        checked element by element.

    Returns
    -------
    list of str
        One sentence per problem (empty when the optimizer can be recorded).
    """
    problems: list[str] = []
    rules = tuple(rules)
    float_keys = tuple(float_keys)
    for index, group in enumerate(optimizer.param_groups):
        where = f"param_groups[{index}]"
        for rule in rules:
            value = group.get(rule.key, rule.allowed[0])
            if value not in rule.allowed:
                allowed = ", ".join(repr(a) for a in rule.allowed)
                problems.append(
                    f"{where}[{rule.key!r}]={value!r} is not supported ({rule.reason}). "
                    f"Allowed: {allowed}. Fix: {rule.fix}."
                )
        for key in float_keys:
            value = group.get(key)
            items = value if isinstance(value, tuple | list) else (value,)
            if any(isinstance(item, Tensor) for item in items):
                problems.append(
                    f"{where}[{key!r}]={value!r} is a tensor; the adapter reads hyperparameters as Python floats "
                    f"at every step so that the float64 replay uses exactly the scalar torch applied. Allowed: "
                    f"Python floats. Fix: pass {key}=float(...) when building the optimizer (and in schedulers)."
                )
    return problems


def start_buffers(optimizer: torch.optim.Optimizer, buffer_key: str, last: dict[int, bool]) -> dict[int, Tensor]:
    r"""The momentum buffers the optimizer holds before the first recorded step, as the recurrence's :math:`m_{-1}`.

    An optimizer restored from a checkpoint (or that took unrecorded steps) starts the recording with
    :math:`m_{-1} = m_{start}` instead of 0 (docs/maths.md §4, "Optimizer state at the start"). The
    adapters model ``maximize=True`` by negating ``P`` and ``lambda_c``, so their modelled buffer is the
    negative of torch's: the start buffer is returned with the same sign flip. Also takes every group's
    ``maximize`` as that of its parameters' previous step (a later switch is refused while buffers exist).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The live optimizer.
    buffer_key : str
        The state entry holding the buffer (``"momentum_buffer"``, ``"exp_avg"``).
    last : dict of int to bool
        The adapter's ``maximize`` per parameter (updated).

    Returns
    -------
    dict of int to Tensor
        ``id(param) -> m_{-1}`` (a new tensor, shape and dtype of the buffer) for every parameter
        holding a buffer; the others start from zero and are left out.
    """
    remember_maximize(optimizer, last)
    out: dict[int, Tensor] = {}
    for group in optimizer.param_groups:
        sign = -1.0 if group.get("maximize", False) else 1.0
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get(buffer_key)
            if isinstance(buf, Tensor):
                out[id(p)] = buf.detach().clone() if sign > 0 else -buf.detach()
    return out


def wrong_class_problem(optimizer: Any, expected: type) -> list[str]:
    """A problem when ``type(optimizer)`` is not exactly ``expected`` (a subclass may change ``step``)."""
    if type(optimizer) is expected:
        return []
    return [
        f"the adapter handles exactly {expected.__module__}.{expected.__qualname__}, got "
        f"{type(optimizer).__module__}.{type(optimizer).__qualname__} (a subclass may change step()). Fix: "
        f"let explaind.plugins.resolve_optimizer_adapter(optimizer) choose the adapter, or register an adapter "
        f"plugin for this class (docs/optimizers.md)."
    ]


def raise_problems(adapter_name: str, optimizer: Any, problems: list[str]) -> None:
    """Raise one :class:`ConfigError` listing every problem (no-op when there are none)."""
    if not problems:
        return
    kind = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(
        f"Optimizer adapter {adapter_name!r} cannot model this {kind} ({len(problems)} problem(s)):\n{lines}"
    )


def check_amp_scaling(adapter_name: str, optimizer: Any) -> None:
    """Refuse a step that unscales gradients inside a fused kernel (``torch.amp.GradScaler``).

    ``GradScaler.step`` hands ``grad_scale``/``found_inf`` to fused optimizers, which then divide
    ``p.grad`` inside the kernel and may skip the step: the gradient the optimizer saw is no longer
    ``p.grad``.
    """
    scale = getattr(optimizer, "grad_scale", None)
    found = getattr(optimizer, "found_inf", None)
    if scale is not None or found is not None:
        raise_problems(
            adapter_name,
            optimizer,
            [
                "optimizer.grad_scale/found_inf are set (torch.amp.GradScaler.step with a fused optimizer): the "
                "kernel unscales p.grad internally and may skip the step, which the recurrence does not model. "
                "Allowed: grad_scale=None. Fix: call scaler.unscale_(optimizer) before optimizer.step() and "
                "build the optimizer with fused=False, or train without GradScaler."
            ],
        )


@dataclass(frozen=True)
class GroupSnapshot:
    """Hyperparameters of one parameter group at the moment of a step.

    Attributes
    ----------
    values : Mapping[str, Any]
        The group's hyperparameters (everything except ``"params"``).
    with_grad : tuple[Tensor, ...]
        The group's parameters that have a gradient at this step (the ones torch updates).
    """

    values: Mapping[str, Any]
    with_grad: tuple[Tensor, ...]


def snapshot_groups(optimizer: torch.optim.Optimizer) -> list[GroupSnapshot]:
    """Copy every group's hyperparameters and the parameters that will be updated."""
    out = []
    for group in optimizer.param_groups:
        values = {k: v for k, v in group.items() if k != "params"}
        with_grad = tuple(p for p in group["params"] if p.grad is not None)
        out.append(GroupSnapshot(values=values, with_grad=with_grad))
    return out


def maximize_switch_problems(optimizer: torch.optim.Optimizer, last: dict[int, bool], buffer_key: str) -> list[str]:
    """A problem per group whose ``maximize`` changed since its parameters' buffers were built; updates ``last``.

    The adapters model ``maximize=True`` by negating ``P`` and ``lambda_c``, so their modelled buffer
    is the negative of torch's; a buffer built before a switch would keep the other sign, and the
    update of every later step would be wrong. A switch is refused while a parameter of the group
    holds ``optimizer.state[p][buffer_key]``.

    Parameters
    ----------
    last : dict of int to bool
        ``maximize`` at each parameter's previous step, keyed by ``id(param)`` (the adapter's own).
    buffer_key : str
        The state entry holding the buffer (``"momentum_buffer"``, ``"exp_avg"``).
    """
    problems, seen = [], {}
    for g, group in enumerate(optimizer.param_groups):
        now = bool(group.get("maximize", False))
        for p in group["params"]:
            if p.grad is None:
                continue
            before = last.get(id(p), now)
            if before != now and optimizer.state.get(p, {}).get(buffer_key) is not None:
                problems.append(
                    f"param_groups[{g}]['maximize'] was switched from {before} to {now} while its parameters hold "
                    f"{buffer_key!r} built with maximize={before} (at the previous step, or in the recorded run's "
                    f"optimizer state that restore() loaded): maximize is modelled by negating P, so a buffer "
                    f"built before the switch would enter every later update with the wrong sign. Allowed: "
                    f"{before} for the rest of the run. Fix: keep maximize fixed, or switch with a new optimizer "
                    f"and a new recorder."
                )
                break
            seen[id(p)] = now
    if not problems:
        last.update(seen)
    return problems


def remember_maximize(optimizer: torch.optim.Optimizer, last: dict[int, bool]) -> None:
    """Take every group's current ``maximize`` as that of its parameters' previous step (updates ``last``).

    Called when a resumed recording loaded the recorded run's optimizer state (the adapter's
    ``resumed``): its buffers were built with the loaded ``maximize``, so a switch made after it is
    refused by :func:`maximize_switch_problems` at the next step, as a switch mid-run is.
    """
    last.update({id(p): bool(group.get("maximize", False)) for group in optimizer.param_groups
                 for p in group["params"]})


def sparse_problems(optimizer: torch.optim.Optimizer) -> list[str]:
    """A problem per group holding a sparse gradient (Adagrad's sparse path updates only the rows seen; Adafactor
    refuses them)."""
    return [
        f"param_groups[{g}] holds a sparse gradient (nn.Embedding(sparse=True) or similar); the recurrence needs "
        f"dense gradients. Allowed: dense p.grad. Fix: build the layer with sparse=False."
        for g, group in enumerate(optimizer.param_groups)
        if any(p.grad is not None and p.grad.is_sparse for p in group["params"])
    ]


def complex_problems(optimizer: torch.optim.Optimizer, why: str) -> list[str]:
    """A problem per group holding a complex parameter (``why``: how the optimizer treats its two parts)."""
    return [
        f"param_groups[{index}] holds a complex parameter; {why}, which a coefficient per complex entry cannot "
        f"express. Allowed: real floating-point parameters. Fix: split the parameter into real and imaginary parts."
        for index, group in enumerate(optimizer.param_groups) if any(torch.is_complex(p) for p in group["params"])
    ]


def checked_config(adapter: Any, optimizer: torch.optim.Optimizer, rules: Iterable[OptionRule],
                   float_keys: Iterable[str], complex_why: str) -> Any:
    """Validate ``optimizer`` for ``adapter`` (a class) and snapshot its groups into ``adapter.config_model``.

    Collects every problem (another class than ``adapter.optimizer_class``, options outside ``rules``, tensor
    hyperparameters among ``float_keys``, complex parameters) and raises one :class:`ConfigError` listing them;
    otherwise returns the validated config: each group's keys of ``adapter.group_model``, and ``n_params``.
    """
    problems = wrong_class_problem(optimizer, adapter.optimizer_class)
    if not problems:
        problems = collect_group_problems(optimizer, rules, float_keys) + complex_problems(optimizer, complex_why)
    raise_problems(adapter.name, optimizer, problems)
    fields = adapter.group_model.model_fields
    groups = [{**{k: g[k] for k in fields if k in g}, "n_params": len(g["params"])} for g in optimizer.param_groups]
    return validate_config(adapter.config_model, {"param_groups": groups}, f"Optimizer adapter {adapter.name!r}")
