"""torch.optim.Adagrad recorded through the first-party adapter: exact, or refused naming the fix.

Float64 runs of a tanh MLP, a ReLU MLP and a dropout MLP (tests/_rmsprop_adagrad_kit.py): replica <= 1e-6 relative
to the trained model, residual share <= 1e-9, and ``keep=("train",)`` scores <= 1e-9 relative to a slow loop
reference whose Adagrad coefficients come from the maths (decayed learning rate, accumulator from the optimizer's
state at the start; its own residual <= 1e-12 checks them against torch's updates). The conformance suites run in
float64 and float32.
"""

from __future__ import annotations

import pytest
import torch
from _rmsprop_adagrad_kit import MODELS, assert_exact, data, math_reference, record

import explaind
from explaind.exceptions import ConfigError
from explaind.testing import check_adapter_start_state, check_optimizer_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {
    "plain": {"lr": 0.05},
    "decay_accumulator_wd": {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.2, "weight_decay": 0.05},
    "eps_maximize": {"lr": 0.05, "eps": 1e-3, "maximize": True, "weight_decay": 0.1},
    "foreach_decay": {"lr": 0.05, "lr_decay": 0.3, "foreach": True},
}


def _one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=5, div_factor=2.0, final_div_factor=4.0,
                                               cycle_momentum=False)


@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_each_option_set_on_the_tanh_mlp_is_exact(options):
    build, ref_class, quad = MODELS["tanh"]
    model = build()
    hp = OPTIONS[options]
    opt = torch.optim.Adagrad(model.parameters(), **hp)
    traj, lrs, start = record(model, opt, steps=5, schedule=_one_cycle)
    assert traj.manifest.adapter == "adagrad" and len(set(lrs)) == 5  # the schedule moved lr at every step
    _, _, X_test = data()
    assert_exact(model, traj, X_test, math_reference(ref_class, "adagrad", hp, lrs, start), quad)
    assert not traj.initial_state()  # torch builds Adagrad's state with the optimizer: no momentum buffer to start


@pytest.mark.parametrize("kind, options", [("relu", "decay_accumulator_wd"), ("dropout", "eps_maximize"),
                                           ("dropout", "plain")])
def test_relu_and_dropout_models_are_exact(kind, options):
    build, ref_class, quad = MODELS[kind]
    model = build()
    hp = OPTIONS[options]
    traj, lrs, start = record(model, torch.optim.Adagrad(model.parameters(), **hp), steps=4)
    _, _, X_test = data()
    assert_exact(model, traj, X_test, math_reference(ref_class, "adagrad", hp, lrs, start), quad)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_conformance_suites(dtype, tol):
    record_ = explaind.get_entry("optimizer_adapter", "adagrad")
    report = check_optimizer_adapter(record_, dtype=dtype, tol=tol)
    assert not report.failures() and not report.pure_refused
    assert {"adagrad_decay_accumulator", "adagrad_maximize", "adagrad_foreach"} <= set(report.residuals)
    assert max(float(r.max()) for r in report.pure_residuals.values()) <= tol
    assert max(check_adapter_start_state(record_, dtype=dtype, tol=tol).values()) <= tol


@pytest.mark.parametrize("kwargs, message", [
    ({"fused": True}, r"\['fused'\]=True is not supported \(the fused kernel runs its own arithmetic.*Allowed: None, "
                      r"False\. Fix: build the optimizer with fused=False"),
    ({"differentiable": True}, r"\['differentiable'\]=True is not supported.*Fix: build the optimizer with "
                               r"differentiable=False"),
    ({"lr": torch.tensor(0.05)}, r"\['lr'\]=tensor\(0\.0500.*is a tensor.*Fix: pass lr=float"),
])
def test_refused_options_name_the_value_and_the_fix(kwargs, message):
    model = MODELS["tanh"][0]()
    with pytest.raises(ConfigError, match=r"(?s)Optimizer adapter 'adagrad' cannot model this torch\.optim\.adagrad\."
                                          r"Adagrad.*" + message):
        explaind.TrajectoryRecorder(model, torch.optim.Adagrad(model.parameters(), **kwargs), loss="cross_entropy")


def test_sparse_gradients_are_refused_at_the_step_naming_the_fix():
    emb = torch.nn.Embedding(5, 3, sparse=True).to(torch.float64)
    record_ = explaind.get_entry("optimizer_adapter", "adagrad")
    opt = torch.optim.Adagrad(emb.parameters(), lr=0.1)
    adapter = record_.implementation.from_optimizer(opt)
    emb(torch.tensor([0, 2])).sum().backward()
    with pytest.raises(ConfigError, match=r"sparse gradient.*Fix: build the layer with sparse=False"):
        adapter.before_step(opt)


def test_pure_update_refuses_groups_that_differ_in_eps_and_starts_other_accumulators_from_the_stored_state():
    model = MODELS["tanh"][0]()
    record_ = explaind.get_entry("optimizer_adapter", "adagrad")
    opt = torch.optim.Adagrad([{"params": model[0].parameters(), "eps": 1e-3},
                               {"params": model[2].parameters()}], lr=0.05)
    with pytest.raises(ConfigError, match=r"Adagrad pure update: the parameter groups differ in eps \(\(eps=1e-10\), "
                                          r"\(eps=0\.001\)\).*Fix: record the run with shared values"):
        record_.update_fn(record_.implementation.from_optimizer(opt).hyperparameters())
    opt = torch.optim.Adagrad([{"params": model[0].parameters(), "initial_accumulator_value": 0.5},
                               {"params": model[2].parameters()}], lr=0.05)
    pure = record_.update_fn(record_.implementation.from_optimizer(opt).hyperparameters())
    with pytest.raises(ConfigError, match=r"differ in initial_accumulator_value.*Fix: record the run with this "
                                          r"explaind"):
        pure.init_state(torch.zeros(2, dtype=torch.float64))
    saved = {"sum": torch.full((2,), 0.5, dtype=torch.float64), "step": torch.tensor(0.0)}
    assert torch.equal(pure.start_state(torch.zeros(2, dtype=torch.float64), None, saved)["sum"], saved["sum"])
