"""With a progress bar, the quadrature of a window advances in groups small enough for its time estimate."""

from __future__ import annotations

import math

import pytest
import torch

import explaind
from explaind.kernel import planning

STEPS = 41


@pytest.fixture(scope="module")
def traj():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(STEPS):
            idx = torch.arange(4 * (s % 4), 4 * (s % 4) + 4)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X[:3]


class _Bar:
    def __init__(self, total: int):
        self.total, self.updates = total, []

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("quadrature", ["adaptive", "gauss-legendre"])
def test_bar_moves_in_at_most_a_twentieth_of_the_window(traj, monkeypatch, quadrature):
    bars: list[_Bar] = []

    def fake(enabled, desc, total, unit="step"):
        bars.append(_Bar(total))
        return bars[-1]

    monkeypatch.setattr(planning, "progress_bar", fake)
    trajectory, X = traj
    quiet = explaind.KernelReplica(quadrature=quadrature).fit(trajectory).predict(X)
    shown = explaind.KernelReplica(quadrature=quadrature, progress=True).fit(trajectory).predict(X)
    assert bars[0].updates == [STEPS]  # no bar: one group of stacked steps
    assert sum(bars[-1].updates) == STEPS and max(bars[-1].updates) == math.ceil(STEPS / planning.BAR_UPDATES)
    assert float(abs(torch.as_tensor(shown) - torch.as_tensor(quiet)).max()) <= 1e-12 * float(abs(quiet).max())
