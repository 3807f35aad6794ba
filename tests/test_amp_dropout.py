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
import torch
import torch.nn.functional as F
from _real_loop_testkit import MLP_N_TRAIN, MLP_QUAD, assert_autocast_run_exact, dropout_mlp, mlp_data, mlp_optimizer

import explaind
from explaind.exceptions import ExplaindWarning

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS, BATCH = 6, 8


def record(precision: str):
    """The documented recipe: ``torch.autocast("cpu", dtype)``; float16 with ``GradScaler("cpu")``."""
    gen = torch.Generator().manual_seed(2)
    X, y = mlp_data(gen)
    model = dropout_mlp()
    opt = mlp_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if precision == "float16" else None
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:MLP_N_TRAIN], y[:MLP_N_TRAIN]),
                                      grad_scaler=scaler)
    model.train()
    with rec:
        for _ in range(N_STEPS):
            idx = torch.randperm(MLP_N_TRAIN, generator=gen)[:BATCH]
            opt.zero_grad()
            with torch.autocast("cpu", dtype=getattr(torch, precision), enabled=precision != "float32"):
                loss = F.cross_entropy(model(X[idx]), y[idx])
            if scaler is None:
                loss.backward()
                rec.log_batch(idx)
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                rec.log_batch(idx)
                scaler.step(opt)
                scaler.update()
    return model.eval(), rec.trajectory, X[MLP_N_TRAIN:]


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
    with pytest.warns(ExplaindWarning, match=r"residual share .* > residual_tol=0.001.*Likely causes: \(1\) the "
                                             r"loop's forward ran under torch.autocast \(bfloat16\).*residual_tol"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu", **MLP_QUAD).fit(traj).transform(X_test)
