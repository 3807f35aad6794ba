"""Quadrature rules and the adaptive node plan, checked on functions with known integrals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from explaind.kernel.quadrature import NodePlan, adaptive_plan, fixed_plan, rule_nodes


def _node_sums(plan, deriv, weight_tol):
    """Check each unit's nodes lie in [0, 1] with weights summing to 1 and reproducing the estimate.

    Returns the node sums ``sum_q w_q deriv(t_q)`` per unit.
    """
    sums = []
    for u in range(plan.t.shape[0]):
        keep = plan.w[u] != 0
        t, w = plan.t[u][keep], plan.w[u][keep]
        assert torch.all((t >= 0) & (t <= 1)) and abs(float(w.sum()) - 1) < weight_tol
        recon = (w[:, None] * deriv(t, torch.full_like(t, u, dtype=torch.long))).sum(0)
        torch.testing.assert_close(recon, plan.estimate[u], rtol=0, atol=1e-13)
        sums.append(recon)
    return sums


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
    for u, recon in enumerate(_node_sums(plan, dg, 1e-13)):
        assert ((recon - exact[u]).abs() <= tol * scale[u] + 1e-13).all()
    # the smooth unit stays at the initial 4 Gauss-Legendre nodes; kinked ones cost far fewer evals than
    # a uniform rule of the same accuracy would (error ~ 1/n for a kink: ~1/tol nodes)
    if tol >= 1e-9:  # Gauss-Legendre-4 error on this smooth unit is ~1e-10
        assert int((plan.w[4] != 0).sum()) == 4 and int(plan.evals[4]) == 4
    assert int(plan.evals.max()) < 40 * math.log2(1 / tol)


def test_adaptive_plan_cost_grows_slowly_with_the_tolerance():
    """Kinks are located, not bisected: six more orders of accuracy cost a few evaluations per unit, where
    bisection would add two evaluations per halving, 2 log2(1e6) ~ 40."""
    c = torch.tensor([0.3, 0.61], dtype=torch.float64)
    evals = [float(_plan_for(c, tol)[0].evals.double().mean()) for tol in (1e-5, 1e-8, 1e-11)]
    assert evals[0] <= evals[1] <= evals[2] <= evals[0] + 16


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


# ---------------------------------------------------------------------------------------- kink location
def _piecewise(kinks: list[list[float]], n_out: int = 3, seed: int = 0, curvature: float = 0.0,
               at_kink: str = "left"):
    """Units ``u`` with ``h_u(t) = m_u t + sum_k J_uk relu(t - c_uk) + curvature * (sin(2t) + t^2) a_u``.

    ``n_out`` outputs share the kinks ``c_u`` of the unit (one list per unit); ``at_kink`` is the side
    ``h'`` takes exactly at a kink: ``"left"``, ``"right"`` or ``"mean"``.
    """
    gen = torch.Generator().manual_seed(seed)
    U, K = len(kinks), max(1, max(len(k) for k in kinks))
    c = torch.full((U, K), 5.0, dtype=torch.float64)
    for u, ks in enumerate(kinks):
        c[u, :len(ks)] = torch.tensor(ks, dtype=torch.float64)
    jump = torch.randn(U, K, n_out, generator=gen, dtype=torch.float64)
    m = torch.randn(U, n_out, generator=gen, dtype=torch.float64)
    a = curvature * torch.randn(U, n_out, generator=gen, dtype=torch.float64)
    side = {"left": 0.0, "right": 1.0, "mean": 0.5}[at_kink]

    def h(t, u):
        t = t[:, None]
        smooth = m[u] * t + a[u] * (torch.sin(2 * t) + t**2)
        return smooth + (jump[u] * torch.relu(t - c[u])[..., None]).sum(1)

    def dh(t, u):
        t = t[:, None]
        step = (t > c[u]).double() + side * (t == c[u]).double()
        return m[u] + a[u] * (2 * torch.cos(2 * t) + 2 * t) + (jump[u] * step[..., None]).sum(1)

    return h, dh


def _run(h, dh, U: int, tol: float, **kw):
    """The adaptive plan of ``U`` units, checked for what every plan must satisfy; returns it and the exact values."""
    units = torch.arange(U)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    est0 = sum(w[q] * dh(x[q].expand(U), units) for q in range(4))
    zero, one = torch.zeros(U, dtype=torch.float64), torch.ones(U, dtype=torch.float64)
    g_a, g_b = h(zero, units), h(one, units)
    pairs = []

    def refine(u, t):
        pairs.append(u.numel())
        return h(t, u), dh(t, u)

    plan = adaptive_plan(est0, g_a, g_b, refine, tol=tol, **kw)
    exact = g_b - g_a
    # every evaluation is counted, and the nodes and weights reproduce the estimate
    assert int(plan.evals.sum()) == 4 * U + sum(pairs)
    _node_sums(plan, dh, 1e-12)
    return plan, exact


def _within(plan, exact, tol: float) -> torch.Tensor:
    return (plan.estimate - exact).abs().amax(-1) <= tol * exact.abs().amax(-1) + 1e-13


@pytest.mark.parametrize("tol", [1e-6, 1e-9, 1e-12])
@pytest.mark.parametrize("kink", [0.3, (5**0.5 - 1) / 2, 0.123, 0.875, 0.999])
def test_a_kink_of_a_piecewise_linear_path_is_located(kink, tol):
    """The tangents of two straight pieces meet exactly at the kink, so the rule needs the 4-node start, h' at
    both ends, a few probe pairs and one split (the kink and two 2-node panels) whatever the tolerance;
    bisecting a panel down to width tol takes log2(1/tol) >= 20 halvings."""
    h, dh = _piecewise([[kink]])
    plan, exact = _run(h, dh, 1, tol)
    assert _within(plan, exact, tol).all()
    assert int(plan.evals[0]) <= 20
    # one open 2-node panel on each side of the kink: no node on it or near it
    t = plan.t[0][plan.w[0] != 0]
    assert t.numel() == 4
    assert float((t - kink).abs().min()) >= 0.2 * min(kink, 1 - kink)


@pytest.mark.parametrize("at_kink", ["left", "right", "mean"])
@pytest.mark.parametrize("kink", [0.25, 0.375, 0.75])
def test_a_kink_on_a_dyadic_point_costs_no_more(kink, at_kink):
    """A kink that is evaluated exactly (h' there from either side or the mean of both) enters no panel."""
    h, dh = _piecewise([[kink]], at_kink=at_kink)
    plan, exact = _run(h, dh, 1, 1e-10)
    assert _within(plan, exact, 1e-10).all()
    assert int(plan.evals[0]) <= 20
    t = plan.t[0][plan.w[0] != 0]
    assert t.numel() == 4 and float((t - kink).abs().min()) >= 0.2 * min(kink, 1 - kink)


@pytest.mark.parametrize("kinks", [[0.2, 0.45, 0.5, 0.8], [0.3, 0.3 + 1e-7], [0.02, 0.1, 0.97]])
def test_several_kinks_in_one_panel(kinks):
    """Each kink costs at most a location (<= 3 probe pairs), a split (5 evaluations) and the failed 2-node
    test of the piece still holding the others; each straight piece ends as one 2-node panel."""
    h, dh = _piecewise([kinks])
    plan, exact = _run(h, dh, 1, 1e-9)
    assert _within(plan, exact, 1e-9).all()
    K = len(kinks)
    assert int(plan.evals[0]) <= 6 + 14 * K
    assert int((plan.w[0] != 0).sum()) == 2 * (K + 1)


def test_smooth_units_keep_their_gauss_nodes_next_to_kinked_ones():
    # cubic paths (h' quadratic: 4 Gauss nodes are exact) batched with kinked ones
    h, dh = _piecewise([[], [0.4], [], [0.1, 0.7], []])
    plan, exact = _run(h, dh, 5, 1e-10)
    assert _within(plan, exact, 1e-10).all()
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    for u in (0, 2, 4):
        assert int(plan.evals[u]) == 4
        keep = plan.w[u] != 0
        torch.testing.assert_close(plan.t[u][keep], x, rtol=0, atol=0)
        torch.testing.assert_close(plan.w[u][keep], w, rtol=0, atol=0)


def test_smooth_paths_failing_the_first_estimate_are_bisected():
    """Without kinks, panels that miss are bisected into `nodes`-point Gauss panels until they pass."""
    U = 3
    f = torch.tensor([6.0, 9.0, 12.0], dtype=torch.float64)
    h = lambda t, u: torch.stack([torch.sin(f[u] * t), t * torch.cos(f[u] * t)], -1)  # noqa: E731
    dh = lambda t, u: torch.stack([f[u] * torch.cos(f[u] * t),  # noqa: E731
                                   torch.cos(f[u] * t) - f[u] * t * torch.sin(f[u] * t)], -1)
    for tol in (1e-6, 1e-11):
        plan, exact = _run(h, dh, U, tol)
        assert _within(plan, exact, tol).all()
        assert bool((plan.evals > 4).all())


@pytest.mark.parametrize("coarsen", [False, True])
@pytest.mark.parametrize("tol", [1e-7, 1e-11])
def test_random_piecewise_smooth_paths_meet_the_tolerance(tol, coarsen):
    gen = torch.Generator().manual_seed(3)
    kinks = [torch.rand(int(n), generator=gen).tolist() for n in torch.randint(0, 4, (40,), generator=gen)]
    h, dh = _piecewise(kinks, n_out=2, seed=1, curvature=0.3)
    plan, exact = _run(h, dh, len(kinks), tol, coarsen=coarsen)
    assert _within(plan, exact, tol).all()


def test_refinement_stops_at_the_caps():
    """A level adds at most 1 + 2 * 4 evaluations per open panel (a bisection); a unit has one open panel at
    the first level and at most two at the second."""
    h, dh = _piecewise([[0.3], [0.1, 0.2, 0.6]], curvature=1.0)
    plan, exact = _run(h, dh, 2, 1e-12, max_depth=3)  # levels 1 and 2 only
    assert bool((plan.evals <= 4 + 2 + 9 + 2 * 9).all())
    plan, exact = _run(h, dh, 2, 1e-12, max_evals=12)  # 6 before level 1, at most 11 before level 2
    assert bool((plan.evals <= 11 + 2 * 9).all())
