"""A replica whose quadrature leaves error above ``tol`` says so: the adaptive rule's budgets and the fixed rules.

The fixed rules' estimates are known exactly against :math:`g(\\theta_{s+1}) - g(\\theta_s)` when a replica is
built, so a midpoint or Gauss-Legendre replica that misses its steps' changes warns like the adaptive rule does
(docs/engine.md, section 2). The error the warning names is checked against a loop of forward-mode derivatives
at the rule's nodes, step by step; the TracIn rule (``"left"``) is first order by design and is not warned about.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import explaind
from explaind.exceptions import ExplaindWarning


def _run(act: type[nn.Module], lr: float, steps: int = 3):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), act(), nn.Linear(32, 3)).double()
    X = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(steps):
            idx = torch.arange(16 * s, 16 * s + 16)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory, X[:6]


def _midpoint_worst(model: nn.Module, traj, X: torch.Tensor, n: int) -> float:
    """Largest ``max_o |midpoint estimate - change| / max_o |change|`` over (step, input), by a loop."""
    worst = 0.0
    for s in range(traj.n_steps):
        a, b = traj.params(s), traj.params(s + 1)
        delta = {k: b[k] - a[k] for k in a}
        change = functional_call(model, b, (X,)) - functional_call(model, a, (X,))
        est = torch.zeros_like(change)
        for i in range(n):
            t = (i + 0.5) / n
            at = {k: a[k] + t * delta[k] for k in a}
            est += jvp(lambda p: functional_call(model, p, (X,)), (at,), (delta,))[1] / n
        rel = (est - change).abs().amax(-1) / change.abs().amax(-1)
        worst = max(worst, float(rel.max()))
    return worst


def test_a_midpoint_replica_that_misses_its_steps_changes_warns_with_the_error():
    model, traj, X = _run(nn.ReLU, 2.0)
    with pytest.warns(ExplaindWarning, match=r"quadrature='midpoint' with 10 nodes left \d+ of 18") as caught:
        explaind.KernelReplica(quadrature="midpoint", nodes=10, device="cpu").fit(traj).predict(X)
    message = next(str(w.message) for w in caught if "quadrature='midpoint'" in str(w.message))
    said = float(re.search(r"relative error up to ([0-9.e+-]+)", message).group(1))
    want = _midpoint_worst(model, traj, X, 10)
    assert want > 1e-7
    assert said == pytest.approx(want, rel=0.05)  # printed to two significant digits


@pytest.mark.parametrize("rule", ["gauss-legendre", "left"])
def test_a_smooth_replica_within_tol_and_the_tracin_rule_do_not_warn(rule):
    model, traj, X = _run(nn.Tanh, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        out = explaind.KernelReplica(quadrature=rule, nodes=8 if rule != "left" else None, device="cpu").fit(
            traj).predict(X)
    with torch.no_grad():
        want = model(X)
    err = float((torch.as_tensor(out) - want).abs().max() / want.abs().max())
    assert err < 1e-9 if rule == "gauss-legendre" else err > 1e-6  # TracIn errs, by design, without a warning
