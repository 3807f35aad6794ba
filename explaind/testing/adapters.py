r"""Conformance check for optimizer adapters: replay real torch runs through the recurrence.

:func:`check_optimizer_adapter` trains a small MLP with the record's optimizer class under a
list of :class:`AdapterScenario` s (momentum variants, weight decay, AMSGrad, two parameter
groups, learning-rate schedules, gradient accumulation, gradient clipping, a frozen parameter,
a parameter without gradient at some steps). Around every ``optimizer.step()`` it calls the
adapter's ``before_step``/``after_step`` and replays the step with
:meth:`explaind.recurrence.LinearUpdate.step` in float64, from the gradient the optimizer saw
(``p.grad`` at the pre-step point) and a modelled momentum buffer ``m`` kept by the check
(never torch's). The per-step relative residual is

.. math::

    r_s = \frac{\lVert \Delta\theta_s - \widehat{\Delta\theta}_s \rVert_2}{\lVert \Delta\theta_s \rVert_2}

over all parameters at once (a parameter left out of ``after_step`` is modelled as not moving).
A faithful adapter reaches round-off: ``r_s`` is bounded below by ``ulp(theta) / |Delta theta|``
because ``Delta theta_s = theta_{s+1} - theta_s`` is itself rounded; the default scenarios keep
``|Delta theta| / |theta| >= 1e-3`` so that float64 residuals sit near ``1e-15`` and float32 ones
near ``1e-7``.

When the record has an ``update_fn`` (the pure update :math:`z_{s+1} = U_s(z_s, g_s)` of
:class:`explaind.recurrence.PureUpdate`, docs/maths.md §9), the same steps are replayed through
it too, with its own state replayed from the first step, and its per-step relative residual
against torch's ``theta_{s+1}`` is held to the same ``tol`` (:attr:`AdapterCheckReport.pure_residuals`).
A run the pure update refuses with a :class:`~explaind.exceptions.ConfigError` is listed in
:attr:`AdapterCheckReport.pure_refused` with the message (e.g. Adam groups with different ``eps``).

The check also verifies the adapter's contract: ``hyperparameters()`` validates against
``record.config`` and is JSON-serialisable, and ``after_step`` returns a
:class:`~explaind.recurrence.LinearUpdate` for exactly the parameters that had a gradient.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..exceptions import ConfigError
from ..plugins import adapter_optimizer_classes
from ..recurrence import LinearUpdate, is_unchanged
from .adapter_family_scenarios import family_options
from .plugins import PluginCheckError

__all__ = [
    "AdapterScenario",
    "AdapterCheckReport",
    "check_optimizer_adapter",
    "default_scenarios",
]

_N_TRAIN = 48
_BATCH = 8


@dataclass(frozen=True)
class AdapterScenario:
    """One training run of the conformance check.

    Attributes
    ----------
    name : str
        Label in reports.
    optimizer_kwargs : Mapping[str, Any]
        Keyword arguments of the optimizer class (the group defaults).
    second_group : Mapping[str, Any] or None
        When given, the output layer forms a second parameter group with these overrides.
    schedule : {"step", "onecycle"} or None
        ``StepLR(step_size=4, gamma=0.6)`` or ``OneCycleLR`` (cycling momentum/``beta1`` when the
        optimizer has one), stepped after every optimizer step.
    micro_batches : int
        Gradient accumulation: backward passes of ``loss / micro_batches`` per step.
    clip_norm : float or None
        ``torch.nn.utils.clip_grad_norm_`` threshold applied before the step.
    frozen : bool
        Add a parameter with ``requires_grad=False`` to the optimizer (never has a gradient).
    sometimes_unused : bool
        Add a parameter used only at steps ``s % 3 == 0`` (no gradient at the other steps).
    n_steps : int
        Optimizer steps.
    before_each_step : callable or None
        ``f(optimizer, s)`` called after the gradients are final and before the step (e.g. to
        change a hyperparameter mid-run).
    """

    name: str
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    second_group: Mapping[str, Any] | None = None
    schedule: Literal["step", "onecycle"] | None = None
    micro_batches: int = 1
    clip_norm: float | None = None
    frozen: bool = False
    sometimes_unused: bool = False
    n_steps: int = 12
    before_each_step: Callable[[torch.optim.Optimizer, int], None] | None = None


@dataclass
class AdapterCheckReport:
    """Outcome of :func:`check_optimizer_adapter`.

    Attributes
    ----------
    residuals : dict[str, numpy.ndarray]
        Scenario name -> per-step relative residual ``r_s``, shape ``(n_steps,)``.
    clipped_steps : dict[str, int]
        Scenario name -> steps at which ``clip_grad_norm_`` actually rescaled the gradient.
    steps_without_grad : dict[str, int]
        Scenario name -> (step, parameter) pairs left out because the parameter had no gradient.
    tol : float
        The tolerance the run was checked against.
    pure_residuals : dict[str, numpy.ndarray]
        Scenario name -> per-step relative residual of the record's pure update (``update_fn``).
    pure_refused : dict[str, str]
        Scenario name -> the ``ConfigError`` message of a run the pure update refuses.
    """

    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    clipped_steps: dict[str, int] = field(default_factory=dict)
    steps_without_grad: dict[str, int] = field(default_factory=dict)
    tol: float = 0.0
    pure_residuals: dict[str, np.ndarray] = field(default_factory=dict)
    pure_refused: dict[str, str] = field(default_factory=dict)

    @property
    def max_residual(self) -> dict[str, float]:
        """Scenario name -> ``max_s r_s``."""
        return {k: float(v.max()) if v.size else 0.0 for k, v in self.residuals.items()}

    def failures(self) -> list[str]:
        """Scenario names whose maximum residual (recurrence or pure update) exceeds ``tol``."""
        pure = {f"{k} (pure update)": float(v.max()) if v.size else 0.0 for k, v in self.pure_residuals.items()}
        return [k for k, v in {**self.max_residual, **pure}.items() if not v <= self.tol]

    def __str__(self) -> str:
        width = max([len(k) for k in self.residuals] + [8])
        lines = [f"{'scenario':<{width}}  max residual  (tol {self.tol:.1e})"]
        lines += [f"{k:<{width}}  {v:.3e}" for k, v in self.max_residual.items()]
        lines += [f"{k:<{width}}  {float(v.max()) if v.size else 0.0:.3e}  (pure update)"
                  for k, v in self.pure_residuals.items()]
        lines += [f"{k:<{width}}  refused by update_fn" for k in self.pure_refused]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- scenarios
def _momentum_switched_off(optimizer: torch.optim.Optimizer, step: int) -> None:
    """SGD edge case: momentum 0 for steps 4..7 (torch keeps, then reuses, the stale buffer)."""
    for group in optimizer.param_groups:
        group["momentum"] = 0.0 if 4 <= step < 8 else 0.9


def _common_variants(base: dict[str, Any], second: dict[str, Any], prefix: str) -> list[AdapterScenario]:
    return [
        AdapterScenario(f"{prefix}two_groups", base, second_group=second),
        AdapterScenario(f"{prefix}step_lr", base, schedule="step"),
        AdapterScenario(f"{prefix}one_cycle", base, schedule="onecycle"),
        AdapterScenario(f"{prefix}accumulation_3", base, micro_batches=3),
        AdapterScenario(f"{prefix}clip_grad_norm", base, clip_norm=0.25),
        AdapterScenario(f"{prefix}frozen_and_unused", base, frozen=True, sometimes_unused=True),
    ]


def default_scenarios(optimizer_class: type) -> list[AdapterScenario]:
    """The scenarios run when none are given, chosen by optimizer family.

    Parameters
    ----------
    optimizer_class : type
        A ``torch.optim.Optimizer`` subclass. SGD, Adam, AdamW, RMSprop, Adagrad, NAdam, RAdam and Adamax get
        family-specific option sweeps; any other class gets the generic runs with ``lr=1e-2`` only.

    Returns
    -------
    list of AdapterScenario
    """
    if issubclass(optimizer_class, torch.optim.SGD):
        mom = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
        return [
            AdapterScenario("sgd_plain", {"lr": 0.1}),
            AdapterScenario("sgd_momentum_dampening", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
            AdapterScenario("sgd_nesterov_weight_decay", {**mom, "nesterov": True}),
            AdapterScenario("sgd_maximize", {**mom, "lr": 0.05, "maximize": True}),
            AdapterScenario("sgd_foreach", {**mom, "nesterov": True, "foreach": True}),
            AdapterScenario("sgd_fused", {**mom, "dampening": 0.2, "fused": True}),
            AdapterScenario("sgd_momentum_switched_off", mom, before_each_step=_momentum_switched_off),
            *_common_variants(mom, {"lr": 0.03, "weight_decay": 0.1, "momentum": 0.5}, "sgd_"),
        ]
    if issubclass(optimizer_class, torch.optim.AdamW):
        base = {"lr": 2e-2, "weight_decay": 0.5}
        return [
            AdapterScenario("adamw_plain", base),
            AdapterScenario("adamw_amsgrad", {**base, "amsgrad": True, "eps": 1e-3, "betas": (0.9, 0.7)}),
            AdapterScenario("adamw_maximize", {**base, "maximize": True}),
            AdapterScenario("adamw_foreach", {**base, "amsgrad": True, "foreach": True}),
            AdapterScenario("adamw_fused", {**base, "amsgrad": True, "fused": True}),
            *_common_variants(base, {"lr": 8e-3, "weight_decay": 0.05, "betas": (0.8, 0.99)}, "adamw_"),
        ]
    if issubclass(optimizer_class, torch.optim.Adam):
        base = {"lr": 2e-2, "weight_decay": 0.1}
        return [
            AdapterScenario("adam_plain", {"lr": 2e-2}),
            AdapterScenario("adam_l2_amsgrad", {**base, "amsgrad": True, "eps": 1e-3, "betas": (0.9, 0.7)}),
            AdapterScenario("adam_decoupled", {"lr": 2e-2, "weight_decay": 0.5, "decoupled_weight_decay": True}),
            AdapterScenario("adam_maximize", {**base, "maximize": True}),
            AdapterScenario("adam_foreach", {**base, "amsgrad": True, "foreach": True}),
            AdapterScenario("adam_fused", {**base, "amsgrad": True, "fused": True}),
            *_common_variants(base, {"lr": 8e-3, "weight_decay": 0.01, "betas": (0.8, 0.99)}, "adam_"),
        ]
    if issubclass(optimizer_class, torch.optim.RMSprop):
        base = {"lr": 1e-2, "weight_decay": 0.1}
        mom = {**base, "momentum": 0.9, "centered": True}
        return [
            AdapterScenario("rmsprop_plain", {"lr": 1e-2}),
            AdapterScenario("rmsprop_momentum", {**base, "momentum": 0.9, "alpha": 0.9, "eps": 1e-3}),
            AdapterScenario("rmsprop_centered", {**base, "centered": True}),
            AdapterScenario("rmsprop_centered_momentum_maximize", {**mom, "maximize": True}),
            AdapterScenario("rmsprop_foreach", {**mom, "foreach": True}),
            AdapterScenario("rmsprop_momentum_switched_off", mom, before_each_step=_momentum_switched_off),
            *_common_variants(mom, {"lr": 3e-3, "weight_decay": 0.0, "momentum": 0.5}, "rmsprop_"),
        ]
    family = family_options(optimizer_class)
    if family is not None:
        named, base, second, prefix = family
        return [*(AdapterScenario(name, kwargs) for name, kwargs in named), *_common_variants(base, second, prefix)]
    return [AdapterScenario("plain", {"lr": 1e-2}), *_common_variants({"lr": 1e-2}, {"lr": 3e-3}, "")]


# ----------------------------------------------------------------------------- one run
class _TinyMLP(nn.Module):
    def __init__(self, frozen: bool, sometimes_unused: bool, generator: torch.Generator):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
        self.frozen = nn.Parameter(torch.randn(3, generator=generator), requires_grad=False) if frozen else None
        self.extra = nn.Parameter(0.3 * torch.randn(3, generator=generator)) if sometimes_unused else None

    def forward(self, x: Tensor, use_extra: bool) -> Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.frozen is not None:
            out = out + self.frozen
        if self.extra is not None and use_extra:
            out = out + self.extra
        return out


def _param_groups(model: _TinyMLP, scenario: AdapterScenario) -> list[dict[str, Any]]:
    head = [model.fc2.weight, model.fc2.bias]
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    if scenario.second_group is None:
        return [{"params": rest + head}]
    return [{"params": rest}, {"params": head, **dict(scenario.second_group)}]


def _scheduler(optimizer: torch.optim.Optimizer, scenario: AdapterScenario) -> Any:
    if scenario.schedule is None:
        return None
    if scenario.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.6)
    # bounded lr range: an update far below ulp(theta) measures rounding, not the adapter
    cycle = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
    max_lr = [2 * g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=scenario.n_steps, div_factor=2.0, final_div_factor=4.0,
        cycle_momentum=cycle,
    )


def _run_scenario(
    record: Any, optimizer_class: type, scenario: AdapterScenario, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[np.ndarray, int, int, _PureReplay | None]:
    gen = torch.Generator().manual_seed(seed)
    model = _TinyMLP(scenario.frozen, scenario.sometimes_unused, gen).to(device=device, dtype=dtype)
    X = torch.randn(_N_TRAIN, 5, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 3, (_N_TRAIN,), generator=gen).to(device)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = optimizer_class(_param_groups(model, scenario), **dict(scenario.optimizer_kwargs))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scheduler = _scheduler(optimizer, scenario)
    label = f"optimizer adapter {record.name!r}, scenario {scenario.name!r}"

    adapter = record.implementation.from_optimizer(optimizer)
    hyper = adapter.hyperparameters()
    try:
        json.dumps(hyper)
        record.config.model_validate(hyper)
    except Exception as exc:  # the contract: JSON data the record's config accepts
        config_name = record.config.__name__
        raise PluginCheckError(f"{label}: hyperparameters() is not valid {config_name} JSON data: {exc}") from exc

    fresh = getattr(adapter, "fresh_tensors", False)
    if fresh is not True and fresh is not False:
        raise PluginCheckError(f"{label}: fresh_tensors={fresh!r} is not allowed. Choose True (every tensor after_step "
                               f"returns is new and never touched again: the recorder keeps it without a copy) or "
                               f"False (the default: the recorder copies them). Fix: set it to one of these.")
    held: list[tuple[int, Tensor, Tensor]] = []  # with fresh_tensors: each tensor after_step returned, and its copy
    pure = _PureReplay.start(record, hyper, scenario.n_steps)
    momentum: dict[int, Tensor] = {}
    residuals = np.zeros(scenario.n_steps)
    clipped = skipped = 0
    for s in range(scenario.n_steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(scenario.micro_batches):
            idx = torch.randint(0, _N_TRAIN, (_BATCH,), generator=gen).to(device)
            out = model(X[idx], use_extra=(s % 3 == 0))
            (nn.functional.cross_entropy(out, y[idx]) / scenario.micro_batches).backward()
        if scenario.clip_norm is not None:
            total = nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], scenario.clip_norm)
            clipped += int(float(total) > scenario.clip_norm)
        if scenario.before_each_step is not None:
            scenario.before_each_step(optimizer, s)
        theta = [p.detach().clone() for p in params]
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        before = adapter.before_step(optimizer)
        optimizer.step()
        updates = adapter.after_step(optimizer, before)
        residuals[s], n_skipped = _compare(label, s, params, names, theta, grads, updates, momentum)
        held += [(s, t, t.clone()) for u in updates.values() for t in vars(u).values() if fresh and torch.is_tensor(t)]
        skipped += n_skipped
        if pure is not None:
            pure.step(s, params, theta, grads, updates)
        if scheduler is not None:
            scheduler.step()
    changed = sorted({s for s, t, then in held if not torch.equal(t, then)})
    if changed:
        raise PluginCheckError(f"{label}: fresh_tensors=True, but tensors after_step returned at steps {changed} were "
                               f"changed afterwards, so the recorder would keep changed coefficients. Fix: return new "
                               f"tensors, or set fresh_tensors = False.")
    return residuals, clipped, skipped, pure


@dataclass
class _PureReplay:
    """The record's pure update replayed alongside the run, with its own state (docs/maths.md §9)."""

    fn: Any
    residuals: np.ndarray
    state: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    refused: str | None = None

    @classmethod
    def start(cls, record: Any, hyper: Any, n_steps: int) -> _PureReplay | None:
        make = getattr(record, "update_fn", None)
        if make is None:
            return None
        try:
            fn = make(hyper)
        except ConfigError as exc:
            return cls(fn=None, residuals=np.zeros(0), refused=str(exc))
        return cls(fn=fn, residuals=np.zeros(n_steps))

    def step(self, s: int, params: Sequence[Tensor], theta: Sequence[Tensor], grads: Sequence[Tensor | None],
             updates: Mapping[int, LinearUpdate]) -> None:
        if self.fn is None:
            return
        diff_sq = actual_sq = 0.0
        try:
            for p, th, g in zip(params, theta, grads):
                actual = (p.detach() - th).to(torch.float64)
                actual_sq += float(actual.pow(2).sum())
                update = updates.get(id(p))
                if g is None or update is None or is_unchanged(update):
                    continue
                update = update.to(device=actual.device, dtype=torch.float64)
                th64, g64 = th.to(torch.float64), g.to(torch.float64)
                state = self.state.get(id(p))
                if state is None:
                    state = self.fn.init_state(th64)
                scalars = self.fn.scalars(update, th64, state, g64)
                new_theta, self.state[id(p)] = self.fn(update, scalars, th64, state, g64)
                diff_sq += float((new_theta - th64 - actual).pow(2).sum())
        except ConfigError as exc:
            self.fn, self.residuals, self.refused = None, np.zeros(0), str(exc)
            return
        self.residuals[s] = np.sqrt(diff_sq / actual_sq) if actual_sq else np.sqrt(diff_sq)


def _compare(
    label: str,
    step: int,
    params: Sequence[Tensor],
    names: Mapping[int, str],
    theta: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    updates: Any,
    momentum: dict[int, Tensor],
) -> tuple[float, int]:
    if not isinstance(updates, dict):
        raise PluginCheckError(f"{label}: after_step returned {type(updates).__name__}, expected a dict.")
    expected = {id(p) for p, g in zip(params, grads) if g is not None}
    if set(updates) != expected:
        missing = [names.get(k, "?") for k in expected - set(updates)]
        extra = [names.get(k, str(k)) for k in set(updates) - expected]
        raise PluginCheckError(
            f"{label}, step {step}: after_step must return one LinearUpdate per parameter with a gradient; "
            f"missing {missing}, unexpected {extra}."
        )
    diff_sq = actual_sq = 0.0
    for p, th, g in zip(params, theta, grads):
        actual = (p.detach() - th).to(torch.float64)
        if g is None:
            modelled = torch.zeros_like(actual)
        else:
            update = updates[id(p)]
            if not isinstance(update, LinearUpdate):
                raise PluginCheckError(
                    f"{label}, step {step}: after_step()[{names.get(id(p))!r}] is {type(update).__name__}, "
                    f"expected LinearUpdate."
                )
            update = update.to(device=actual.device, dtype=torch.float64)
            modelled, momentum[id(p)] = update.step(
                g.to(torch.float64), momentum.get(id(p)), th.to(torch.float64)
            )
        diff_sq += float((actual - modelled).pow(2).sum())
        actual_sq += float(actual.pow(2).sum())
    n_skipped = sum(g is None for g in grads)
    if actual_sq == 0.0:
        return float(np.sqrt(diff_sq)), n_skipped
    return float(np.sqrt(diff_sq / actual_sq)), n_skipped


# ----------------------------------------------------------------------------- entry point
def check_optimizer_adapter(
    record: Any,
    scenarios: Iterable[AdapterScenario] | None = None,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-12,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    raise_on_failure: bool = True,
) -> AdapterCheckReport:
    """Replay real optimizer runs through an adapter and measure the per-step residual.

    Parameters
    ----------
    record : OptimizerAdapterRecord
        The adapter under test; every class in ``record.optimizer_classes`` is exercised.
    scenarios : iterable of AdapterScenario, optional
        Runs to make; default :func:`default_scenarios` of each optimizer class.
    dtype : torch.dtype
        Parameter dtype of the runs (the replay is always float64).
    tol : float
        Largest accepted relative residual ``r_s`` at any step.
    device : str or torch.device
        Where the runs execute (``"cpu"`` by default; ``"cuda"`` exercises the CUDA kernels).
    seed : int
        Seed of the model, data and batch draws.
    raise_on_failure : bool
        Raise when a residual exceeds ``tol`` (otherwise only report it).

    Returns
    -------
    AdapterCheckReport
        Per-scenario residuals, clipping and missing-gradient counts. With several optimizer
        classes, scenario names are prefixed with the class name.

    Raises
    ------
    PluginCheckError
        (an ``AssertionError``) when the adapter breaks its contract, or, with
        ``raise_on_failure``, when a residual exceeds ``tol``.
    """
    dev = torch.device(device)
    classes = adapter_optimizer_classes(record)
    if not classes:
        raise PluginCheckError(f"optimizer adapter {record.name!r} lists no optimizer_classes to check (and no "
                              f"optimizer_class_names whose module imports).")
    report = AdapterCheckReport(tol=tol)
    given = None if scenarios is None else list(scenarios)
    for cls in classes:
        for scenario in default_scenarios(cls) if given is None else given:
            key = scenario.name if len(classes) == 1 else f"{cls.__name__}:{scenario.name}"
            res, clipped, skipped, pure = _run_scenario(record, cls, scenario, dtype, dev, seed)
            report.residuals[key] = res
            if pure is not None and pure.refused is not None:
                report.pure_refused[key] = pure.refused
            elif pure is not None:
                report.pure_residuals[key] = pure.residuals
            report.clipped_steps[key] = clipped
            report.steps_without_grad[key] = skipped
    bad = report.failures()
    if bad and raise_on_failure:
        series = {**report.residuals, **{f"{k} (pure update)": v for k, v in report.pure_residuals.items()}}
        details = "\n".join(
            f"  - {k}: max residual {float(series[k].max()):.3e} at step {int(np.argmax(series[k]))}" for k in bad
        )
        raise PluginCheckError(
            f"optimizer adapter {record.name!r} does not reproduce torch's updates within tol={tol:.1e} "
            f"({dtype}):\n{details}"
        )
    return report
