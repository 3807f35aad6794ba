"""Quadrature rules and the adaptive node plan, checked on functions with known integrals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from explaind.kernel.quadrature import NodePlan, adaptive_plan, fixed_plan, rule_nodes


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_gauss_legendre_is_exact_to_degree_2n_minus_1(n):
    t, w = rule_nodes("gauss-legendre", n)
    assert np.all((t > 0) & (t < 1))
    for degree in range(2 * n):
        assert abs(np.sum(w * t**degree) - 1.0 / (degree + 1)) < 1e-14
    assert abs(np.sum(w * t ** (2 * n)) - 1.0 / (2 * n + 1)) > 1e-12


def test_midpoint_rule_is_the_papers_cell_centres():
    t, w = rule_nodes("midpoint", 100)
    np.testing.assert_allclose(t, (np.arange(100) + 0.5) / 100)
    np.testing.assert_allclose(w, np.full(100, 0.01))
    # error of the composite midpoint rule on t^2: 1 / (12 n^2)
    assert abs(np.sum(w * t**2) - 1 / 3 + 1 / (12 * 100**2)) < 1e-15


def test_fixed_plan_shapes():
    exact = torch.randn(5, 2, dtype=torch.float64)
    plan = fixed_plan("gauss-legendre", 3, exact)
    assert plan.t.shape == plan.w.shape == (5, 3)
    assert torch.allclose(plan.w.sum(1), torch.ones(5, dtype=torch.float64))
    assert plan.estimate is None and plan.evals.tolist() == [3] * 5


def _kinked(c: torch.Tensor):
    """Unit ``u`` has two outputs: g0 = |t - c_u| + t^3 and g1 = 2 relu(t - c_u) - sin(t)."""

    def g(t, u):
        cu = c[u]
        return torch.stack([(t - cu).abs() + t**3, 2 * torch.relu(t - cu) - torch.sin(t)], -1)

    def dg(t, u):
        cu = c[u]
        return torch.stack([torch.sign(t - cu) + 3 * t**2, 2 * (t > cu).double() - torch.cos(t)], -1)

    return g, dg


def _plan_for(c: torch.Tensor, tol: float) -> tuple[NodePlan, object, object]:
    g, dg = _kinked(c)
    U = c.shape[0]
    units = torch.arange(U)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    est0 = sum(w[q] * dg(x[q].expand(U), units) for q in range(4))
    g_a, g_b = g(torch.zeros(U, dtype=torch.float64), units), g(torch.ones(U, dtype=torch.float64), units)
    plan = adaptive_plan(est0, g_a, g_b, lambda u, t: (g(t, u), dg(t, u)), tol=tol)
    return plan, g, dg


@pytest.mark.parametrize("tol", [1e-6, 1e-9, 1e-12])
def test_adaptive_plan_meets_the_tolerance_on_kinks(tol):
    c = torch.tensor([0.3, 1 / 3, 0.71234, 0.5, 2.0], dtype=torch.float64)  # the last unit has no kink
    plan, g, dg = _plan_for(c, tol)
    U = c.shape[0]
    exact = g(torch.ones(U, dtype=torch.float64), torch.arange(U)) - g(torch.zeros(U, dtype=torch.float64),
                                                                        torch.arange(U))
    torch.testing.assert_close(plan.exact, exact)
    scale = exact.abs().amax(-1)
    assert ((plan.estimate - exact).abs().amax(-1) <= tol * scale + 1e-13).all()
    # the nodes and weights reproduce the estimate and integrate both outputs' derivatives
    for u in range(U):
        keep = plan.w[u] != 0
        t, w = plan.t[u][keep], plan.w[u][keep]
        assert torch.all((t >= 0) & (t <= 1)) and abs(float(w.sum()) - 1) < 1e-13
        recon = (w[:, None] * dg(t, torch.full_like(t, u, dtype=torch.long))).sum(0)
        torch.testing.assert_close(recon, plan.estimate[u], rtol=0, atol=1e-13)
        assert ((recon - exact[u]).abs() <= tol * scale[u] + 1e-13).all()
    # the smooth unit stays at the initial 4 Gauss-Legendre nodes; kinked ones cost far fewer evals than
    # a uniform rule of the same accuracy would (error ~ 1/n for a kink: ~1/tol nodes)
    if tol >= 1e-9:  # Gauss-Legendre-4 error on this smooth unit is ~1e-10
        assert int((plan.w[4] != 0).sum()) == 4 and int(plan.evals[4]) == 4
    assert int(plan.evals.max()) < 40 * math.log2(1 / tol)


def test_adaptive_plan_converges_linearly_per_kink():
    """Evaluations grow with log(1/tol): each bisection level adds a constant number of evaluations."""
    c = torch.tensor([0.3, 0.61], dtype=torch.float64)
    evals = [float(_plan_for(c, tol)[0].evals.double().mean()) for tol in (1e-5, 1e-8, 1e-11)]
    assert evals[0] < evals[1] < evals[2]
    assert evals[2] - evals[1] < 2.0 * (evals[1] - evals[0]) + 8


def test_by_node_covers_each_pair_once():
    c = torch.tensor([0.3, 0.3, 0.9, 2.0, 2.0, 0.123], dtype=torch.float64)
    plan, _, _ = _plan_for(c, 1e-8)
    T = plan.t.shape[0]
    for min_shared in (2, 3):
        shared, (idx, t, w) = plan.by_node(min_shared)
        total = torch.zeros(T, dtype=torch.float64).index_add_(0, idx, w)
        first = torch.zeros(T, dtype=torch.float64).index_add_(0, idx, w * t)
        for tu, sub, wu in shared:
            assert sub.numel() >= min_shared
            total.index_add_(0, sub, wu)
            first.index_add_(0, sub, wu * tu)
        torch.testing.assert_close(total, plan.w.sum(1))
        torch.testing.assert_close(first, (plan.w * plan.t).sum(1))


def test_plan_split_and_take():
    c = torch.tensor([0.3, 2.0, 0.6, 2.0], dtype=torch.float64)
    plan, _, _ = _plan_for(c, 1e-8)
    a, b = plan.split(2)
    assert a.t.shape[0] == b.t.shape[0] == 2
    torch.testing.assert_close(torch.cat([a.estimate, b.estimate]), plan.estimate)
    assert a.t.shape[1] <= plan.t.shape[1]
    sub = plan.take(torch.tensor([2]))
    torch.testing.assert_close(sub.w, plan.w[2:3])
