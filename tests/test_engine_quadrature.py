"""Quadrature rules and the adaptive node plan, checked on functions with known integrals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from explaind.exceptions import ConfigError
from explaind.kernel.adaptive import adaptive_plan
from explaind.kernel.quadrature import NodePlan, fixed_plan, rule_nodes


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


def _smooth_oscillating():
    """Three smooth units (no kinks) that fail the first 4-node estimate: ``h, h'``."""
    f = torch.tensor([6.0, 9.0, 12.0], dtype=torch.float64)
    h = lambda t, u: torch.stack([torch.sin(f[u] * t), t * torch.cos(f[u] * t)], -1)  # noqa: E731
    dh = lambda t, u: torch.stack([f[u] * torch.cos(f[u] * t),  # noqa: E731
                                   torch.cos(f[u] * t) - f[u] * t * torch.sin(f[u] * t)], -1)
    return h, dh


def test_smooth_paths_failing_the_first_estimate_are_bisected():
    """Without kinks, panels that miss are bisected into `nodes`-point Gauss panels until they pass."""
    h, dh = _smooth_oscillating()
    for tol in (1e-6, 1e-11):
        plan, exact = _run(h, dh, 3, tol)
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


# ------------------------------------------------------------------------------ starting from the first estimate
def _run_from_first(h, dh, U: int, tol: float, nodes: int = 4, **kw):
    """The adaptive plans of ``U`` units without and with the first estimate's samples (checked as in :func:`_run`).

    Returns both plans, the exact values and, for the run with ``first``, the ``(units, t)`` of each refine call.
    """
    units = torch.arange(U)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", nodes))
    xu = x.repeat(U)
    uu = units.repeat_interleave(nodes)
    f, d = h(xu, uu).reshape(U, nodes, -1), dh(xu, uu).reshape(U, nodes, -1)
    est0 = torch.einsum("q,uqo->uo", w, d)
    zero, one = torch.zeros(U, dtype=torch.float64), torch.ones(U, dtype=torch.float64)
    g_a, g_b = h(zero, units), h(one, units)
    plans, calls = [], []
    for first in (None, (x, f, d)):
        calls = []

        def refine(u, t, calls=calls):
            calls.append((u.clone(), t.clone()))
            return h(t, u), dh(t, u)

        plan = adaptive_plan(est0, g_a, g_b, refine, tol=tol, nodes=nodes, first=first, **kw)
        assert int(plan.evals.sum()) == nodes * U + sum(u.numel() for u, _ in calls)
        _node_sums(plan, dh, 1e-12)
        plans.append(plan)
    return plans[0], plans[1], g_b - g_a, calls


def _end_evals(calls, unit: int) -> list[tuple[int, float]]:
    """(refine call, t) of each evaluation of ``unit`` at t = 0 or t = 1."""
    return [(k, float(tv)) for k, (u, t) in enumerate(calls) for tv in t[(u == unit) & ((t == 0) | (t == 1))]]


@pytest.mark.parametrize("tol", [1e-6, 1e-9, 1e-12])
@pytest.mark.parametrize("kink", [0.123, 0.2, 0.45, 0.6, 0.875, (5**0.5 - 1) / 2])
def test_first_samples_locate_an_inner_kink_without_the_end_derivatives(kink, tol):
    """A kink between two Gauss nodes stands out among the first estimate's samples and accounts for its error, so
    h'(0), h'(1) are never evaluated: the plan costs exactly 2 evaluations less than from [0, 1] (the tangents meet
    exactly at the kink either way), and at most the 4 nodes, 3 probe pairs and one split (5)."""
    h, dh = _piecewise([[kink]])
    plain, first, exact, calls = _run_from_first(h, dh, 1, tol)
    assert _within(first, exact, tol).all()
    assert _end_evals(calls, 0) == []
    assert int(first.evals[0]) <= int(plain.evals[0]) - 2
    assert int(first.evals[0]) <= 4 + 2 * 3 + 5
    t = first.t[0][first.w[0] != 0]
    assert t.numel() == 4 and float((t - kink).abs().min()) >= 0.2 * min(kink, 1 - kink)


@pytest.mark.parametrize("kink", [0.01, 0.05, 0.95, 0.999])
def test_first_samples_with_a_kink_in_an_end_gap(kink):
    """No gap between Gauss nodes stands out for a kink in [0, x_1] or [x_n, 1]: h'(0) and h'(1) are evaluated in
    the first refine call, as without the samples, and the kink is bracketed in its end gap at once."""
    h, dh = _piecewise([[kink]])
    for tol in (1e-6, 1e-12):
        plain, first, exact, calls = _run_from_first(h, dh, 1, tol)
        assert _within(first, exact, tol).all()
        assert _end_evals(calls, 0) == [(0, 0.0), (0, 1.0)]
        assert int(first.evals[0]) <= int(plain.evals[0])


@pytest.mark.parametrize("at_kink", ["left", "right", "mean"])
@pytest.mark.parametrize("q", [0, 1, 2, 3])
def test_first_samples_with_a_kink_on_a_gauss_node(q, at_kink):
    """A kink exactly on node x_q (h' there from one side or the mean): the tangents of the steepest gap meet at the
    node, so the bracket takes in the neighbouring gap (the end derivative is evaluated where that gap is an end
    gap); no panel node lands on the kink and it costs no more than starting from [0, 1]."""
    kink = float(rule_nodes("gauss-legendre", 4)[0][q])
    h, dh = _piecewise([[kink]], at_kink=at_kink)
    for tol in (1e-6, 1e-12):
        plain, first, exact, calls = _run_from_first(h, dh, 1, tol)
        assert _within(first, exact, tol).all()
        assert int(first.evals[0]) <= int(plain.evals[0])
        t = first.t[0][first.w[0] != 0]
        assert t.numel() == 4 and float((t - kink).abs().min()) >= 0.2 * min(kink, 1 - kink)
        if q in (1, 2) and at_kink != "mean":  # one steep inner gap: h'(0), h'(1) are not needed
            assert _end_evals(calls, 0) == []


def _two_kinks(c1: float, j1: list[float], c2: float, j2: list[float]):
    """``h(t) = m t + J1 relu(t - c1) + J2 relu(t - c2)`` for every unit (outputs: the entries of the jumps)."""
    m = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    J1, J2 = torch.tensor(j1, dtype=torch.float64), torch.tensor(j2, dtype=torch.float64)

    def h(t, u):
        t = t[:, None]
        return m * t + J1 * torch.relu(t - c1) + J2 * torch.relu(t - c2)

    def dh(t, u):
        t = t[:, None]
        return m + J1 * (t > c1).double() + J2 * (t > c2).double()

    return h, dh


def test_first_samples_fetch_a_missing_end_derivative_when_a_side_needs_it():
    """A large inner kink (0.45) accounts for the first estimate's error; the small one in [x_4, 1] (0.97) shows once
    the side [c, 1] fails with flat known gaps: h'(1) is evaluated then (one evaluation, a later refine call), h'(0)
    never. Without the samples both are evaluated first, so one evaluation is saved."""
    h, dh = _two_kinks(0.45, [1.0, -2.0, 0.5], 0.97, [1e-3, 2e-3, -1e-3])
    plain, first, exact, calls = _run_from_first(h, dh, 1, 1e-9)
    assert _within(first, exact, 1e-9).all() and _within(plain, exact, 1e-9).all()
    ends = _end_evals(calls, 0)
    assert len(ends) == 1 and ends[0][1] == 1.0 and ends[0][0] > 0
    assert int(first.evals[0]) <= int(plain.evals[0]) - 1
    assert int((first.w[0] != 0).sum()) == 6  # three straight pieces, one open 2-node panel each


@pytest.mark.parametrize("kinks", [[0.2, 0.45, 0.5, 0.8], [0.3, 0.3 + 1e-7], [0.02, 0.1, 0.97], [0.2, 0.96],
                                   [0.04, 0.6], [0.4, 0.97]])
def test_first_samples_with_several_kinks(kinks):
    """As from [0, 1] (:func:`test_several_kinks_in_one_panel`): each kink costs at most a location, a split and
    the failed test of the piece still holding the others, and each straight piece ends as one 2-node panel (two
    when a split falls between kinks closer than its predicted location error)."""
    h, dh = _piecewise([kinks])
    plain, first, exact, _ = _run_from_first(h, dh, 1, 1e-9)
    assert _within(first, exact, 1e-9).all()
    K = len(kinks)
    assert int(first.evals[0]) <= 6 + 14 * K
    close = min(b - a for a, b in zip(kinks, kinks[1:])) < 1e-3
    assert int((first.w[0] != 0).sum()) == 2 * (K + 1) or (close and int((first.w[0] != 0).sum()) == 2 * (K + 2))


def test_first_samples_leave_smooth_units_untouched():
    h, dh = _piecewise([[], [0.4], [], [0.1, 0.7], []])
    plain, first, exact, calls = _run_from_first(h, dh, 5, 1e-10)
    assert _within(first, exact, 1e-10).all()
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    for u in (0, 2, 4):
        assert int(first.evals[u]) == 4
        assert not any(bool((c_u == u).any()) for c_u, _ in calls)
        keep = first.w[u] != 0
        torch.testing.assert_close(first.t[u][keep], x, rtol=0, atol=0)
        torch.testing.assert_close(first.w[u][keep], w, rtol=0, atol=0)
        torch.testing.assert_close(first.estimate[u], plain.estimate[u], rtol=0, atol=0)


@pytest.mark.parametrize("coarsen", [False, True])
@pytest.mark.parametrize("tol", [1e-7, 1e-11])
def test_first_samples_on_random_paths(tol, coarsen):
    """Random piecewise linear paths with 0-3 kinks: every unit meets its tolerance, and starting from the samples
    saves 2 evaluations per failing unit on average (h'(0), h'(1) wherever a kink stands out between nodes, and
    probes in a narrower first bracket)."""
    gen = torch.Generator().manual_seed(3)
    kinks = [torch.rand(int(n), generator=gen).tolist() for n in torch.randint(0, 4, (40,), generator=gen)]
    h, dh = _piecewise(kinks, n_out=2, seed=1)
    plain, first, exact, _ = _run_from_first(h, dh, len(kinks), tol, coarsen=coarsen)
    assert _within(first, exact, tol).all()
    failing = plain.evals > 4
    assert int(failing.sum()) > 10
    assert int((plain.evals - first.evals)[failing].sum()) >= 2 * int(failing.sum())


@pytest.mark.parametrize("nodes", [2, 3, 6])
def test_first_samples_with_other_node_counts(nodes):
    gen = torch.Generator().manual_seed(5)
    kinks = [torch.rand(int(n), generator=gen).tolist() for n in torch.randint(0, 3, (12,), generator=gen)]
    h, dh = _piecewise(kinks, n_out=2, seed=2, curvature=0.3)
    _, first, exact, _ = _run_from_first(h, dh, len(kinks), 1e-9, nodes=nodes)
    assert _within(first, exact, 1e-9).all()


def test_first_samples_on_smooth_paths_failing_the_first_estimate():
    h, dh = _smooth_oscillating()
    for tol in (1e-6, 1e-11):
        _, first, exact, _ = _run_from_first(h, dh, 3, tol)
        assert _within(first, exact, tol).all()
        assert bool((first.evals > 4).all())


def test_first_samples_respect_the_caps():
    h, dh = _piecewise([[0.3], [0.1, 0.2, 0.6]], curvature=1.0)
    _, first, _, _ = _run_from_first(h, dh, 2, 1e-12, max_depth=3)  # at most the end derivatives and two levels
    assert bool((first.evals <= 4 + 2 + 9 + 2 * 9).all())
    _, first, _, _ = _run_from_first(h, dh, 2, 1e-12, max_evals=12)
    assert bool((first.evals <= 11 + 2 * 9).all())


def test_first_samples_must_match_the_rule():
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    U, O = 3, 2
    est0, g = torch.zeros(U, O, dtype=torch.float64), torch.ones(U, O, dtype=torch.float64)
    hx = torch.zeros(U, 4, O, dtype=torch.float64)

    def refine(u, t):
        raise AssertionError("not reached")

    with pytest.raises(ConfigError, match=r"h, h' \(3, 4, 2\).*got shapes \(4,\), \(3, 3, 2\)"):
        adaptive_plan(est0, g, g + 1, refine, tol=1e-7, first=(x, hx[:, :3], hx))
    even = torch.linspace(0.1, 0.9, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"the 4 Gauss-Legendre nodes on \[0, 1\].*rule_nodes\('gauss-legendre', 4\)"):
        adaptive_plan(est0, g, g + 1, refine, tol=1e-7, first=(even, hx, hx))
