"""Models whose backward is not the derivative of their forward (a gradient reversal layer, DANN): forward-mode
Jacobians (explaind/kernel/adjoint.py, docs/engine.md §3).

A custom ``torch.autograd.Function`` whose backward is ``-g`` (its ``jvp`` the identity's), or the same reversal by
``Tensor.register_hook(lambda g: -g)``: the dot-product test finds the backward apart from the jvp, the engine takes
its Jacobians by ``torch.func.jacfwd`` and says so in a log line, and ``keep=("param",)`` and ``("train",)`` agree with
the slow reference whose Jacobians are ``torch.func.jvp`` columns (each test failed before: the reverse-mode
Jacobians followed the reversed backward and left 52 % of the change in ``quadrature_error``).
``CounterfactualEstimator`` takes its test gradients and curvature terms in forward mode too and says so in a log
line (its values are checked against retraining in tests/test_gaps_round14.py). A Function whose backward is the
derivative of its forward keeps reverse mode.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from _round5_kit import N_TRAIN, QUAD, XV, fit
from _round9_cases import YD
from _round9_functions import GradientReversal, HookReversal, _ReverseGrad, dann_loss
from reference import rel_err
from replay_reference import ForwardJacobianReference
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.kernel.adjoint import backward_mismatch

pytestmark = pytest.mark.usefixtures("one_thread")

X_TEST = XV[N_TRAIN:]


def _explain(traj, keep):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        est = explaind.InfluenceEstimator(keep=keep, **QUAD).fit(traj)
        return est, est.transform(X_TEST)


@pytest.mark.parametrize("build", [GradientReversal, HookReversal], ids=["function", "hook"])
def test_param_scores_take_forward_mode_jacobians_and_match_the_jvp_reference(build, caplog):
    model, traj = fit(build, XV, YD, loss=dann_loss)
    with caplog.at_level(logging.WARNING, logger="explaind.kernel.engine"):
        est, att = _explain(traj, ("param",))
    assert any("backward is not the derivative of its forward" in r.message and "torch.func.jacfwd" in r.message
               for r in caplog.records), caplog.text
    assert est.engine_.forward_jacobians and est.sweep_["path"] == "jacobian", est.sweep_
    expected = ForwardJacobianReference(traj, X_TEST, panels=2).kept(("param",))
    assert rel_err(np.asarray(att.values).reshape(expected.shape), expected) <= 1e-9
    assert att.meta["quadrature_share"] <= 1e-9, att.meta
    with torch.no_grad():
        truth = model.eval()(X_TEST).numpy()
    assert rel_err(np.asarray(att.total()), truth) <= 1e-9


def test_step_and_train_together_add_up_to_the_trained_model():
    model, traj = fit(GradientReversal, XV, YD, loss=dann_loss)
    _, att = _explain(traj, ("step", "train"))
    with torch.no_grad():
        truth = model.eval()(X_TEST).numpy()
    assert att.meta["quadrature_share"] <= 1e-9 and rel_err(np.asarray(att.total()), truth) <= 1e-9, att.meta


def test_the_counterfactual_says_it_takes_forward_mode_naming_the_function(caplog):
    _, traj = fit(GradientReversal, XV, YD, loss=dann_loss)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="explaind.estimators.counterfactual"):
        warnings.simplefilter("error", ExplaindWarning)
        explaind.CounterfactualEstimator().fit(traj).transform(X_TEST)
    assert any("CounterfactualEstimator: the model's backward is not the derivative of its forward" in r.message
               and "_ReverseGrad.forward" in r.message and "torch.func.jacfwd" in r.message
               for r in caplog.records), caplog.text


class _Identity(_ReverseGrad):
    """The identity with its own backward and jvp, both the derivative of its forward."""

    @staticmethod
    def backward(ctx, g):
        return g


class _Honest(GradientReversal):
    def forward(self, x):
        h = torch.tanh(self.f(x))
        return torch.cat([self.c(h), self.d(_Identity.apply(h))], 1)


def test_a_function_whose_backward_is_the_derivative_keeps_reverse_mode():
    _, traj = fit(_Honest, XV, YD, loss=dann_loss)
    est, att = _explain(traj, ("train",))
    assert est.engine_.forward_jacobians == () and not est.engine_.evaluator.__dict__.get("forward_jacobians"), est
    assert att.meta["quadrature_share"] <= 1e-9, att.meta


def test_the_dot_product_test_is_rounding_on_a_plain_model_and_order_one_on_a_reversal():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    point = dict(mlp.named_parameters())
    x = XV[:2]
    assert backward_mismatch(lambda p: torch.func.functional_call(mlp, p, (x,)), point, list(point)) <= 1e-14
    torch.manual_seed(0)
    dann = GradientReversal().double()
    point = dict(dann.named_parameters())
    assert backward_mismatch(lambda p: torch.func.functional_call(dann, p, (x,)), point, list(point)) >= 0.1
