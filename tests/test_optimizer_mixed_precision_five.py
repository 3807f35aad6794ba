"""RMSprop, Adagrad, NAdam, RAdam, Adamax and Adafactor (and SGD momentum and Adam, for comparison) on the dropout MLP
of tests/test_amp_dropout.py: float32, float16 autocast + ``torch.amp.GradScaler("cpu")``, and bfloat16 autocast,
float32 master weights.

Each run is held to the bounds of the SGD runs (tests/_real_loop_testkit.py, ``assert_autocast_run_exact``):
``keep=("train",)`` scores and the residual <= 1e-9 relative to the slow loop reference that replays the dropout
masks (tests/replay_reference.py), completeness <= 1e-12, replica <= 1e-6 relative to the trained model, the
gradient check at its tolerance. What differs is the residual share: the loop's gradients came from half-precision
activations while the engine recomputes them in float64, and an adaptive step divides each gradient entry by its
own running scale, so the rounding enters the update at the gradient's relative size where SGD scales it by the
learning rate. The shares measured (seeded, one thread) are pinned to within a factor 3: in float16 from 2.1e-4
(RAdam) to 6.7e-3 (RMSprop), SGD 3.2e-4 and Adam 9.6e-4; in bfloat16 from 2.5e-3 (RAdam) to 4.9e-2 (RMSprop), SGD
1.6e-3 and Adam 8.8e-3 (Adafactor: 5.8e-4 and 3.4e-3). The default ``residual_tol="auto"`` states every autocast
run's share in a warning naming autocast and its unit roundoff; above ``residual_tol=1e-3`` the estimators warn,
naming autocast first; in float32 without autocast every share is below 2e-6 and nothing warns.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from _real_loop_testkit import MLP_QUAD, assert_autocast_run_exact, autocast_figures, record_autocast_mlp

import explaind
from explaind.exceptions import ExplaindWarning

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS, BATCH = 8, 8
#: name -> (optimizer factory, measured residual share in float16, in bfloat16)
OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9), 3.17e-4, 1.59e-3),  # tests/test_amp_dropout.py's
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01), 9.57e-4, 8.77e-3),
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True), 6.65e-3, 4.92e-2),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01), 3.15e-3, 2.05e-2),
    "nadam": (lambda p: torch.optim.NAdam(p, lr=0.01), 1.58e-3, 9.46e-3),
    "radam": (lambda p: torch.optim.RAdam(p, lr=0.01), 2.09e-4, 2.50e-3),
    "adamax": (lambda p: torch.optim.Adamax(p, lr=0.02), 1.64e-3, 1.05e-2),
    "adafactor": (lambda p: torch.optim.Adafactor(p, lr=0.05), 5.82e-4, 3.38e-3),
}
ADAPTIVE = ["rmsprop", "adagrad", "nadam", "radam", "adamax", "adafactor"]


@functools.cache
def _run(name: str, precision: str):
    return record_autocast_mlp(precision, OPTIMIZERS[name][0], N_STEPS, BATCH)


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_autocast_runs_decompose_exactly_up_to_the_autocasts_rounding(name, precision):
    model, traj, X_test = _run(name, precision)
    assert traj.n_steps == N_STEPS and traj.manifest.adapter == name
    assert all(traj.grad_scale(s) == 1.0 for s in range(N_STEPS))  # the unscaled gradient, not 1024 x it
    if precision == "float16":
        assert [r.amp_scale for r in traj.manifest.steps] == [1024.0] * N_STEPS
    measured = OPTIMIZERS[name][1 if precision == "float16" else 2]
    assert_autocast_run_exact(model, traj, X_test, precision, share_range=(measured / 3, measured * 3))
    assert float(traj.audit().max()) <= 1e-4  # the recorded coefficients reproduce the float32 steps


@pytest.mark.parametrize("name", ADAPTIVE)
def test_float32_runs_are_exact_at_float32_level_and_nothing_warns(name):
    model, traj, X_test = _run(name, "float32")
    got = autocast_figures(model, traj, X_test, "float32")
    assert got["train"] <= 1e-9 and got["ref_quad"] <= 1e-12 and got["completeness"] <= 1e-12
    assert got["replica"] <= 1e-6 and got["check"] <= 1e-5 and got["residual_share"] <= 2e-6
    # the residual is float32 rounding, about 1e-6 of the change: its own relative error is larger (measured
    # 2.9e-10 to 1.6e-9), about 1e-15 of the change
    assert got["residual"] <= 1e-8
    assert float(traj.audit().max()) <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **MLP_QUAD).fit(traj).transform(X_test)
    assert att.meta["residual_share"] == got["residual_share"]


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ADAPTIVE)
def test_the_residual_share_warns_exactly_above_the_tolerance_naming_autocast(name, precision):
    _, traj, X_test = _run(name, precision)
    share = OPTIMIZERS[name][1 if precision == "float16" else 2]
    # the default residual_tol="auto" states every autocast run's share with its expected order
    with pytest.warns(ExplaindWarning, match=rf"residual share .* > residual_tol=[0-9.e-]+ \(auto: shares stated for a "
                                             rf"run recorded under torch.autocast\({precision}\)\).*unit roundoff"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu", **MLP_QUAD).fit(traj).transform(X_test)
    estimator = explaind.InfluenceEstimator(keep=("train",), device="cpu", residual_tol=1e-3, **MLP_QUAD).fit(traj)
    if share > 1e-3:
        with pytest.warns(ExplaindWarning, match=rf"residual share .* > residual_tol=0.001.*Likely causes: \(1\) the "
                                                 rf"loop's forward ran under torch.autocast \({precision}\).*"
                                                 rf"residual_tol"):
            estimator.transform(X_test)
    else:  # RAdam and Adafactor under float16 only (2.1e-4, 5.8e-4)
        assert (name, precision) in {("radam", "float16"), ("adafactor", "float16")}
        with warnings.catch_warnings():
            warnings.simplefilter("error", ExplaindWarning)
            estimator.transform(X_test)
    with warnings.catch_warnings():  # a tolerance above the share: silent
        warnings.simplefilter("error", ExplaindWarning)
        explaind.InfluenceEstimator(keep=("train",), device="cpu", residual_tol=share * 10, **MLP_QUAD).fit(
            traj).transform(X_test)
