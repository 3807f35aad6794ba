"""The adapters' pure updates (``update_fn``) in the adapter conformance check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import explaind
from explaind.testing.adapters import AdapterScenario, check_optimizer_adapter
from explaind.testing.plugins import PluginCheckError

pytestmark = pytest.mark.usefixtures("one_thread")

SCENARIOS = {
    "sgd": [AdapterScenario("nesterov_wd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
                            schedule="step", sometimes_unused=True)],
    "adam": [AdapterScenario("l2_amsgrad", {"lr": 2e-2, "weight_decay": 0.1, "amsgrad": True, "eps": 1e-3},
                             schedule="onecycle", sometimes_unused=True),
             AdapterScenario("maximize", {"lr": 2e-2, "weight_decay": 0.1, "maximize": True})],
    "adamw": [AdapterScenario("wd_step_lr", {"lr": 2e-2, "weight_decay": 0.5}, schedule="step", clip_norm=0.25)],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_pure_update_reproduces_torch(name):
    record = explaind.get_entry("optimizer_adapter", name)
    report = check_optimizer_adapter(record, SCENARIOS[name], dtype=torch.float64, tol=1e-12)
    assert set(report.pure_residuals) == {s.name for s in SCENARIOS[name]} and not report.pure_refused
    assert all(float(r.max()) <= 1e-12 for r in report.pure_residuals.values())


def test_adam_groups_with_different_beta2_are_listed_as_refused():
    record = explaind.get_entry("optimizer_adapter", "adam")
    two = AdapterScenario("two_groups", {"lr": 2e-2}, second_group={"betas": (0.8, 0.99)}, n_steps=3)
    report = check_optimizer_adapter(record, [two], dtype=torch.float64, tol=1e-12)
    assert "groups differ in betas[1]" in report.pure_refused["two_groups"]


def test_a_wrong_pure_update_fails_the_check():
    record = explaind.get_entry("optimizer_adapter", "sgd")

    class NoWeightDecay:
        def init_state(self, theta):
            return {"m": torch.zeros_like(theta)}

        def scalars(self, update, theta, state, grad):
            return {}

        def __call__(self, update, scalars, theta, state, grad):
            m = update.a * state["m"] + update.b * grad
            return theta - update.P * (update.q * m + update.n * grad), {"m": m}

    broken = dataclasses.replace(record, update_fn=lambda hyper: NoWeightDecay())
    with pytest.raises(PluginCheckError, match=r"\(pure update\)"):
        check_optimizer_adapter(broken, SCENARIOS["sgd"], dtype=torch.float64, tol=1e-12)
