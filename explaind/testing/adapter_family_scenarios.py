"""Option sweeps of the conformance check for torch's NAdam, RAdam, Adamax, Adagrad, ASGD, Adadelta, Rprop and
Adafactor (docs/optimizers.md).

:func:`~explaind.testing.adapters.default_scenarios` takes its runs for these classes from
:func:`family_options`: every option the adapters model (L2 or decoupled weight decay, momentum
decay, rectified and never-rectified RAdam steps, Adagrad's ``lr_decay`` and initial accumulator, Adafactor's
``beta2_decay``, epsilons and clipping threshold, ``maximize``,
the ``foreach`` path), to which it adds
the generic runs (two groups, schedules, accumulation, clipping, a frozen and a sometimes-unused
parameter) with the base options and the second group's overrides given here.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FamilyOptions", "family_options"]

#: ``(named runs as (name, optimizer kwargs), base kwargs of the generic runs, second-group overrides, prefix)``.
FamilyOptions = tuple[list[tuple[str, dict[str, Any]]], dict[str, Any], dict[str, Any], str]


def family_options(optimizer_class: type) -> FamilyOptions | None:
    """The runs of :class:`torch.optim.NAdam`, ``RAdam``, ``Adamax``, ``Adagrad``, ``ASGD``, ``Adadelta``, ``Rprop``
    or ``Adafactor`` (subclasses too), or of transformers' ``Adafactor`` (that class exactly); else ``None``."""
    base = {"lr": 2e-2, "weight_decay": 0.1}
    second = {"lr": 8e-3, "weight_decay": 0.01, "betas": (0.8, 0.99)}
    decoupled = {"lr": 2e-2, "weight_decay": 0.5, "decoupled_weight_decay": True}
    if issubclass(optimizer_class, torch.optim.NAdam):
        return [
            ("nadam_plain", {"lr": 2e-2}),
            ("nadam_l2_momentum_decay", {**base, "momentum_decay": 0.02, "eps": 1e-3, "betas": (0.9, 0.7)}),
            ("nadam_decoupled", decoupled),
            ("nadam_maximize", {**base, "maximize": True}),
            ("nadam_foreach", {**base, "foreach": True}),
            ("nadam_foreach_decoupled_maximize", {**decoupled, "foreach": True, "maximize": True}),
        ], base, second, "nadam_"
    if issubclass(optimizer_class, torch.optim.RAdam):
        # beta2 = 0.999: steps 1-5 have rho_t <= 5 (momentum steps), the later ones are rectified with r_t from
        # 0.026 up; lr 10x Adam's keeps |Delta theta| / |theta| >= 1e-3, above the rounding floor ulp(theta)
        base, second = {"lr": 0.2, "weight_decay": 0.1}, {**second, "lr": 0.08}
        decoupled = {"lr": 0.2, "weight_decay": 0.05, "decoupled_weight_decay": True}
        return [
            ("radam_plain", {"lr": 0.2}),
            ("radam_l2", {**base, "eps": 1e-3}),
            ("radam_decoupled", decoupled),
            ("radam_maximize", {**base, "maximize": True}),
            ("radam_never_rectified", {**base, "betas": (0.9, 0.6)}),
            ("radam_foreach", {**base, "foreach": True}),
            ("radam_foreach_decoupled_maximize", {**decoupled, "foreach": True, "maximize": True}),
        ], base, second, "radam_"
    if issubclass(optimizer_class, torch.optim.Adamax):
        return [
            ("adamax_plain", {"lr": 2e-2}),
            ("adamax_l2", {**base, "eps": 1e-3, "betas": (0.9, 0.7)}),
            ("adamax_maximize", {**base, "maximize": True}),
            ("adamax_foreach", {**base, "foreach": True, "maximize": True}),
        ], base, second, "adamax_"
    if issubclass(optimizer_class, torch.optim.Adagrad):
        base = {"lr": 5e-2, "weight_decay": 0.1, "lr_decay": 0.05}
        return [
            ("adagrad_plain", {"lr": 5e-2}),
            ("adagrad_decay_accumulator", {**base, "initial_accumulator_value": 0.3, "eps": 1e-3}),
            ("adagrad_maximize", {**base, "maximize": True}),
            ("adagrad_foreach", {**base, "foreach": True}),
        ], base, {"lr": 2e-2, "weight_decay": 0.0}, "adagrad_"
    if issubclass(optimizer_class, torch.optim.ASGD):
        # lambd 0.1 and lr 0.1 make eta decay visibly (0.1 / (1 + 0.01 t)^alpha) and the decay term 1e-2 per step
        base = {"lr": 0.1, "lambd": 0.1, "weight_decay": 0.05}
        return [
            ("asgd_plain", {"lr": 0.1}),
            ("asgd_decay_alpha_t0", {**base, "alpha": 1.0, "t0": 3.0}),
            ("asgd_maximize", {**base, "maximize": True}),
            ("asgd_foreach", {**base, "foreach": True}),
            ("asgd_foreach_maximize", {**base, "foreach": True, "maximize": True}),
        ], base, {"lr": 0.03, "lambd": 0.0, "weight_decay": 0.0}, "asgd_"
    if issubclass(optimizer_class, torch.optim.Adadelta):
        base = {"lr": 1.0, "weight_decay": 0.1}
        return [
            ("adadelta_plain", {"lr": 1.0}),
            ("adadelta_rho_eps", {**base, "rho": 0.5, "eps": 1e-3}),
            ("adadelta_maximize", {**base, "maximize": True}),
            ("adadelta_foreach", {**base, "foreach": True}),
            ("adadelta_foreach_maximize", {**base, "foreach": True, "maximize": True}),
        ], base, {"lr": 0.5, "weight_decay": 0.0, "rho": 0.8}, "adadelta_"
    if issubclass(optimizer_class, torch.optim.Rprop):
        # step sizes start at lr and grow by etaplus while a sign holds: lr 0.01 keeps |Delta theta| / |theta| near
        # 1e-2, far above the rounding floor; etas (0.3, 1.5) and a cap of 0.03 make sign flips and clamping common
        base = {"lr": 1e-2, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.03)}
        return [
            ("rprop_plain", {"lr": 1e-2}),
            ("rprop_etas_step_sizes", base),
            ("rprop_maximize", {**base, "maximize": True}),
            ("rprop_foreach", {**base, "foreach": True}),
            ("rprop_foreach_maximize", {**base, "foreach": True, "maximize": True}),
        ], base, {"lr": 3e-3, "etas": (0.5, 1.2)}, "rprop_"
    if issubclass(optimizer_class, torch.optim.Adafactor):
        # lr caps the relative step size rho_t = min(lr, 1/sqrt(t)); d = 1 clips most early updates (RMS(U) > 1)
        base = {"lr": 5e-2, "weight_decay": 0.1}
        return [
            ("adafactor_plain", {"lr": 5e-2}),
            ("adafactor_decay_eps", {**base, "beta2_decay": -0.5, "eps": (1e-3, 1e-2)}),
            ("adafactor_no_clip", {**base, "d": 1e6}),
            ("adafactor_maximize", {**base, "maximize": True}),
            ("adafactor_foreach", {**base, "foreach": True, "maximize": True}),
        ], base, {"lr": 2e-2, "weight_decay": 0.0, "d": 2.0}, "adafactor_"
    if (optimizer_class.__module__, optimizer_class.__qualname__) == ("transformers.optimization", "Adafactor"):
        fixed = {"lr": 5e-2, "relative_step": False, "scale_parameter": False}  # what Trainer(optim="adafactor") builds
        # scale_parameter multiplies the step by RMS(theta) (about 0.3 here): lr 0.3 keeps updates well above
        # ulp(theta); warmup_init's steps (1e-6 t relative) are below float32's rounding of theta, so its residual
        # would measure rounding: it runs in float64 with its own tolerance (tests/test_optimizer_hf_adafactor.py)
        base = {"lr": 0.3, "relative_step": False, "scale_parameter": True, "weight_decay": 0.1, "clip_threshold": 0.5}
        return [
            ("hf_adafactor_trainer_default", fixed),
            ("hf_adafactor_fixed_beta1", {**fixed, "beta1": 0.9}),
            ("hf_adafactor_decay_eps_clip", {**fixed, "decay_rate": -0.5, "eps": (1e-20, 1e-2), "clip_threshold": 2.0}),
            ("hf_adafactor_scaled_beta1", {**base, "beta1": 0.9}),
            ("hf_adafactor_relative_step", {"lr": None, "relative_step": True, "scale_parameter": False}),
            ("hf_adafactor_relative_step_scaled", {"lr": None, "relative_step": True, "scale_parameter": True}),
        ], base, {"lr": 0.1, "weight_decay": 0.0}, "hf_adafactor_"
    return None
