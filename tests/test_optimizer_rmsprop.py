"""torch.optim.RMSprop recorded through the first-party adapter: exact, or refused naming the fix.

Float64 runs of a tanh MLP, a ReLU MLP and a dropout MLP (tests/_rmsprop_adagrad_kit.py): replica <= 1e-6 relative
to the trained model, residual share <= 1e-9, and ``keep=("train",)`` scores <= 1e-9 relative to a slow loop
reference whose RMSprop coefficients come from the maths (its own residual <= 1e-12 checks them against torch's
updates). The conformance suites (``check_optimizer_adapter``, ``check_adapter_start_state``) run in float64 and
float32.
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
    "plain": {"lr": 0.01},
    "momentum_wd": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.05, "alpha": 0.9},
    "centered": {"lr": 0.01, "centered": True, "eps": 1e-3},
    "centered_momentum_maximize": {"lr": 0.01, "centered": True, "momentum": 0.5, "maximize": True,
                                   "weight_decay": 0.1},
    "foreach_momentum": {"lr": 0.01, "momentum": 0.8, "foreach": True},
}


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_each_option_set_on_the_tanh_mlp_is_exact(options):
    build, ref_class, quad = MODELS["tanh"]
    model = build()
    hp = OPTIONS[options]
    traj, lrs, _ = record(model, torch.optim.RMSprop(model.parameters(), **hp), steps=5, schedule=_step_lr)
    assert traj.manifest.adapter == "rmsprop"
    _, _, X_test = data()
    assert_exact(model, traj, X_test, math_reference(ref_class, "rmsprop", hp, lrs), quad)


@pytest.mark.parametrize("kind, options", [("relu", "momentum_wd"), ("relu", "plain"),
                                           ("dropout", "centered_momentum_maximize"), ("dropout", "plain")])
def test_relu_and_dropout_models_are_exact(kind, options):
    build, ref_class, quad = MODELS[kind]
    model = build()
    hp = OPTIONS[options]
    traj, lrs, _ = record(model, torch.optim.RMSprop(model.parameters(), **hp), steps=4)
    _, _, X_test = data()
    assert_exact(model, traj, X_test, math_reference(ref_class, "rmsprop", hp, lrs), quad)


def test_momentum_buffer_holds_preconditioned_inputs_as_a_tensor_gain():
    """With momentum the buffer's gain b is 1/d (a tensor) and P is the scalar lr; without, P = lr/d."""
    build, _, _ = MODELS["tanh"]
    for hp, tensor_field, scalar_field in (({"lr": 0.01, "momentum": 0.9}, "b", "P"), ({"lr": 0.01}, "P", "b")):
        model = build()
        traj, _, _ = record(model, torch.optim.RMSprop(model.parameters(), **hp), steps=2)
        update = traj.updates(1)["0.weight"]
        assert torch.is_tensor(getattr(update, tensor_field)) and getattr(update, tensor_field).shape == (6, 4)
        assert not torch.is_tensor(getattr(update, scalar_field))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_conformance_suites(dtype, tol):
    record_ = explaind.get_entry("optimizer_adapter", "rmsprop")
    report = check_optimizer_adapter(record_, dtype=dtype, tol=tol)
    assert not report.failures() and not report.pure_refused
    assert {"rmsprop_centered_momentum_maximize", "rmsprop_momentum_switched_off", "rmsprop_one_cycle"} <= set(
        report.residuals)
    assert max(float(r.max()) for r in report.pure_residuals.values()) <= tol
    assert max(check_adapter_start_state(record_, dtype=dtype, tol=tol).values()) <= tol


@pytest.mark.parametrize("kwargs, message", [
    ({"differentiable": True}, r"\['differentiable'\]=True is not supported.*Allowed: False\. Fix: build the "
                               r"optimizer with differentiable=False"),
    ({"capturable": True}, r"\['capturable'\]=True is not supported.*Fix: build the optimizer with capturable=False"),
    ({"lr": torch.tensor(0.01)}, r"\['lr'\]=tensor\(0\.0100.*is a tensor.*Fix: pass lr=float"),
])
def test_refused_options_name_the_value_and_the_fix(kwargs, message):
    model = MODELS["tanh"][0]()
    with pytest.raises(ConfigError, match=r"(?s)Optimizer adapter 'rmsprop' cannot model this torch\.optim\.rmsprop\."
                                          r"RMSprop.*" + message):
        explaind.TrajectoryRecorder(model, torch.optim.RMSprop(model.parameters(), **kwargs), loss="cross_entropy")


def test_complex_parameters_and_a_maximize_switch_are_refused():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.complex128))
    record_ = explaind.get_entry("optimizer_adapter", "rmsprop")
    with pytest.raises(ConfigError, match=r"complex parameter.*Fix: split the parameter into real and imaginary"):
        record_.implementation.from_optimizer(torch.optim.RMSprop([p]))
    model = MODELS["tanh"][0]()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, centered=True)
    adapter = record_.implementation.from_optimizer(opt)
    X, y, _ = data()
    for s in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.param_groups[0]["maximize"] = s == 1
        if s == 1:
            with pytest.raises(ConfigError, match=r"maximize'\] was switched from False to True while its parameters "
                                                  r"hold 'grad_avg'.*Fix: keep maximize fixed"):
                adapter.before_step(opt)
        else:
            before = adapter.before_step(opt)
            opt.step()
            adapter.after_step(opt, before)


def test_pure_update_refuses_groups_that_differ_in_alpha_naming_the_fix():
    model = MODELS["tanh"][0]()
    opt = torch.optim.RMSprop([{"params": model[0].parameters(), "alpha": 0.9},
                               {"params": model[2].parameters()}], lr=0.01)
    X, y, _ = data()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[:4]), y[:4]).backward()
        rec.log_batch(torch.arange(4))
        opt.step()
    with pytest.raises(ConfigError, match=r"RMSprop pure update: the parameter groups differ in alpha, eps, centered "
                                          r".*Fix: record the run with shared values"):
        explaind.CounterfactualEstimator(device="cpu").fit(rec.trajectory)


def test_momentum_switched_off_mid_run_is_exact():
    """Torch keeps the stale buffer and steps without it (a, b, q, n = 1, 0, 0, 1 with P = lr / d), then reuses it."""
    build, ref_class, quad = MODELS["tanh"]
    model = build()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9)

    class Switch:  # a "scheduler" stepped after each optimizer step: momentum 0 for steps 2 and 3
        def __init__(self, optimizer):
            self.optimizer, self.count = optimizer, 0

        def step(self):
            self.count += 1
            self.optimizer.param_groups[0]["momentum"] = 0.0 if self.count in (2, 3) else 0.9

    traj, _, _ = record(model, opt, steps=5, schedule=Switch)
    update = traj.updates(2)["0.weight"]
    assert (update.a, update.b, update.q, update.n) == (1.0, 0.0, 0.0, 1.0) and torch.is_tensor(update.P)
    _, _, X_test = data()
    assert_exact(model, traj, X_test, ref_class, quad)  # the loop reference of the recorded coefficients
    att = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test)  # the pure update's three forms
    assert att.meta["replay_residual"] <= 1e-12
