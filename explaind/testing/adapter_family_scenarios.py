"""Option sweeps of the conformance check for torch's NAdam, RAdam and Adamax (docs/optimizers.md).

:func:`~explaind.testing.adapters.default_scenarios` takes its runs for these three classes from
:func:`adam_family_scenarios`: every option the adapters model (L2 or decoupled weight decay, momentum
decay, rectified and never-rectified RAdam steps, ``maximize``, the ``foreach`` path) on top of the
generic runs (two groups, schedules, accumulation, clipping, a frozen and a sometimes-unused parameter).
"""

from __future__ import annotations

import torch

from .adapters import AdapterScenario, _common_variants

__all__ = ["adam_family_scenarios"]


def adam_family_scenarios(optimizer_class: type) -> list[AdapterScenario] | None:
    """The scenarios of :class:`torch.optim.NAdam`, ``RAdam`` or ``Adamax`` (subclasses too); ``None`` otherwise."""
    base = {"lr": 2e-2, "weight_decay": 0.1}
    second = {"lr": 8e-3, "weight_decay": 0.01, "betas": (0.8, 0.99)}
    decoupled = {"lr": 2e-2, "weight_decay": 0.5, "decoupled_weight_decay": True}
    if issubclass(optimizer_class, torch.optim.NAdam):
        return [
            AdapterScenario("nadam_plain", {"lr": 2e-2}),
            AdapterScenario("nadam_l2_momentum_decay", {**base, "momentum_decay": 0.02, "eps": 1e-3,
                                                        "betas": (0.9, 0.7)}),
            AdapterScenario("nadam_decoupled", decoupled),
            AdapterScenario("nadam_maximize", {**base, "maximize": True}),
            AdapterScenario("nadam_foreach", {**base, "foreach": True}),
            AdapterScenario("nadam_foreach_decoupled_maximize", {**decoupled, "foreach": True, "maximize": True}),
            *_common_variants(base, second, "nadam_"),
        ]
    if issubclass(optimizer_class, torch.optim.RAdam):
        # beta2 = 0.999: steps 1-5 have rho_t <= 5 (momentum steps), the later ones are rectified with r_t from
        # 0.08 up; lr 10x Adam's keeps |Delta theta| / |theta| >= 1e-3, above the rounding floor ulp(theta)
        base, second = {"lr": 0.2, "weight_decay": 0.1}, {**second, "lr": 0.08}
        decoupled = {"lr": 0.2, "weight_decay": 0.05, "decoupled_weight_decay": True}
        return [
            AdapterScenario("radam_plain", {"lr": 0.2}),
            AdapterScenario("radam_l2", {**base, "eps": 1e-3}),
            AdapterScenario("radam_decoupled", decoupled),
            AdapterScenario("radam_maximize", {**base, "maximize": True}),
            AdapterScenario("radam_never_rectified", {**base, "betas": (0.9, 0.6)}),
            AdapterScenario("radam_foreach", {**base, "foreach": True}),
            AdapterScenario("radam_foreach_decoupled_maximize", {**decoupled, "foreach": True, "maximize": True}),
            *_common_variants(base, second, "radam_"),
        ]
    if issubclass(optimizer_class, torch.optim.Adamax):
        return [
            AdapterScenario("adamax_plain", {"lr": 2e-2}),
            AdapterScenario("adamax_l2", {**base, "eps": 1e-3, "betas": (0.9, 0.7)}),
            AdapterScenario("adamax_maximize", {**base, "maximize": True}),
            AdapterScenario("adamax_foreach", {**base, "foreach": True, "maximize": True}),
            *_common_variants(base, second, "adamax_"),
        ]
    return None
