"""InfluenceEstimator against the slow float64 reference (tests/reference.py).

Every kept-axes combination is compared term by term (values, regularization, residual) with the
reference's atoms summed to the same axes, and every result is checked for completeness against
the explained quantity at the end of the window, computed by the reference's forward passes.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_compare import (
    DEVICE,
    WINDOW,
    as_numpy,
    completeness_total,
    reference_for,
    reference_terms,
    target_value,
)
from engine_fixtures import OPTIMIZERS, recorded_run
from reference import rel_err

import explaind

KEEPS = [("train",), ("step",), ("group",), ("param",), ("step", "group", "train")]
KEEP_IDS = ["+".join(k) for k in KEEPS]

pytestmark = pytest.mark.usefixtures("one_thread")


def _estimator(activation: str, **kw) -> explaind.InfluenceEstimator:
    """GL-8 on the smooth net (converged to rounding), the error-controlled rule at tolerance 1e-11 on the
    ReLU net (so the quadrature error stays well below the 1e-9 comparisons)."""
    if activation == "tanh":
        kw = {"quadrature": "gauss-legendre", "nodes": 8, **kw}
    else:
        kw = {"quadrature": "adaptive", "tol": 1e-11, **kw}
    return explaind.InfluenceEstimator(device=DEVICE, **kw)


def _close(got: np.ndarray, want: np.ndarray, scale: float, rtol: float) -> float:
    """``||got - want|| / (||want|| + scale)``: relative, with ``scale`` guarding near-zero terms."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.linalg.norm(got - want) / (np.linalg.norm(want) + scale))
    assert err <= rtol, err
    return err


def _check_against_reference(att, ref, keep, steps, rtol=1e-9):
    assert tuple(att.axes) == ("test", *keep, "output")
    want = reference_terms(ref, att, steps)
    got_values = as_numpy(att.values)
    scale = 1e-3 * float(np.linalg.norm(want["values"]))
    assert rel_err(got_values, want["values"]) <= rtol
    for term in ("regularization", "residual"):
        _close(as_numpy(getattr(att, term)), want[term], scale, rtol)
    np.testing.assert_allclose(as_numpy(att.initial), ref.initial(steps), rtol=1e-12, atol=1e-14)
    assert rel_err(completeness_total(att), ref.final(steps)) <= 1e-10
    assert rel_err(as_numpy(att.total()), ref.final(steps)) <= 1e-10


@pytest.mark.parametrize("keep", KEEPS, ids=KEEP_IDS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_values_match_reference(activation, optimizer, keep):
    run = recorded_run(activation, optimizer)
    ref = reference_for(activation, optimizer)
    att = _estimator(activation, keep=keep).fit(run.trajectory).transform(run.X_test)
    _check_against_reference(att, ref, keep, None)


def test_regularization_is_really_exercised():
    """The weight-decay runs have a regularization term well above rounding (else the checks prove nothing)."""
    for optimizer in ("sgd_nesterov_wd", "adam_l2_amsgrad", "adamw_steplr"):
        ref = reference_for("relu", optimizer)
        reg = ref.regularization(("step",))
        assert np.abs(reg).max() > 1e-4 * np.abs(ref.kept(("step",))).max(), optimizer
    assert np.abs(reference_for("relu", "sgd_momentum").regularization(())).max() == 0.0


def test_axis_order_follows_keep():
    run = recorded_run("tanh", "sgd_nesterov_wd")
    ref = reference_for("tanh", "sgd_nesterov_wd")
    keep = ("train", "param", "step")
    att = _estimator("tanh", keep=keep, momentum="forward").fit(run.trajectory).transform(run.X_test)
    assert as_numpy(att.values).shape == (6, 12, 38, 8, 3)
    _check_against_reference(att, ref, keep, None)
    np.testing.assert_array_equal(np.asarray(att.coords["step"]), np.arange(8))
    np.testing.assert_array_equal(np.asarray(att.coords["train"]), np.arange(12))


MOMENTUM_CASES = [(o, ("train",)) for o in OPTIMIZERS] + [("adam_l2_amsgrad", ("param", "train")),
                                                             ("sgd_nesterov_wd", ("group", "train"))]


@pytest.mark.parametrize("optimizer, keep", MOMENTUM_CASES, ids=[f"{o}-{'+'.join(k)}" for o, k in MOMENTUM_CASES])
def test_forward_and_reverse_momentum_agree(optimizer, keep):
    run = recorded_run("tanh", optimizer)
    ref = reference_for("tanh", optimizer)
    results = {}
    for mode in ("forward", "reverse"):
        est = _estimator("tanh", keep=keep, momentum=mode).fit(run.trajectory)
        results[mode] = est.transform(run.X_test)
        assert est.sweep_["momentum"] == mode
        _check_against_reference(results[mode], ref, keep, None)
    assert rel_err(as_numpy(results["reverse"].values), as_numpy(results["forward"].values)) <= 1e-12


TARGET_WINDOW = [(t, w) for t in ("none", "index", "loss") for w in (None, WINDOW)]
TW_IDS = [f"{t}-{'all' if w is None else 'window'}" for t, w in TARGET_WINDOW]


@pytest.mark.parametrize("target_kind, steps", [tw for tw in TARGET_WINDOW if tw != ("none", None)], ids=TW_IDS[1:])
@pytest.mark.parametrize("keep", KEEPS, ids=KEEP_IDS)
def test_targets_and_windows_match_reference(keep, target_kind, steps):
    """Targets and windows on the smooth net (GL-8 is exact there, so any mismatch is the engine's); each
    result is also checked for completeness to 1e-10."""
    run = recorded_run("tanh", "adam_l2_amsgrad")
    ref = reference_for("tanh", "adam_l2_amsgrad", target_kind)
    est = _estimator("tanh", keep=keep, target=target_value(target_kind), steps=steps).fit(run.trajectory)
    att = est.transform(run.X_test, run.y_test if target_kind == "loss" else None)
    _check_against_reference(att, ref, keep, steps)
    if steps is not None and "step" in keep:
        np.testing.assert_array_equal(np.asarray(att.coords["step"]), np.arange(*steps))


RELU_COMPLETENESS = [(("train",), "loss", WINDOW), (("param",), "index", None), (("step", "group", "train"), "none",
                                                                                  WINDOW), (("group",), "loss", None)]


@pytest.mark.parametrize("keep, target_kind, steps", RELU_COMPLETENESS)
def test_completeness_relu_default_rule(keep, target_kind, steps):
    """Default settings on the ReLU net: the terms add up to g(x; theta_stop) to rounding."""
    run = recorded_run("relu", "adam_l2_amsgrad")
    ref = reference_for("relu", "adam_l2_amsgrad", target_kind)
    est = explaind.InfluenceEstimator(keep=keep, target=target_value(target_kind), steps=steps, device=DEVICE)
    att = est.fit(run.trajectory).transform(run.X_test, run.y_test if target_kind == "loss" else None)
    assert rel_err(completeness_total(att), ref.final(steps)) <= 1e-10
    assert rel_err(as_numpy(att.initial), ref.initial(steps)) <= 1e-13
    assert rel_err(as_numpy(att.values), reference_terms(ref, att, steps)["values"]) <= 1e-5


FLOAT32_CASES = [(k, t, WINDOW if (i + j) % 2 else None) for i, k in enumerate(KEEPS)
                 for j, t in enumerate(("none", "index", "loss"))]


@pytest.mark.parametrize("keep, target_kind, steps", FLOAT32_CASES,
                         ids=[f"{'+'.join(k)}-{t}-{'window' if w else 'all'}" for k, t, w in FLOAT32_CASES])
def test_completeness_float32(keep, target_kind, steps):
    """float32 on every keep x target (windows alternating): completeness to 1e-5, scores close to exact."""
    run = recorded_run("tanh", "sgd_nesterov_wd")
    ref = reference_for("tanh", "sgd_nesterov_wd", target_kind)
    est = _estimator("tanh", keep=keep, target=target_value(target_kind), steps=steps, dtype="float32")
    att = est.fit(run.trajectory).transform(run.X_test, run.y_test if target_kind == "loss" else None)
    assert att.values.dtype.is_floating_point and att.values.element_size() == 4
    assert rel_err(completeness_total(att), ref.final(steps)) <= 1e-5
    want = reference_terms(ref, att, steps)["values"]
    assert rel_err(as_numpy(att.values), want) <= 1e-5


def test_default_rule_completeness_and_small_quadrature_error():
    """Default settings (adaptive, tol 1e-7): completeness to rounding, quadrature error within tolerance."""
    run = recorded_run("relu", "sgd_momentum")
    ref = reference_for("relu", "sgd_momentum")
    att = explaind.InfluenceEstimator(keep=("step", "train"), device=DEVICE).fit(run.trajectory).transform(
        run.X_test)
    assert rel_err(completeness_total(att), ref.final()) <= 1e-10
    quad = as_numpy(att.quadrature_error)
    assert quad.shape == (6, 8, 3)
    exact_steps = np.moveaxis((ref.values_at[1:] - ref.values_at[:-1]).numpy(), 0, 1)
    assert np.abs(quad).max() <= 4e-7 * np.abs(exact_steps).max()
    # the quadrature error per step is (f(s+1) - f(s)) - [sum of every other term of that step]
    per_step = as_numpy(att.values).sum(2) + as_numpy(att.regularization) + as_numpy(att.residual)
    np.testing.assert_allclose(per_step + quad, exact_steps, rtol=0, atol=1e-13)


def test_sum_and_conversions():
    run = recorded_run("tanh", "adamw_steplr")
    att = _estimator("tanh", keep=("step", "group", "train")).fit(run.trajectory).transform(run.X_test)
    ref = reference_for("tanh", "adamw_steplr")
    summed = att.sum(["step", "train"])
    assert tuple(summed.axes) == ("test", "group", "output")
    assert rel_err(as_numpy(summed.values), ref.kept(("group",))) <= 1e-9
    assert rel_err(as_numpy(att.sum("group").values), ref.kept(("step", "train"))) <= 1e-9
    assert isinstance(att.numpy(), np.ndarray)
    np.testing.assert_array_equal(att.numpy(), as_numpy(att.torch()))
    assert rel_err(as_numpy(summed.total()), ref.final()) <= 1e-10
