"""KernelReplica: the path-kernel replica against the trained model, quadrature rules, API conventions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from engine_testkit import engine_run, rel
from sklearn.base import clone
from torch.func import functional_call

import explaind
from explaind.exceptions import ConfigError, NotFittedError
from explaind.kernel.autograd import AutogradEvaluator
from explaind.kernel.layers import LayerEvaluator


def _model_at(run, s: int, X: torch.Tensor) -> torch.Tensor:
    traj = run.trajectory
    with torch.no_grad():
        return functional_call(traj.model, {**traj.constants(), **traj.params(s)}, (X,))


def test_tanh_gauss_legendre_float64_matches_the_trained_model():
    run = engine_run("tanh", "sgd")
    pred = explaind.KernelReplica(quadrature="gauss-legendre", nodes=4, device="cpu").fit(run.trajectory).predict(
        run.X_test)
    want = run.model(run.X_test).detach()
    assert pred.shape == (4, 3) and isinstance(pred, np.ndarray)
    assert rel(pred, want) <= 1e-10


def test_tanh_gauss_legendre_float32_replica():
    run = engine_run("tanh", "adamw", dtype="float32")
    rep = explaind.KernelReplica(quadrature="gauss-legendre", dtype="float32", device="cpu").fit(run.trajectory)
    pred = rep.predict(run.X_test)
    assert pred.dtype == np.float32
    assert rel(pred, run.model(run.X_test).detach()) <= 1e-6


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam", "adamw"])
def test_relu_adaptive_replica_is_tight(optimizer):
    run = engine_run("relu", optimizer)
    rep = explaind.KernelReplica(device="cpu").fit(run.trajectory)
    assert rel(rep.predict(run.X_test), run.model(run.X_test).detach()) <= 1e-6


def test_adaptive_beats_midpoint_tenfold_at_equal_cost():
    run = engine_run("relu", "sgd", steps=8, hidden=16)
    ada = explaind.KernelReplica(device="cpu").fit(run.trajectory).fidelity_report(run.X_test)
    n = max(1, int(round(float(ada["evals_per_step"].mean()))))
    mid = explaind.KernelReplica(quadrature="midpoint", nodes=n, device="cpu").fit(run.trajectory).fidelity_report(
        run.X_test)
    assert mid["evals_per_step"].mean() >= ada["evals_per_step"].mean() - 0.5
    assert ada["max_abs_error"] * 10 <= mid["max_abs_error"], (ada["max_abs_error"], mid["max_abs_error"], n)


def test_step_window_starts_and_ends_at_the_window():
    run = engine_run("tanh", "adamw")
    rep = explaind.KernelReplica(steps=(2, 5), quadrature="gauss-legendre", device="cpu").fit(run.trajectory)
    assert rep.window_ == (2, 5)
    assert rel(rep.predict(run.X_test), _model_at(run, 5, run.X_test)) <= 1e-10
    assert explaind.KernelReplica(steps=(3, None), device="cpu").fit(run.trajectory).window_ == (3, 6)


def test_predict_uses_forward_mode_only(monkeypatch):
    """No per-sample gradient and no Jacobian is formed by predict."""

    def forbidden(*args, **kwargs):
        raise AssertionError("predict must not call this")

    for evaluator in (AutogradEvaluator, LayerEvaluator):
        monkeypatch.setattr(evaluator, "sample_grads", forbidden)
        monkeypatch.setattr(evaluator, "jacobian", forbidden)
    run = engine_run("relu", "sgd")
    for quadrature in ("adaptive", "gauss-legendre", "midpoint"):
        explaind.KernelReplica(quadrature=quadrature, device="cpu").fit(run.trajectory).predict(run.X_test)


def test_score_and_fidelity_report():
    run = engine_run("relu", "adam")
    rep = explaind.KernelReplica(device="cpu").fit(run.trajectory)
    assert rep.score(run.X_test) == 1.0
    model_acc = float((run.model(run.X_test).argmax(-1) == run.y_test).double().mean())
    assert rep.score(run.X_test, run.y_test) == pytest.approx(model_acc)
    report = rep.fidelity_report(run.X_test)
    assert set(report) >= {"steps", "quadrature_error", "relative_quadrature_error", "evals_per_step", "total_evals",
                           "max_abs_error", "max_rel_error", "argmax_agreement", "kl_divergence"}
    assert report["quadrature_error"].shape == report["evals_per_step"].shape == (6,)
    assert report["steps"].tolist() == list(range(6))
    assert np.all(report["relative_quadrature_error"] <= 2e-7)
    assert report["argmax_agreement"] == 1.0 and 0 <= report["kl_divergence"] < 1e-10
    assert report["total_evals"] >= 4 * 6 * 4


def test_deepcopy_and_clone():
    run = engine_run("tanh", "sgd")
    rep = explaind.KernelReplica(quadrature="gauss-legendre", device="cpu").fit(run.trajectory)
    before = rep.predict(run.X_test)
    again = copy.deepcopy(rep)
    np.testing.assert_array_equal(again.predict(run.X_test), before)
    fresh = clone(rep)
    assert fresh.get_params() == rep.get_params() and not hasattr(fresh, "n_steps_")


def test_not_fitted():
    with pytest.raises(NotFittedError, match="not fitted"):
        explaind.KernelReplica().predict(torch.zeros(1, 3))


@pytest.mark.parametrize("params, field, hint", [
    ({"quadrature": "simpson"}, "quadrature", "gauss-legendre"),
    ({"tol": 0.0}, "tol", "greater than 0"),
    ({"nodes": 0}, "nodes", "greater than or equal to 1"),
    ({"dtype": "float16"}, "dtype", "float64"),
    ({"chunk_size": 0}, "chunk_size", "greater than or equal to 1"),
    ({"steps": (4, 2)}, "steps", "0 <= start < stop <= n_steps = 6"),
    ({"steps": (0, 9)}, "steps", "n_steps = 6"),
    ({"device": "tpu"}, "device", "'cpu'"),
])
def test_bad_parameters_name_the_field(params, field, hint):
    run = engine_run("tanh", "sgd")
    with pytest.raises(ConfigError) as info:
        explaind.KernelReplica(**params).fit(run.trajectory)
    msg = str(info.value)
    assert f"'{field}'" in msg and hint in msg and "KernelReplica" in msg


def test_fit_needs_a_trajectory():
    with pytest.raises(ConfigError, match="expects an explaind.Trajectory"):
        explaind.KernelReplica().fit(np.zeros(3))


def test_a_capped_adaptive_rule_warns_with_the_error_left(monkeypatch):
    import explaind.kernel.adaptive as adaptive
    from explaind.exceptions import ExplaindWarning

    run = engine_run("relu", "sgd")
    monkeypatch.setattr(adaptive, "MAX_EVALS", 6)  # a cap the ReLU paths of this run exceed
    with pytest.warns(ExplaindWarning, match=r"relative error up to .* stopped at the cap of about 6 evaluations"):
        rep = explaind.KernelReplica(tol=1e-12, device="cpu").fit(run.trajectory)
        report = rep.fidelity_report(run.X_test)
    assert report["relative_quadrature_error"].max() > 1e-12  # the error left is reported, not hidden
