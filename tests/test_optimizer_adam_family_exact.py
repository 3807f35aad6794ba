"""NAdam, RAdam and Adamax runs decompose exactly: a ReLU MLP and a dropout MLP recorded with each option set.

For each run (float64): the reference's own coefficients, derived from the maths in tests/_adam_family_kit.py,
reproduce torch's steps to rounding (its residual E_s); the replica matches the trained model to 1e-6; the
residual share is at most 1e-9; ``keep=("train",)`` matches the reference to 1e-9.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _adam_family_kit import CoefficientReference, Setup, data, dropout_mlp, record, relu_mlp
from engine_compare import as_numpy, reference_terms
from reference import rel_err

import explaind
from explaind.exceptions import ExplaindWarning

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 7  # RAdam with beta2 = 0.999: steps 1-5 are momentum steps (rho_t <= 5), 6-7 rectified
RELU_QUAD = {"quadrature": "adaptive", "tol": 1e-11}
SMOOTH_QUAD = {"quadrature": "gauss-legendre", "nodes": 8}

CASES = {
    "nadam_l2_momentum_decay_relu": (Setup("nadam", lr=0.05, weight_decay=0.1, momentum_decay=0.02), relu_mlp),
    "nadam_decoupled_maximize_dropout": (Setup("nadam", lr=0.05, weight_decay=0.5, decoupled=True, maximize=True),
                                         dropout_mlp),
    "nadam_foreach_relu": (Setup("nadam", lr=0.05, weight_decay=0.1, foreach=True, betas=(0.8, 0.9)), relu_mlp),
    "radam_l2_relu": (Setup("radam", lr=0.2, weight_decay=0.1), relu_mlp),
    "radam_decoupled_maximize_dropout": (Setup("radam", lr=0.2, weight_decay=0.5, decoupled=True, maximize=True),
                                         dropout_mlp),
    "radam_foreach_relu": (Setup("radam", lr=0.2, weight_decay=0.1, foreach=True), relu_mlp),
    "adamax_l2_relu": (Setup("adamax", lr=0.05, weight_decay=0.1, betas=(0.9, 0.8)), relu_mlp),
    "adamax_maximize_dropout": (Setup("adamax", lr=0.05, weight_decay=0.1, maximize=True), dropout_mlp),
    "adamax_foreach_relu": (Setup("adamax", lr=0.05, foreach=True, eps=1e-3), relu_mlp),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_run_decomposes_exactly_against_the_coefficient_reference(case):
    setup, make = CASES[case]
    X, y = data()
    model = make()
    rec, _ = record(model, setup, X[:20], y[:20], STEPS)
    traj, X_test = rec.trajectory, X[20:]
    assert traj.manifest.adapter == setup.kind
    assert float(traj.audit().max()) <= 1e-12
    quad = RELU_QUAD if make is relu_mlp else SMOOTH_QUAD
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # no residual or quadrature warning
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **quad).fit(traj).transform(X_test)
    ref = CoefficientReference(traj, X_test, setup)
    steps = torch.stack(ref.delta).norm(dim=1)
    assert float((ref.E.norm(dim=1) / steps).max()) <= 1e-12  # the maths reproduces torch's steps
    want = reference_terms(ref, att)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert att.meta["residual_share"] <= 1e-9
    with torch.no_grad():
        trained = model(X_test)
    assert rel_err(as_numpy(explaind.KernelReplica(device="cpu", **quad).fit(traj).predict(X_test)),
                   as_numpy(trained)) <= 1e-6
    assert rel_err(as_numpy(att.total()), as_numpy(trained)) <= 1e-6


def test_radam_switches_from_momentum_steps_to_rectified_ones():
    """Steps with rho_t <= 5 record a scalar P = lr / (1 - beta1^t); the later ones a tensor."""
    X, y = data()
    rec, _ = record(relu_mlp(), Setup("radam", lr=0.2), X[:20], y[:20], STEPS)
    kinds = [isinstance(rec.trajectory.updates(s)["0.weight"].P, torch.Tensor) for s in range(STEPS)]
    assert kinds == [False] * 5 + [True] * 2
    assert float(rec.trajectory.updates(0)["0.weight"].P) == pytest.approx(0.2 / (1 - 0.9), rel=1e-15)


def test_nadam_mu_product_of_the_reference_is_torchs():
    """The reference rounds mu_product as torch stores it: the product matches torch's state bit for bit."""
    X, y = data()
    setup = Setup("nadam", momentum_decay=0.02)
    _, optimizer = record(relu_mlp(), setup, X[:20], y[:20], 4)
    from _adam_family_kit import _torch_scalar

    expected = 1.0
    for t in range(1, 5):
        expected = _torch_scalar(expected * _torch_scalar(0.9 * (1 - 0.5 * 0.96 ** (t * 0.02))))
    got = {float(state["mu_product"]) for state in optimizer.state.values()}
    assert got == {expected}
    assert np.isfinite(expected)
