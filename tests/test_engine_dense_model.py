"""The kink-dense fallback on a real ReLU-dense model: a wide ReLU MLP trained at an untuned lr 1.0.

Checks, against loops written here with ``torch.func.jvp`` per (step, input, node) and plain forward
passes: every plan's estimate is its nodes' weighted slopes, the exact differences are the model's,
most units beyond the probe spend their step's cells (the grids spend at most ``DENSE_EVALS`` per unit on
average, the batch's budget, shared out over the steps) and have as many nodes, and the warning names the cause.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.kernel import dense
from explaind.kernel.engine import PathEngine
from explaind.kernel.planning import window_plans

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(steps: int = 2):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    y = (X[:, :4].sum(1) > 0).long() + 2 * (X[:, 4:8].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:200], y[:200]))
    with rec:
        for s in range(steps):
            idx = torch.arange(64 * s, 64 * (s + 1)) % 200
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory, X[200:240]


def test_a_relu_dense_mlp_takes_the_kink_dense_rule_with_exact_bookkeeping():
    model, traj, X = _run()
    eng = PathEngine(traj, device=torch.device("cpu"), dtype=torch.float64, chunk_size=None)
    Xc = eng.inputs(X)
    ex = eng.explained(Xc, None, None, "test")
    with pytest.warns(ExplaindWarning, match="activation kinks"):
        _, _, plans, _ = window_plans(eng, Xc, ex, (0, 2), "adaptive", None, 1e-7, with_estimate=True)
    names = [n for n, _ in model.named_parameters()]
    thetas = [{n: traj.params(s)[n].to(torch.float64) for n in names} for s in range(3)]

    def g(theta, x):
        return functional_call(model, theta, (x,))

    evals = torch.cat([p.evals for p in plans])
    beyond_probe = evals.numel() - dense.PROBE_UNITS
    modes = [int(torch.mode(p.evals).values) for p in plans]  # each step's grid: the cells of its own budget
    n, spread = dense.DENSE_EVALS, dense.BUDGET_SPREAD
    lo, hi = math.ceil(dense.GRID_FLOOR * n / spread), n * spread
    assert all(lo <= c <= hi for c in modes)
    assert sum(int((p.evals == c).sum()) for p, c in zip(plans, modes)) >= 0.8 * beyond_probe
    # the grids keep the batch's budget: DENSE_EVALS per failing unit on average (all units fail here)
    assert sum(c * p.evals.numel() for p, c in zip(plans, modes)) <= dense.DENSE_EVALS * evals.numel()
    for s, plan in enumerate(plans):
        delta = {n: thetas[s + 1][n] - thetas[s][n] for n in names}
        with torch.no_grad():
            exact = g(thetas[s + 1], X) - g(thetas[s], X)
        torch.testing.assert_close(plan.exact, exact, rtol=0, atol=1e-12)
        for i in (0, 17, 39):  # a loop over the plan's nodes, one JVP each
            keep = plan.w[i] != 0
            total = torch.zeros(4, dtype=torch.float64)
            for t, w in zip(plan.t[i][keep].tolist(), plan.w[i][keep].tolist()):
                point = {n: thetas[s][n] + t * delta[n] for n in names}
                total += w * jvp(lambda p, x=X[i:i + 1]: g(p, x)[0], (point,), (delta,))[1]
            torch.testing.assert_close(plan.estimate[i], total, rtol=0, atol=1e-12)
            if int(plan.evals[i]) == modes[s]:  # nodes (a node between two cuts may weigh 0); padding has t = 0
                assert int((plan.t[i] > 0).sum()) == modes[s]
