"""A dropout MLP trained under float16 autocast + GradScaler and under bfloat16 autocast, fp32 master weights.

What is exact and what is not: the recorded parameters are the fp32 master weights and the masks are replayed
from the captured random states (CPU masks do not depend on the dtype, autocast included), so the engine's
float64 split of each recorded update into per-sample gradients matches the slow replaying loop reference
(tests/replay_reference.py) to rounding, and the replica is the trained model. The loop's gradients were
computed from half-precision activations while both recompute them in float64: the difference is the
residual, at autocast rounding (measured 1.9e-4 under float16, 1.3e-3 under bfloat16), against 3.6e-8 for the
same loop in float32 without autocast. The checks are shared with the Lightning and Trainer runs of
tests/test_integrations_amp.py (tests/_real_loop_testkit.py).
"""

from __future__ import annotations

import warnings

import pytest
from _real_loop_testkit import MLP_QUAD, assert_autocast_run_exact, mlp_optimizer, record_autocast_mlp

import explaind
from explaind.exceptions import ExplaindWarning

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS, BATCH = 6, 8


def record(precision: str):
    """The documented recipe with SGD momentum (tests/_real_loop_testkit.py, ``record_autocast_mlp``)."""
    return record_autocast_mlp(precision, mlp_optimizer, N_STEPS, BATCH)


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_autocast_dropout_run_decomposes_exactly_up_to_its_rounding(precision):
    model, traj, X_test = record(precision)
    assert traj.n_steps == N_STEPS
    assert all(traj.grad_scale(s) == 1.0 for s in range(N_STEPS))  # the unscaled gradient, not 1024 x it
    if precision == "float16":
        assert [r.amp_scale for r in traj.manifest.steps] == [1024.0] * N_STEPS
    assert_autocast_run_exact(model, traj, X_test, precision)


def test_the_residual_share_is_the_autocasts():
    """The same loop in float32 without autocast: the share falls to float32 rounding, and nothing warns."""
    _, traj, X_test = record("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **MLP_QUAD).fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 2e-6


def test_a_share_above_the_tolerance_names_autocast_first():
    _, traj, X_test = record("bfloat16")
    with pytest.warns(ExplaindWarning, match=r"residual share .* > residual_tol=[0-9.e-]+ \(auto: shares stated for a "
                                             r"run recorded under torch.autocast\(bfloat16\)\).*Likely causes: \(1\) "
                                             r"the loop's forward ran under torch.autocast \(bfloat16\).*residual_tol"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu", **MLP_QUAD).fit(traj).transform(X_test)
