"""Optimizer adapters reproduce torch's SGD/Adam/AdamW updates step by step.

The reference is torch itself: every scenario trains a real model with the torch optimizer and
compares the actual ``theta_{s+1} - theta_s`` with the adapter's coefficients replayed in float64
through ``LinearUpdate.step``. Negative controls show the check fails on subtly wrong adapters.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import explaind
from explaind.records import OptimizerAdapterRecord
from explaind.testing.adapters import AdapterScenario, check_optimizer_adapter, default_scenarios
from explaind.testing.plugins import PluginCheckError

REQUIRED = {
    "sgd": {
        "sgd_plain",
        "sgd_momentum_dampening",
        "sgd_nesterov_weight_decay",
        "sgd_two_groups",
        "sgd_accumulation_3",
        "sgd_clip_grad_norm",
        "sgd_step_lr",
        "sgd_one_cycle",
        "sgd_frozen_and_unused",
    },
    "adam": {"adam_l2_amsgrad", "adam_two_groups", "adam_accumulation_3", "adam_clip_grad_norm", "adam_one_cycle"},
    "adamw": {
        "adamw_amsgrad",
        "adamw_step_lr",
        "adamw_one_cycle",
        "adamw_two_groups",
        "adamw_accumulation_3",
        "adamw_clip_grad_norm",
        "adamw_frozen_and_unused",
    },
}


@pytest.fixture(scope="module", params=[(n, d) for n in ("sgd", "adam", "adamw") for d in ("float64", "float32")])
def report(request):
    name, dtype = request.param
    tol = 1e-12 if dtype == "float64" else 1e-5
    record = explaind.get_entry("optimizer_adapter", name)
    rep = check_optimizer_adapter(record, dtype=getattr(torch, dtype), tol=tol, raise_on_failure=False)
    return name, dtype, tol, rep


def test_every_step_within_tolerance(report):
    name, dtype, tol, rep = report
    assert REQUIRED[name] <= set(rep.residuals), sorted(REQUIRED[name] - set(rep.residuals))
    for scenario, residuals in rep.residuals.items():
        assert residuals.shape == (12,)
        assert np.all(np.isfinite(residuals))
        worst = float(residuals.max())
        assert worst <= tol, f"{name} {dtype} {scenario}: max residual {worst:.3e} > {tol:.0e}"


def test_scenarios_exercise_what_they_claim(report):
    name, _, _, rep = report
    assert rep.clipped_steps[f"{name}_clip_grad_norm"] == 12  # the gradient was really rescaled
    assert rep.clipped_steps[f"{name}_plain"] == 0
    # frozen parameter: 12 steps without grad; extra parameter used at s % 3 == 0: 8 steps without grad
    assert rep.steps_without_grad[f"{name}_frozen_and_unused"] == 12 + 8
    assert rep.failures() == []


def test_float64_residuals_are_at_round_off(report):
    """Not merely below 1e-12: a faithful adapter leaves only a few ulps per step."""
    _, dtype, _, rep = report
    if dtype == "float64":
        assert max(rep.max_residual.values()) < 1e-13


# ------------------------------------------------------------------ closed forms
def test_sgd_coefficients_closed_form():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.9, dampening=0.25, weight_decay=0.1, nesterov=False)
    adapter = explaind.get_entry("optimizer_adapter", "sgd").implementation.from_optimizer(opt)
    coefficients = []
    for _ in range(2):
        p.grad = torch.tensor([0.3, 0.1], dtype=torch.float64)
        before = adapter.before_step(opt)
        opt.step()
        coefficients.append(adapter.after_step(opt, before)[id(p)])
    first, second = coefficients
    assert (first.a, first.b, first.P, first.q, first.n, first.lambda_c, first.lambda_d) == (
        0.0, 1.0, 0.5, 1.0, 0.0, 0.1, 0.0
    )
    assert (second.a, second.b) == (0.9, 0.75)


def test_sgd_nesterov_and_maximize_closed_form():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.8, nesterov=True, weight_decay=0.1, maximize=True)
    adapter = explaind.get_entry("optimizer_adapter", "sgd").implementation.from_optimizer(opt)
    p.grad = torch.ones(2, dtype=torch.float64)
    before = adapter.before_step(opt)
    opt.step()
    upd = adapter.after_step(opt, before)[id(p)]
    assert (upd.q, upd.n, upd.P, upd.lambda_c) == (0.8, 1.0, -0.5, -0.1)
    # maximize moves along +g: from theta = 0, u = g, m = g, step = lr * (mu m + u) = 0.5 * 1.8
    assert torch.allclose(p.detach(), torch.full((2,), 0.9, dtype=torch.float64), rtol=0, atol=1e-15)


def test_adam_first_step_closed_form():
    """At t = 1, v = (1 - b2) g^2, so P = lr / (1 - b1) / (|g| + eps) exactly (up to round-off)."""
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.9, 1e-3, 0.5
    g = torch.tensor([0.3, -0.02, 1.5], dtype=torch.float64)
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
        opt = cls([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        record = explaind.plugins.resolve_optimizer_adapter(opt)
        adapter = record.implementation.from_optimizer(opt)
        p.grad = g.clone()
        before = adapter.before_step(opt)
        opt.step()
        upd = adapter.after_step(opt, before)[id(p)]
        u = g + (wd * torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) if cls is torch.optim.Adam else 0.0)
        expected_P = lr / (1 - b1) / (u.abs() + eps)
        assert torch.allclose(upd.P, expected_P, rtol=1e-14, atol=0)
        assert math.isclose(upd.a, b1, rel_tol=1e-15) and math.isclose(upd.b, 1 - b1, rel_tol=1e-15)
        if cls is torch.optim.AdamW:
            assert (upd.lambda_c, upd.lambda_d) == (0.0, pytest.approx(lr * wd, rel=1e-12))
        else:
            assert (upd.lambda_c, upd.lambda_d) == (wd, 0.0)


def test_params_without_grad_are_left_out():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        opt = cls([a, b], lr=0.1)
        adapter = explaind.plugins.resolve_optimizer_adapter(opt).implementation.from_optimizer(opt)
        a.grad, b.grad = torch.ones(2), None
        before = adapter.before_step(opt)
        opt.step()
        assert set(adapter.after_step(opt, before)) == {id(a)}


# ------------------------------------------------------------------ negative controls
def _mutant(name: str, base_name: str, patch) -> OptimizerAdapterRecord:
    base = explaind.get_entry("optimizer_adapter", base_name)

    class Mutant(base.implementation):
        def after_step(self, optimizer, before):
            return {k: patch(u) for k, u in super().after_step(optimizer, before).items()}

    return OptimizerAdapterRecord(
        name=name, implementation=Mutant, config=base.config, description="wrong on purpose",
        optimizer_classes=base.optimizer_classes,
    )


def _scenario(record, wanted):
    return [s for s in default_scenarios(record.optimizer_classes[0]) if s.name == wanted]


@pytest.mark.parametrize(
    ("base", "scenario", "patch"),
    [
        ("sgd", "sgd_momentum_dampening", lambda u: replace(u, b=1.0)),  # dampening ignored
        ("sgd", "sgd_nesterov_weight_decay", lambda u: replace(u, q=1.0, n=0.0)),
        ("adamw", "adamw_plain", lambda u: replace(u, lambda_c=u.lambda_d, lambda_d=0.0)),
        ("adam", "adam_plain", lambda u: replace(u, P=u.P * (1 + 1e-9))),
    ],
)
def test_check_fails_on_wrong_coefficients(base, scenario, patch):
    record = _mutant("mutant", base, patch)
    with pytest.raises(PluginCheckError, match="does not reproduce"):
        check_optimizer_adapter(record, scenarios=_scenario(record, scenario))


def test_check_fails_on_stale_hyperparameters():
    """An adapter that ignores the scheduler (lr frozen at construction) is caught."""
    base = explaind.get_entry("optimizer_adapter", "adam")

    class Frozen(base.implementation):
        def before_step(self, optimizer):
            snap = super().before_step(optimizer)
            if not hasattr(self, "_first"):
                self._first = [dict(g.values) for g in snap.groups]
            for g, first in zip(snap.groups, self._first):
                g.values.update(lr=first["lr"])
            return snap

    record = OptimizerAdapterRecord("frozen", Frozen, base.config, "wrong on purpose", base.optimizer_classes)
    with pytest.raises(PluginCheckError, match="adam_step_lr"):
        check_optimizer_adapter(record, scenarios=_scenario(record, "adam_step_lr"))


def test_check_fails_on_ignored_amsgrad():
    base = explaind.get_entry("optimizer_adapter", "adam")

    class NoMax(base.implementation):
        def before_step(self, optimizer):
            snap = super().before_step(optimizer)
            for g in snap.groups:
                g.values.update(amsgrad=False)
            return snap

    record = OptimizerAdapterRecord("nomax", NoMax, base.config, "wrong on purpose", base.optimizer_classes)
    with pytest.raises(PluginCheckError, match="adam_l2_amsgrad"):
        check_optimizer_adapter(record, scenarios=_scenario(record, "adam_l2_amsgrad"))


def test_check_fails_when_a_parameter_is_missing():
    base = explaind.get_entry("optimizer_adapter", "sgd")

    class Missing(base.implementation):
        def after_step(self, optimizer, before):
            out = super().after_step(optimizer, before)
            out.pop(next(iter(out)))
            return out

    record = OptimizerAdapterRecord("missing", Missing, base.config, "wrong on purpose", base.optimizer_classes)
    with pytest.raises(PluginCheckError, match="one LinearUpdate per parameter with a gradient"):
        check_optimizer_adapter(record, scenarios=[AdapterScenario("short", {"lr": 0.1}, n_steps=2)])


def test_report_without_raising_and_custom_scenarios():
    record = explaind.get_entry("optimizer_adapter", "sgd")
    scenarios = [AdapterScenario("tiny", {"lr": 0.1, "momentum": 0.5}, n_steps=3, micro_batches=2)]
    rep = check_optimizer_adapter(record, scenarios=scenarios, tol=-1.0, raise_on_failure=False)  # cannot pass
    assert list(rep.residuals) == ["tiny"] and rep.residuals["tiny"].shape == (3,)
    assert rep.failures() == ["tiny", "tiny (pure update)"]  # reported, not raised (recurrence and update_fn)
    assert rep.max_residual["tiny"] < 1e-13
    assert "tiny" in str(rep)
