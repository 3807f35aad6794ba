"""A dropout MLP trained under float16 autocast + GradScaler and under bfloat16 autocast, fp32 master weights.

What is exact and what is not: the recorded parameters are the fp32 master weights and the masks are replayed
from the captured random states (CPU masks do not depend on the dtype, autocast included), so the engine's
float64 split of each recorded update into per-sample gradients matches the slow replaying loop reference
(tests/replay_reference.py) to rounding, and the replica is the trained model. The loop's gradients were
computed from half-precision activations while both recompute them in float64: the difference is the
residual, at autocast rounding (measured 1.9e-4 under float16, 1.3e-3 under bfloat16), against 3.6e-8 for the
same loop in float32 without autocast.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import rel_err
from replay_reference import ReplayReference
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_STEPS, BATCH = 40, 6, 8
QUAD = {"quadrature": "gauss-legendre", "nodes": 8}


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 3))


def _record(precision: str):
    """The documented recipe: ``torch.autocast("cpu", dtype)``; float16 with ``GradScaler("cpu")``."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(N_TRAIN + 4, 6, generator=gen)
    y = torch.randint(0, 3, (N_TRAIN + 4,), generator=gen)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if precision == "float16" else None
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:N_TRAIN], y[:N_TRAIN]),
                                      grad_scaler=scaler)
    model.train()
    with rec:
        for _ in range(N_STEPS):
            idx = torch.randperm(N_TRAIN, generator=gen)[:BATCH]
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
    return model.eval(), rec.trajectory, X[N_TRAIN:]


@pytest.mark.parametrize(("precision", "check_tol", "share_range"),
                         [("float16", 2e-3, (2e-5, 1e-3)), ("bfloat16", 2e-2, (2e-4, 5e-3))])
def test_autocast_dropout_run_decomposes_exactly_up_to_its_rounding(precision, check_tol, share_range):
    model, traj, X_test = _record(precision)
    assert traj.n_steps == N_STEPS and {r.autocast for r in traj.manifest.steps} == {precision}
    assert all(traj.grad_scale(s) == 1.0 for s in range(N_STEPS))  # the unscaled gradient, not 1024 x it
    if precision == "float16":
        assert [r.amp_scale for r in traj.manifest.steps] == [1024.0] * N_STEPS
    checked = np.asarray(traj.gradient_check())
    assert np.isfinite(checked).sum() >= 3 and float(np.nanmax(checked)) <= check_tol  # at autocast tolerance
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu", residual_tol=1.0, **QUAD).fit(traj).transform(
        X_test)
    ref = ReplayReference(traj, X_test)
    assert float(ref.quad_error.abs().max()) <= 1e-12
    want = reference_terms(ref, att)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert rel_err(as_numpy(att.residual), want["residual"]) <= 1e-9  # the autocast rounding, measured alike
    low, high = share_range
    assert low <= att.meta["residual_share"] <= high
    assert att.completeness_error() <= 1e-12
    with torch.no_grad():
        trained = model(X_test)
    replica = explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X_test)
    assert rel_err(replica, as_numpy(trained)) <= 1e-6


def test_the_residual_share_is_the_autocasts():
    """The same loop in float32 without autocast: the share falls to float32 rounding, and nothing warns."""
    _, traj, X_test = _record("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **QUAD).fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 2e-6


def test_a_share_above_the_tolerance_names_autocast_first():
    _, traj, X_test = _record("bfloat16")
    with pytest.warns(ExplaindWarning, match=r"residual share .* > residual_tol=0.001.*Likely causes: \(1\) the "
                                             r"loop's forward ran under torch.autocast \(bfloat16\).*residual_tol"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu", **QUAD).fit(traj).transform(X_test)
