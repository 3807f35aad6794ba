"""Factored Jacobians in batches of inputs bounded by the bytes of their layer factors."""

from __future__ import annotations

import pytest
import torch

import explaind
from explaind.kernel import layers


def test_batches_hold_whole_inputs_within_the_bound(monkeypatch):
    monkeypatch.setattr(layers, "FACTOR_BYTES", 80)
    entries = [3, 5, 2, 4, 9, 1]
    assert layers._factor_batch(entries, 0, 10, 0) == 1  # the first batch measures one input
    assert layers._factor_batch(entries, 0, 10, 10) == 2  # 3 + 5 entries of 10 bytes fit 80, + 2 does not
    assert layers._factor_batch(entries, 2, 10, 10) == 4  # 2 + 4
    assert layers._factor_batch(entries, 4, 10, 10) == 5  # 90 bytes alone: still one input
    assert layers._factor_batch(entries, 5, 10, 10) == 6  # the end
    assert layers._factor_batch(entries, 0, 1, 1) == 1  # at most `chunk` inputs


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).double()
    X, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(3):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, torch.randn(6, 4, dtype=torch.float64)


def test_small_batches_give_the_same_scores(run, monkeypatch):
    traj, X = run
    whole = explaind.InfluenceEstimator(keep=("train",), quadrature="midpoint", nodes=7).fit(traj).transform(X)
    sizes = []
    factors = layers.LayerEvaluator.entry_factors

    def spy(self, seg, t, w, rows):
        sizes.append(rows.stop - rows.start)
        return factors(self, seg, t, w, rows)

    monkeypatch.setattr(layers.LayerEvaluator, "entry_factors", spy)
    monkeypatch.setattr(layers, "FACTOR_BYTES", 1)  # one input per batch after the first
    est = explaind.InfluenceEstimator(keep=("train",), quadrature="midpoint", nodes=7).fit(traj)
    sizes.clear()
    small = est.transform(X)
    assert est.sweep_["jacobian"] == "factored"
    assert max(sizes) == 1 and len(sizes) >= X.shape[0]  # every batch one input
    assert float((small.values - whole.values).abs().max()) <= 1e-13 * float(whole.values.abs().max())
