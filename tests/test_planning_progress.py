"""With a progress bar, the quadrature of a window advances in groups small enough for its time estimate."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import explaind
from explaind.kernel import adaptive, planning

STEPS = 41


def _record(model, X, y, steps, batch, lr):
    """SGD over ``steps`` mini-batches of ``batch`` consecutive samples, cycling through ``X``, recorded."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    n = X.shape[0] // batch
    with rec:
        for s in range(steps):
            idx = torch.arange(batch * (s % n), batch * (s % n) + batch)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


@pytest.fixture(scope="module")
def traj():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    return _record(model, X, y, STEPS, 4, 0.1), X[:3]


class _Bar:
    def __init__(self, total: int):
        self.total, self.updates = total, []

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


def _fake_bars(monkeypatch) -> list[_Bar]:
    bars: list[_Bar] = []

    def fake(enabled, desc, total, unit="step"):
        bars.append(_Bar(total))
        return bars[-1]

    monkeypatch.setattr(planning, "progress_bar", fake)
    return bars


def test_bar_moves_in_at_most_a_twentieth_of_the_window(traj, monkeypatch):
    bars = _fake_bars(monkeypatch)
    trajectory, X = traj
    quiet = explaind.KernelReplica(quadrature="gauss-legendre").fit(trajectory).predict(X)
    shown = explaind.KernelReplica(quadrature="gauss-legendre", progress=True).fit(trajectory).predict(X)
    assert bars[0].updates == [STEPS]  # no bar: one group of stacked steps
    assert sum(bars[-1].updates) == STEPS and max(bars[-1].updates) == math.ceil(STEPS / planning.BAR_UPDATES)
    assert float(abs(torch.as_tensor(shown) - torch.as_tensor(quiet)).max()) <= 1e-12 * float(abs(quiet).max())


@pytest.fixture(scope="module")
def relu_traj():
    """A wide ReLU MLP at a large learning rate: many units cross their kink within a step (a kink-dense path)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96), torch.nn.ReLU(),
                                torch.nn.Linear(96, 3)).double()
    X, y = torch.randn(48, 6, dtype=torch.float64), torch.randint(0, 3, (48,))
    return _record(model, X, y, RELU_STEPS, 16, 0.5), torch.randn(12, 6, dtype=torch.float64)


RELU_STEPS = 20


def test_the_adaptive_rule_plans_the_same_with_and_without_a_bar(relu_traj, monkeypatch):
    # the adaptive rule decides per group of steps (kink-dense test, probe, shared budgets): its groups must not
    # follow the bar, or the replica and its evaluations would change with it
    bars = _fake_bars(monkeypatch)
    trajectory, X = relu_traj
    reports = []
    for progress in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a kink-dense path may leave pairs above tol: warned, the same both ways
            est = explaind.KernelReplica(quadrature="adaptive", progress=progress).fit(trajectory)
            reports.append((est.predict(X), est.fidelity_report(X)))
    (quiet, r_quiet), (shown, r_shown) = reports
    G = planning.ADAPTIVE_GROUP_STEPS
    expected = [G] * (RELU_STEPS // G) + ([RELU_STEPS % G] if RELU_STEPS % G else [])
    assert [b.updates for b in bars] == [expected] * 4  # predict and fidelity_report, without and with the bar
    assert torch.equal(torch.as_tensor(shown), torch.as_tensor(quiet))
    assert np.array_equal(r_shown["evals_per_step"], r_quiet["evals_per_step"])
    assert np.array_equal(r_shown["quadrature_error"], r_quiet["quadrature_error"])


def test_adaptive_groups_are_cut_at_multiples_of_the_group_size():
    assert planning.step_groups(5, 40, 16, aligned=True) == [(5, 16), (16, 32), (32, 40)]
    assert planning.step_groups(32, 40, 16, aligned=True) == [(32, 40)]
    assert planning.step_groups(0, 3, 16, aligned=True) == [(0, 3)]
    assert planning.step_groups(5, 40, 16, aligned=False) == [(5, 21), (21, 37), (37, 40)]
    assert planning.step_groups(7, 7, 4, aligned=True) == []


def test_a_window_plans_its_whole_groups_as_the_whole_run_does(relu_traj):
    # the kink-dense test, probe and shared budgets are decided per group: with groups counted from the window's
    # first step, the window (4, 20) would refine steps 4..19 as one group and plan steps 16..19 otherwise
    trajectory, X = relu_traj
    G = planning.ADAPTIVE_GROUP_STEPS
    reports = []
    for steps in (None, (4, None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = explaind.KernelReplica(quadrature="adaptive", steps=steps).fit(trajectory)
            reports.append(est.fidelity_report(X))
    whole, window = reports
    assert list(window["steps"]) == list(range(4, RELU_STEPS))
    shared = slice(G - 4, None)  # steps G .. RELU_STEPS-1 of the window
    assert np.array_equal(window["evals_per_step"][shared], whole["evals_per_step"][G:])
    assert np.array_equal(window["quadrature_error"][shared], whole["quadrature_error"][G:])


def test_a_window_left_above_tol_warns_once_with_the_counts_of_all_its_groups(relu_traj, monkeypatch):
    # RELU_STEPS = 20 steps are two groups (16 + 4); with a cap of 8 evaluations at a tolerance of 1e-12 pairs of
    # both groups end above it: one warning for the window, counting the pairs of both
    monkeypatch.setattr(adaptive, "MAX_EVALS", 8)
    trajectory, X = relu_traj
    est = explaind.KernelReplica(quadrature="adaptive", tol=1e-12).fit(trajectory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = est.fidelity_report(X)
    left = [str(w.message) for w in caught if "adaptive quadrature left" in str(w.message)]
    assert len(left) == 1
    G = planning.ADAPTIVE_GROUP_STEPS
    rel = report["relative_quadrature_error"]
    assert (rel[:G] > 1e-12).any() and (rel[G:] > 1e-12).any()  # both groups left pairs above tol
    assert f" of {RELU_STEPS * X.shape[0]} (step, input) pairs above tol=1e-12" in left[0]
    assert "stopped at the cap of about 8 evaluations" in left[0]
    assert f"relative error up to {float(rel.max()):.2g}" in left[0]
