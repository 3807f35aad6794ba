"""The adaptive rule at a loose tolerance (``tol >= GAP_TOL``): gaps between evaluated nodes, cut at kinks, bisected.

References written here: synthetic paths :math:`h_o(t) = b_o t + a_o \\sin 3t + \\sum_j c_{jo} \\max(0, t - \\tau_j)`
evaluated one (unit, node) at a time in a Python loop, and on a recorded ReLU MLP a loop of forward-mode
derivatives (``torch.autograd.forward_ad``) at each plan node with the step's own parameters. A rule that weighted a
node wrongly, dropped a gap, counted its evaluations wrongly or stopped above its tolerance fails them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.kernel import adaptive, gaps
from explaind.kernel.adaptive import adaptive_plan
from explaind.kernel.engine import PathEngine
from explaind.kernel.planning import window_plans
from explaind.kernel.quadrature import rule_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

O = 3


def _paths(kinks: list[int], seed: int = 0, curve: float = 0.3):
    """Per unit: kink positions ``(J,)``, jumps ``(J, O)``, slope ``b (O,)`` and curvature ``a (O,)``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for J in kinks:
        tau = torch.rand(J, generator=gen, dtype=torch.float64)
        c = torch.randn(J, O, generator=gen, dtype=torch.float64)
        out.append((tau, c, torch.randn(O, generator=gen, dtype=torch.float64),
                    curve * torch.randn(O, generator=gen, dtype=torch.float64)))
    return out


def _h(path, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`h(t), h'(t)` of one path at one point, ``(O,)`` each (the kinks passed by ``t`` summed)."""
    tau, c, b, a = path
    on = tau < t
    return (b * t + a * math.sin(3 * t) + ((t - tau[on])[:, None] * c[on]).sum(0),
            b + 3 * a * math.cos(3 * t) + c[on].sum(0))


def _refine(paths, calls: list):
    def refine(units, t):
        calls.append(units.clone())
        vals = [_h(paths[u], v) for u, v in zip(units.tolist(), t.tolist())]
        return torch.stack([v[0] for v in vals]), torch.stack([v[1] for v in vals])

    return refine


def _start(paths, x):
    hd = [[_h(p, v) for v in x.tolist()] for p in paths]
    h = torch.stack([torch.stack([v[0] for v in row]) for row in hd])
    d = torch.stack([torch.stack([v[1] for v in row]) for row in hd])
    g_a = torch.stack([_h(p, 0.0)[0] for p in paths])
    g_b = torch.stack([_h(p, 1.0)[0] for p in paths])
    return h, d, g_a, g_b


def _check_plan(paths, units, gp, g_a, g_b):
    """Each unit's estimate, error and weights against a loop over its nodes."""
    for k, u in enumerate(units.tolist()):
        mine = gp.node_unit == k
        t, w = gp.t[mine], gp.w[mine]
        assert bool((w >= 0).all()) and bool(((t >= 0) & (t <= 1)).all())
        assert abs(float(w.sum()) - 1) < 1e-13
        est = sum(wq * _h(paths[u], tq)[1] for tq, wq in zip(t.tolist(), w.tolist()))
        torch.testing.assert_close(gp.est[k], est, rtol=0, atol=1e-12)
        exact = _h(paths[u], 1.0)[0] - _h(paths[u], 0.0)[0]
        assert abs(float((est - exact).abs().max()) - float(gp.err[k])) < 1e-12


def test_units_end_within_tolerance_and_their_estimates_are_their_weighted_slopes():
    paths = _paths([0, 1, 2, 5, 20, 80, 300])
    x = torch.tensor(rule_nodes("gauss-legendre", 2)[0])
    h, d, g_a, g_b = _start(paths, x)
    units = torch.arange(len(paths))
    thr = 1e-3 * (g_b - g_a).abs().amax(-1)
    evals = torch.full((len(paths),), 2)
    calls: list = []
    gp = gaps.gap_plan(units, x, h, d, g_a, g_b, thr, _refine(paths, calls), evals, max_evals=4096, max_depth=64)
    _check_plan(paths, units, gp, g_a, g_b)
    assert bool((gp.err <= thr).all())
    spent = torch.bincount(torch.cat(calls), minlength=len(paths))
    torch.testing.assert_close(evals, 2 + spent)  # the first estimate's 2, h'(0) and h'(1), every bisection


def test_one_kink_on_a_linear_path_is_exact_without_a_bisection():
    paths = _paths([1, 1, 1], seed=3, curve=0.0)
    x = torch.tensor(rule_nodes("gauss-legendre", 2)[0])
    h, d, g_a, g_b = _start(paths, x)
    units = torch.arange(3)
    evals = torch.full((3,), 2)
    calls: list = []
    thr = 1e-3 * (g_b - g_a).abs().amax(-1)
    gp = gaps.gap_plan(units, x, h, d, g_a, g_b, thr, _refine(paths, calls), evals, max_evals=4096, max_depth=64)
    assert len(calls) == 1 and evals.tolist() == [4, 4, 4]  # h'(0), h'(1) only
    assert float(gp.err.max()) < 1e-14 * float((g_b - g_a).abs().max())
    _check_plan(paths, units, gp, g_a, g_b)


def test_the_budget_stops_a_unit_above_its_tolerance_and_reports_its_error():
    paths = _paths([400, 2], seed=5)
    x = torch.tensor(rule_nodes("gauss-legendre", 2)[0])
    h, d, g_a, g_b = _start(paths, x)
    units = torch.arange(2)
    thr = 1e-6 * (g_b - g_a).abs().amax(-1)
    evals = torch.full((2,), 2)
    gp = gaps.gap_plan(units, x, h, d, g_a, g_b, thr, _refine(paths, []), evals, max_evals=30, max_depth=64)
    assert int(evals.max()) <= 30
    assert float(gp.err[0]) > float(thr[0])  # 400 kinks at 1e-6 in 30 evaluations: left, and said by err
    _check_plan(paths, units, gp, g_a, g_b)


def test_adaptive_plan_uses_the_gaps_from_gap_tol_with_and_without_first_samples():
    paths = _paths([0, 3, 30, 100], seed=7)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 2))
    h, d, g_a, g_b = _start(paths, x)
    est0 = torch.einsum("q,uqo->uo", w, d)
    for first in (None, (x, h, d)):
        calls: list = []
        plan = adaptive_plan(est0, g_a, g_b, _refine(paths, calls), tol=gaps.GAP_TOL, nodes=2, first=first)
        for u, p in enumerate(paths):
            keep = plan.w[u] != 0
            est = sum(wq * _h(p, tq)[1] for tq, wq in zip(plan.t[u][keep].tolist(), plan.w[u][keep].tolist()))
            torch.testing.assert_close(plan.estimate[u], est, rtol=0, atol=1e-12)
            exact = g_b[u] - g_a[u]
            assert float((est - exact).abs().max()) <= gaps.GAP_TOL * float(exact.abs().max())
        spent = torch.bincount(torch.cat(calls), minlength=len(paths)) if calls else torch.zeros(4, dtype=torch.long)
        torch.testing.assert_close(plan.evals, 2 + spent)


def test_tolerances_below_gap_tol_keep_the_kink_by_kink_rule(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("loose_plan called below GAP_TOL")

    monkeypatch.setattr(adaptive, "loose_plan", refuse)
    paths = _paths([3, 10], seed=2)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    h, d, g_a, g_b = _start(paths, x)
    plan = adaptive_plan(torch.einsum("q,uqo->uo", w, d), g_a, g_b, _refine(paths, []), tol=gaps.GAP_TOL / 10,
                         nodes=4, first=(x, h, d))
    assert bool((plan.evals > 4).all())
    with pytest.raises(AssertionError, match="below GAP_TOL"):
        adaptive_plan(torch.einsum("q,uqo->uo", w, d), g_a, g_b, _refine(paths, []), tol=gaps.GAP_TOL, nodes=4,
                      first=(x, h, d))


STEPS, INPUTS = 4, 6


@pytest.fixture(scope="module")
def relu_run():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:50], y[:50]))
    with rec:
        for s in range(STEPS):
            idx = torch.arange(10 * s, 10 * (s + 1))
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory, X[50:50 + INPUTS]


def _slope(model, base, delta, t: float, x) -> torch.Tensor:
    with fwAD.dual_level():
        point = {n: fwAD.make_dual(base[n] + t * delta[n], delta[n]) for n in base}
        return fwAD.unpack_dual(functional_call(model, point, (x[None],))).tangent[0]


def _plans(traj, X, tol):
    eng = PathEngine(traj, device=torch.device("cpu"), dtype=torch.float64, chunk_size=None)
    Xc = eng.inputs(X)
    return window_plans(eng, Xc, eng.explained(Xc, None, None, "test"), (0, STEPS), "adaptive", 2, tol,
                        with_estimate=True)[2]


def _loop_errors(model, traj, X, plans) -> list[float]:
    """Per (step, input): the plan's nodes and weights contracted with forward-mode slopes, against the exact change."""
    names = [n for n, _ in model.named_parameters()]
    thetas = [{n: traj.params(s)[n].to(torch.float64) for n in names} for s in range(STEPS + 1)]
    rel = []
    for s, plan in enumerate(plans):
        delta = {n: thetas[s + 1][n] - thetas[s][n] for n in names}
        for i in range(INPUTS):
            keep = plan.w[i] != 0
            est = sum(w * _slope(model, thetas[s], delta, t, X[i]) for t, w in
                      zip(plan.t[i][keep].tolist(), plan.w[i][keep].tolist()))
            torch.testing.assert_close(plan.estimate[i], est, rtol=0, atol=1e-12)
            with torch.no_grad():
                exact = (functional_call(model, thetas[s + 1], (X[i:i + 1],)) -
                         functional_call(model, thetas[s], (X[i:i + 1],)))[0]
            rel.append(float((est - exact).abs().max() / exact.abs().max()))
    return rel


def test_a_relu_mlp_at_tol_1e_3_is_within_it_by_a_loop_of_forward_mode_slopes(relu_run):
    model, traj, X = relu_run
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # within tolerance: no warning
        plans = _plans(traj, X, 1e-3)
    rel = _loop_errors(model, traj, X, plans)
    assert max(rel) <= 1e-3 * (1 + 1e-9)
    assert max(rel) > 1e-8  # a loose rule: the paths were not all integrated to rounding


def test_a_budget_that_leaves_error_above_tol_warns(relu_run, monkeypatch):
    model, traj, X = relu_run
    monkeypatch.setattr(adaptive, "MAX_EVALS", 5)  # h'(0), h'(1) and one bisection at most
    with pytest.warns(ExplaindWarning, match="tol"):
        plans = _plans(traj, X, 1e-3)
    rel = _loop_errors(model, traj, X, plans)
    assert max(rel) > 1e-3
    assert max(int(p.evals.max()) for p in plans) <= 5
