"""Self-checks of the slow reference (tests/reference.py) before it is used to judge the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_compare import TARGET, reference_for
from engine_fixtures import OPTIMIZERS, recorded_run
from reference import Reference, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(activation: str, optimizer: str) -> Reference:
    return reference_for(activation, optimizer)


CASES = [(a, o) for a in ("tanh", "relu") for o in OPTIMIZERS]


def test_jacobian_matches_central_differences():
    run = recorded_run("tanh", "adamw_steplr")
    ref = reference("tanh", "adamw_steplr")
    theta = ref.theta[3]
    for xi in range(2):
        J = ref.jacobian(theta, xi)
        h = 1e-6
        fd = torch.zeros_like(J)
        with torch.no_grad():
            for p in range(ref.D):
                e = torch.zeros(ref.D, dtype=torch.float64)
                e[p] = h
                fd[:, p] = (ref.forward(theta + e, xi) - ref.forward(theta - e, xi)) / (2 * h)
        assert rel_err(J, fd) < 1e-8
    assert run.trajectory.n_steps == ref.N


@pytest.mark.parametrize("activation, optimizer", CASES)
def test_reference_quadrature_is_exact(activation, optimizer):
    """Telescoping holds for the reference's features to rounding: (f(s+1) - f(s)) == phi_s Delta theta_s."""
    ref = reference(activation, optimizer)
    scale = float(ref.values_at.abs().max())
    assert float(ref.quad_error.abs().max()) < 1e-13 * scale
    if activation == "relu":
        # the ReLU runs really cross kinks (pieces add nodes), otherwise this check would prove nothing
        assert ref.n_nodes.max() > ref.n_nodes.min()


def test_relu_runs_cross_kinks():
    for o in OPTIMIZERS:
        ref = reference("relu", o)
        total = sum(len(ref.kinks(s, xi)) for s in range(ref.N) for xi in range(ref.X.shape[0]))
        assert total >= 5, o


@pytest.mark.parametrize("activation, optimizer", CASES)
def test_reference_residual_vanishes(activation, optimizer):
    """The unrolled data + regularization parts rebuild every recorded update (faithful coefficients)."""
    ref = reference(activation, optimizer)
    for s in range(ref.N):
        assert float(ref.E[s].norm()) <= 1e-11 * float(ref.delta[s].norm()), s


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_unrolled_atoms_match_a_forward_simulation(optimizer):
    """Per-sample momentum buffers carried forward step by step give the same D_{s,k}."""
    ref = reference("tanh", optimizer)
    m = torch.zeros(ref.K, ref.D, dtype=torch.float64)
    m_reg = torch.zeros(ref.D, dtype=torch.float64)
    for s in range(ref.N):
        c = ref.coef[s]
        m = c["a"] * m + c["b"] * ref.G[s]
        u_reg = c["lambda_c"] * ref.theta[s]
        m_reg = c["a"] * m_reg + c["b"] * u_reg
        D = -c["P"] * (c["q"] * m + c["n"] * ref.G[s])
        R = -c["P"] * (c["q"] * m_reg + c["n"] * u_reg) - c["lambda_d"] * ref.theta[s]
        assert rel_err(ref.Dk[s], D) < 1e-13
        assert float((ref.R[s] - R).abs().max()) <= 1e-13 * max(float(R.abs().max()), 1e-300)


@pytest.mark.parametrize("keep", [(), ("train",), ("step",), ("group",), ("param",), ("step", "group", "train"),
                                  ("train", "param", "step")])
@pytest.mark.parametrize("steps", [None, (2, 6)])
def test_reference_completeness(keep, steps):
    ref = reference("relu", "sgd_nesterov_wd")
    vals = ref.kept(keep, steps)
    assert vals.shape[0] == 6 and vals.shape[-1] == 3
    inner = tuple(range(1, vals.ndim - 1))
    reg = ref.regularization(keep, steps)
    res = ref.residual(keep, steps)
    quad = ref.quadrature(keep, steps)
    total = (ref.initial(steps) + vals.sum(axis=inner) + reg.sum(axis=tuple(range(1, reg.ndim - 1)))
             + res.sum(axis=tuple(range(1, res.ndim - 1))) + quad.sum(axis=tuple(range(1, quad.ndim - 1))))
    assert rel_err(total, ref.final(steps)) < 1e-13
    # a kept axis really splits: the step axis has one entry per step of the window
    if "step" in keep:
        assert vals.shape[1 + keep.index("step")] == (8 if steps is None else 4)


def test_reference_targets_are_consistent():
    run = recorded_run("relu", "adam_l2_amsgrad")
    full = reference("relu", "adam_l2_amsgrad")
    target = TARGET
    picked = reference_for("relu", "adam_l2_amsgrad", "index")
    want = full.kept(("step", "train"))[np.arange(6), ..., target][..., None]
    assert rel_err(picked.kept(("step", "train")), want) < 1e-13
    lossref = reference_for("relu", "adam_l2_amsgrad", "loss")
    with torch.no_grad():
        logits = torch.stack([full.forward(full.theta[-1], xi) for xi in range(6)])
        loss = torch.nn.functional.cross_entropy(logits, run.y_test, reduction="none")
    assert rel_err(lossref.final()[:, 0], loss.numpy()) < 1e-14
    assert rel_err(lossref.replica(), lossref.final()) < 1e-13
