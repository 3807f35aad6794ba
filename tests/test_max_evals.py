"""``max_evals=`` on KernelReplica and InfluenceEstimator: the adaptive rule's cap per (step, input) pair.

A path that crosses more kinks than the default cap locates to ``tol`` stops with its error left and a warning; the
warning names this parameter as a fix, and the parameter is the cap the rule applies (the same plans as the module
constant set to the same value), with the error falling as the cap rises. Before: the cap was the module constant
``explaind.kernel.adaptive.MAX_EVALS`` only, and the warning named no way to raise it.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from engine_testkit import engine_run

import explaind
import explaind.kernel.adaptive as adaptive
from explaind.exceptions import ConfigError, ExplaindWarning


@pytest.fixture(scope="module")
def relu_run():
    return engine_run("relu", "sgd")


def _report(run, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rep = explaind.KernelReplica(tol=1e-12, device="cpu", **kw).fit(run.trajectory)
        report = rep.fidelity_report(run.X_test)
    return report, [str(w.message) for w in seen if issubclass(w.category, ExplaindWarning)]


def test_the_parameter_is_the_cap_and_the_warning_names_it(relu_run):
    report, seen = _report(relu_run, max_evals=6)
    capped = [m for m in seen if "stopped at the cap of about 6 evaluations" in m]
    assert capped, seen
    assert "max_evals=24 on KernelReplica or InfluenceEstimator" in capped[0]
    assert adaptive.MAX_EVALS == 4096  # the module's default is left as it was
    assert report["relative_quadrature_error"].max() > 1e-12  # the error left is reported


def test_the_parameter_plans_as_the_module_constant_does(relu_run, monkeypatch):
    by_param, _ = _report(relu_run, max_evals=10)
    monkeypatch.setattr(adaptive, "MAX_EVALS", 10)
    by_constant, _ = _report(relu_run)
    for key in ("quadrature_error", "evals_per_step"):
        assert torch.equal(torch.as_tensor(by_param[key]), torch.as_tensor(by_constant[key])), key
    assert by_param["max_abs_error"] == by_constant["max_abs_error"]


def test_a_higher_cap_leaves_less_error(relu_run):
    low, _ = _report(relu_run, max_evals=6)
    high, seen = _report(relu_run, max_evals=400)
    assert high["relative_quadrature_error"].max() < low["relative_quadrature_error"].max() / 10
    assert not any("cap of about 6 " in m for m in seen)


def test_influence_takes_the_same_cap(relu_run):
    est = explaind.InfluenceEstimator(keep=("step",), tol=1e-12, device="cpu", max_evals=6)
    with pytest.warns(ExplaindWarning, match=r"cap of about 6 evaluations.*max_evals=24"):
        est.fit(relu_run.trajectory).transform(relu_run.X_test[:2])
    assert est.get_params()["max_evals"] == 6


@pytest.mark.parametrize("bad", [0, -3, "many", 2.5])
@pytest.mark.parametrize("cls", [explaind.KernelReplica, explaind.InfluenceEstimator])
def test_a_cap_that_is_not_a_positive_integer_is_refused_naming_it(relu_run, cls, bad):
    with pytest.raises(ConfigError, match="max_evals"):
        cls(max_evals=bad).fit(relu_run.trajectory)
