"""The adaptive rule on kink-dense paths: the composite midpoint fallback (explaind/kernel/dense.py).

Units are synthetic paths ``h(t) = sum_i a_i relu(t - c_i) + sin(3 t)`` with thousands of kinks (a ReLU-dense
network's path) next to units with one kink; the expected numbers are computed here from the formulas, and the
rule's weights by a plain loop over the gaps between nodes (``_cut_reference``).
"""

from __future__ import annotations

import math

import pytest
import torch

from explaind.kernel import dense
from explaind.kernel.adaptive import adaptive_plan
from explaind.kernel.quadrature import rule_nodes

pytestmark = pytest.mark.usefixtures("one_thread")


def _coefficients(kinks: list[int], seed: int = 0):
    """Kink positions ``c (U, K)`` and slope jumps ``a (U, K)`` of the paths (zero jumps pad)."""
    gen = torch.Generator().manual_seed(seed)
    K = max(kinks)
    c = torch.rand(len(kinks), K, generator=gen, dtype=torch.float64)
    a = torch.randn(len(kinks), K, generator=gen, dtype=torch.float64) / max(K, 1) ** 0.5
    a[torch.arange(K)[None, :] >= torch.tensor(kinks)[:, None]] = 0
    return c, a


def _paths(kinks: list[int], seed: int = 0):
    """Units with ``kinks[u]`` kinks each (two outputs: h and -2h + t): ``h(t, u), h'(t, u)``."""
    c, a = _coefficients(kinks, seed)

    def h(t, u):
        v = (a[u] * torch.relu(t[:, None] - c[u])).sum(-1) + torch.sin(3 * t)
        return torch.stack([v, -2 * v + t], -1)

    def dh(t, u):
        v = (a[u] * (t[:, None] > c[u]).double()).sum(-1) + 3 * torch.cos(3 * t)
        return torch.stack([v, -2 * v + 1], -1)

    return h, dh


def _plan(kinks, tol=1e-7, shared=None, samples=True):
    h, dh = _paths(kinks)
    U = len(kinks)
    units = torch.arange(U)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    d0 = torch.stack([dh(x[q].expand(U), units) for q in range(4)], 1)
    est0 = torch.einsum("q,uqo->uo", w, d0)
    h0 = torch.stack([h(x[q].expand(U), units) for q in range(4)], 1)
    zero, one = torch.zeros(U, dtype=torch.float64), torch.ones(U, dtype=torch.float64)
    plan = adaptive_plan(est0, h(zero, units), h(one, units), lambda u, t: (h(t, u), dh(t, u)), tol=tol,
                         first=(x, h0, d0) if samples else None, shared=shared)
    return plan, h, dh


def _kink_bound(kinks, u: int, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Most a rule with nodes ``t`` in consecutive cells of widths ``w`` can err by on unit ``u``, per output.

    A kink at ``c`` with jump ``a`` in the cell ``[l, r]`` of node ``m`` errs by ``a ((r - l) [m > c] - (r - c))``,
    at most ``|a| max(m - l, r - m)``; the smooth part ``3 cos(3t)`` (output 0) and ``-6 cos(3t) + 1``
    (output 1) errs by an amount computed here exactly.
    """
    c, a = _coefficients(kinks)
    r = torch.cumsum(w, 0)
    left = r - w
    cell = torch.searchsorted(r, c[u]).clamp_max(t.numel() - 1)
    reach = torch.maximum(t - left, r - t)[cell]
    kink = (a[u].abs() * reach).sum()
    smooth = (w * 3 * torch.cos(3 * t)).sum() - torch.sin(torch.tensor(3.0, dtype=torch.float64))
    return torch.stack([kink + smooth.abs(), 2 * kink + 2 * smooth.abs()])


def _midpoint(dh, u: int, n: int = dense.DENSE_EVALS) -> torch.Tensor:
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return dh(t, torch.full((n,), u)).mean(0)


def _dense_reference(dh, u: int, n: int = dense.DENSE_EVALS):
    """The ``n``-cell midpoint rule through the Gauss–Legendre nodes on unit ``u`` by a loop: nodes, weights, estimate.

    The cells are built here from the rule's definition: 4 cells of width 1/n centred on the nodes, the 5 gaps
    between them cut into equal cells, ``n - 4`` in all, in proportion to their lengths (largest remainders).
    """
    x = [float(v) for v in rule_nodes("gauss-legendre", 4)[0]]
    edges = [0.0] + [e for v in x for e in (v - 0.5 / n, v + 0.5 / n)] + [1.0]
    gaps = [(edges[2 * j], edges[2 * j + 1]) for j in range(5)]
    share = [(n - 4) * (b - a) / (1 - 4 / n) for a, b in gaps]
    counts = [int(v) for v in share]
    for j in sorted(range(5), key=lambda j: counts[j] - share[j])[:n - 4 - sum(counts)]:
        counts[j] += 1
    t, w = [], []
    for j, (a, b) in enumerate(gaps):
        t += [a + (i + 0.5) * (b - a) / counts[j] for i in range(counts[j])]
        w += [(b - a) / counts[j]] * counts[j]
        if j < 4:
            t.append(x[j])
            w.append(1 / n)
    t, w = torch.tensor(t, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
    return t, w, sum(float(w[q]) * dh(t[q:q + 1], torch.tensor([u]))[0] for q in range(t.numel()))


def _cut_reference(h, dh, u: int, t: torch.Tensor, w: torch.Tensor):
    """The cells ``w`` of the nodes ``t`` cut at kinks, on unit ``u``, by a loop over the gaps: weights and estimate.

    Gap ``[a, b]`` (length ``L``, exact integral ``I`` from ``h``) is cut at ``a + v``: ``v`` where the tangents at
    ``a`` and ``b`` meet (least squares over the two outputs, clipped to the gap) if that errs less there than the
    cells' own cut, else the cells' cut; ``[0, t_1]`` and ``[t_n, 1]`` go to their node. The unit keeps the cut
    weights if their estimate errs no more than the cells' (largest error over outputs).
    """
    n, one = t.numel(), torch.tensor([u])
    H = [h(t[q:q + 1], one)[0].tolist() for q in range(n)]
    D = [dh(t[q:q + 1], one)[0].tolist() for q in range(n)]
    exact = (h(torch.ones(1, dtype=torch.float64), one) - h(torch.zeros(1, dtype=torch.float64), one))[0].tolist()
    tt, cell = t.tolist(), w.tolist()
    weights = [0.0] * n
    weights[0] += tt[0]
    weights[-1] += 1 - tt[-1]
    edge = 0.0
    for q in range(n - 1):
        edge += cell[q]
        a, b = tt[q], tt[q + 1]
        L, given = b - a, edge - a
        I = [H[q + 1][o] - H[q][o] for o in range(2)]
        num = sum((D[q + 1][o] - D[q][o]) * (D[q + 1][o] * L - I[o]) for o in range(2))
        den = sum((D[q + 1][o] - D[q][o]) ** 2 for o in range(2))
        fit = min(max(num / den, 0.0), L) if den > 0 else given

        def miss(v, q=q, L=L, I=I):
            return max(abs(D[q][o] * v + D[q + 1][o] * (L - v) - I[o]) for o in range(2))

        v = fit if miss(fit) < miss(given) else given
        weights[q] += v
        weights[q + 1] += L - v
    est_cut = [sum(weights[q] * D[q][o] for q in range(n)) for o in range(2)]
    est_cells = [sum(cell[q] * D[q][o] for q in range(n)) for o in range(2)]
    if max(abs(e - x) for e, x in zip(est_cut, exact)) <= max(abs(e - x) for e, x in zip(est_cells, exact)):
        return torch.tensor(weights, dtype=torch.float64), torch.tensor(est_cut, dtype=torch.float64)
    return w, torch.tensor(est_cells, dtype=torch.float64)


def _check_rule(plan, h, dh, u: int, cells: int, samples: bool = True):
    """Unit ``u`` took the rule of ``cells`` cells: its nodes, weights and estimate against the loop references."""
    if samples:
        t_ref, w_ref, _ = _dense_reference(dh, u, cells)
    else:
        t_ref, w_ref = (torch.tensor(v) for v in rule_nodes("midpoint", cells))
    w_cut, est = _cut_reference(h, dh, u, t_ref, w_ref)
    torch.testing.assert_close(plan.t[u][:cells], t_ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(plan.w[u][:cells], w_cut, rtol=0, atol=1e-13)
    assert not bool(plan.w[u][cells:].any())
    torch.testing.assert_close(plan.estimate[u], est, rtol=0, atol=1e-12)
    cells_err = (sum(w_ref[q] * dh(t_ref[q:q + 1], torch.tensor([u]))[0] for q in range(cells)) - plan.exact[u])
    assert float((plan.estimate[u] - plan.exact[u]).abs().max()) <= float(cells_err.abs().max()) + 1e-12


def _at_rule(plan, units):
    """Units of ``units`` that took the rule without refinement: the most common evaluation count above 4."""
    counts = [int(plan.evals[u]) for u in units if int(plan.evals[u]) > 4]
    common = max(set(counts), key=counts.count)
    return [u for u in units if int(plan.evals[u]) == common]


def _budget_kept(plan, failing, cells: int) -> bool:
    """The batch spent ``DENSE_EVALS`` per failing unit at most, or its rule has the fewest cells allowed."""
    spent = float(plan.evals[failing].double().mean())
    return spent <= dense.DENSE_EVALS or cells == math.ceil(dense.GRID_FLOOR * dense.DENSE_EVALS)


def _one_kink_ok(plan, u: int) -> bool:
    """Within tolerance, or stopped at the batch's budget below the level the kink-dense test calls far."""
    err = (plan.estimate[u] - plan.exact[u]).abs().max()
    scale = plan.exact[u].abs().max()
    if float(err) <= 1e-7 * float(scale) + 1e-13:
        return True
    return int(plan.evals[u]) <= dense.DENSE_EVALS and float(err) <= dense.DENSE_REL * float(scale)


def test_kink_dense_units_get_the_midpoint_rule_and_few_kink_units_keep_their_tolerance():
    kinks = [3000] * 12 + [1] * 4
    plan, h, dh = _plan(kinks)
    exact = plan.exact
    for u, k in enumerate(kinks):
        keep = plan.w[u] != 0
        t, w = plan.t[u][keep], plan.w[u][keep]
        recon = (w[:, None] * dh(t, torch.full((int(keep.sum()),), u))).sum(0)
        torch.testing.assert_close(recon, plan.estimate[u], rtol=0, atol=1e-12)  # the nodes give the estimate
        err = (plan.estimate[u] - exact[u]).abs()
        if k > 1:  # the midpoint rule through the first estimate's nodes, or panels erring less; reported, not hidden
            assert float(err.max()) > 1e-7 * float(exact[u].abs().max())
            # refined until the batch is found kink-dense (a level or two past DENSE_AFTER), then the rule's new nodes
            assert int(plan.evals[u]) <= 3 * dense.DENSE_EVALS
        else:  # one kink: located, within tolerance, or stopped at the budget and not far
            assert _one_kink_ok(plan, u)


def test_after_a_probe_where_every_unit_is_far_the_others_spend_the_rule_s_evaluations_and_no_more():
    """Beyond the probe, far units take the rule at once, through the first estimate's nodes, with the cells the
    batch's budget leaves (DENSE_EVALS per failing unit, at least GRID_FLOOR of them). Loop references: the rule's
    nodes, weights and estimate, the plain midpoint rule's error."""
    kinks = [3000] * 64
    plan, h, dh = _plan(kinks)
    evals, exact = plan.evals, plan.exact
    probe = dense.probe_positions(len(kinks)).tolist()
    assert len(probe) == dense.PROBE_UNITS
    rest = [u for u in range(len(kinks)) if u not in probe]
    at_rule = _at_rule(plan, rest)
    assert len(at_rule) >= 0.9 * len(rest)  # a few may look like one kink between the first nodes: refined
    cells = int(evals[at_rule[0]])
    assert all(int(evals[u]) == cells for u in at_rule)
    assert _budget_kept(plan, list(range(len(kinks))), cells)
    assert int(evals[probe].max()) <= 3 * dense.DENSE_EVALS
    err = (plan.estimate - exact).abs().amax(-1)
    for u in at_rule[::4]:
        _check_rule(plan, h, dh, u, cells)
    mid = torch.stack([(_midpoint(dh, u) - exact[u]).abs().max() for u in at_rule])
    ratio = float(err[at_rule].mean() / mid.mean())
    assert ratio < 0.5, ratio  # the paths' kinks move both outputs alike: the cut cells remove most of the error


def test_a_large_kink_dense_batch_spends_the_rule_s_budget_at_the_midpoint_rule_s_error():
    """With many units beyond the probe, the batch spends at most DENSE_EVALS per unit on average (the probe's
    refinement taken from the others' cells) below the plain 100-point midpoint rule's error (loop reference)."""
    kinks = [1000] * 200
    plan, h, dh = _plan(kinks)
    evals, exact = plan.evals, plan.exact
    assert float(evals.double().mean()) <= dense.DENSE_EVALS
    at_rule = _at_rule(plan, range(len(kinks)))
    assert len(at_rule) >= 0.9 * (len(kinks) - dense.PROBE_UNITS)
    cells = int(evals[at_rule[0]])
    assert math.ceil(dense.GRID_FLOOR * dense.DENSE_EVALS) <= cells < dense.DENSE_EVALS
    for u in at_rule[::20]:
        _check_rule(plan, h, dh, u, cells)
    err = (plan.estimate - exact).abs().amax(-1)
    mid = torch.stack([(_midpoint(dh, u) - exact[u]).abs().max() for u in range(len(kinks))])
    ratio = float(err.mean() / mid.mean())
    assert ratio < 0.5, ratio


def test_a_probe_with_few_kink_units_keeps_the_others_refining_until_tested():
    """When some probe units are not far, every other unit is refined and tested after DENSE_AFTER evaluations:
    one-kink units end within tolerance or, at the budget, not far; far units still get the midpoint rule."""
    kinks = [3000] * 60 + [1] * 12
    plan, _, dh = _plan(kinks)
    err = (plan.estimate - plan.exact).abs().amax(-1)
    scale = plan.exact.abs().amax(-1)
    for u, k in enumerate(kinks):
        if k == 1:
            assert _one_kink_ok(plan, u)
        else:
            assert float(err[u]) > 1e-7 * float(scale[u])
            assert int(plan.evals[u]) <= 3 * dense.DENSE_EVALS


def test_without_the_first_samples_the_far_units_get_the_plain_midpoint_grid_cut_at_kinks():
    kinks = [3000] * 40
    plan, h, dh = _plan(kinks, samples=False)
    probe = dense.probe_positions(len(kinks)).tolist()
    rest = [u for u in range(len(kinks)) if u not in probe]
    cells = int(plan.evals[rest[0]]) - 4  # the first estimate's 4 evaluations are not reused without samples
    assert math.ceil(dense.GRID_FLOOR * dense.DENSE_EVALS) <= cells <= dense.DENSE_EVALS
    assert _budget_kept(plan, list(range(len(kinks))), cells)
    for u in rest:
        _check_rule(plan, h, dh, u, cells, samples=False)
        assert int(plan.evals[u]) == 4 + cells


@pytest.mark.parametrize("spent, failing, takers, m, want", [
    (1000 + 80 * 4, 80, 64, 4, 100),  # (100 * 80 - 1320) // 64 = 104 new: capped at 100 cells
    (16 * 150 + 384 * 4, 400, 384, 4, 97),  # (40000 - 3936) // 384 = 93 new + 4
    (16 * 150 + 48 * 4, 64, 48, 4, 90),  # (6400 - 2592) // 48 = 79 new + 4 = 83: the floor, 90
    (0, 10, 10, 0, 100),
])
def test_grid_cells_spend_the_batch_budget(spent, failing, takers, m, want):
    assert dense.grid_cells(spent, failing, takers, m, 100) == want


@pytest.mark.parametrize("x, n", [([0.0694318442, 0.3300094782, 0.6699905218, 0.9305681558], 100),
                                  ([0.3, 0.42], 10), ([0.06, 0.5], 10), ([], 7)])
def test_dense_rule_cells_partition_the_segment_with_the_given_nodes_inside(x, n):
    t, w, known = dense.dense_rule(torch.tensor(x, dtype=torch.float64), n)
    assert t.numel() == w.numel() == n and bool((t[1:] > t[:-1]).all()) and bool((w > 0).all())
    r = torch.cumsum(w, 0)
    assert float(r[-1]) == pytest.approx(1.0, abs=1e-14)
    assert bool(((t >= r - w) & (t <= r)).all())  # each node in its own cell
    assert t[known].tolist() == pytest.approx(x, abs=0)
    new = ~known
    torch.testing.assert_close(t[new], (r - w / 2)[new], rtol=0, atol=1e-14)  # new nodes centred
    assert float(w.max()) <= 2.0 / n and float(w[new].min()) >= 0.5 / n


def test_without_the_fallback_the_same_units_run_to_the_cap(monkeypatch):
    """dense_after=0 switches the fallback off: the rule spends far more and ends no closer than midpoint-100."""
    import explaind.kernel.adaptive as adaptive

    monkeypatch.setattr(adaptive, "MAX_EVALS", 800)
    kinks = [3000] * 10
    h, dh = _paths(kinks)
    plan_on, _, _ = _plan(kinks)
    U = len(kinks)
    units = torch.arange(U)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    est0 = torch.einsum("q,uqo->uo", w, torch.stack([dh(x[q].expand(U), units) for q in range(4)], 1))
    zero, one = torch.zeros(U, dtype=torch.float64), torch.ones(U, dtype=torch.float64)
    plan_off = adaptive_plan(est0, h(zero, units), h(one, units), lambda u, t: (h(t, u), dh(t, u)), tol=1e-7,
                             dense_after=0, max_evals=800)
    assert int(plan_off.evals.min()) >= 800 > int(plan_on.evals.max())


def test_shared_nodes_give_the_same_plan_as_pointwise_evaluation():
    """The engine's ``shared`` evaluation (every unit at common nodes) and the default agree."""
    kinks = [2000] * 10
    _, dh = _paths(kinks)

    h, _ = _paths(kinks)

    def shared(units, t):
        at = [torch.full_like(t, int(u), dtype=torch.long) for u in units]
        return torch.stack([h(t, a) for a in at]), torch.stack([dh(t, a) for a in at])

    a, _, _ = _plan(kinks)
    b, _, _ = _plan(kinks, shared=shared)
    torch.testing.assert_close(a.estimate, b.estimate, rtol=0, atol=1e-13)
    torch.testing.assert_close(a.t, b.t)
    torch.testing.assert_close(a.w, b.w)


@pytest.mark.parametrize("nbytes", [1, 1 << 14])  # 2 nodes per chunk (the floor); 512 / K nodes (K takers, 2 outputs)
def test_cells_cut_in_chunks_of_nodes_give_the_same_plan(monkeypatch, nbytes):
    """``cut_cells`` evaluates the nodes in chunks (``SHARED_NODES_BYTES``): the gaps across chunks are cut alike."""
    kinks = [3000] * 40
    whole, h, dh = _plan(kinks)
    monkeypatch.setattr(dense, "SHARED_NODES_BYTES", nbytes)
    parts, _, _ = _plan(kinks)
    assert len(_at_rule(whole, range(len(kinks)))) > 0  # the rule ran (its grid spans several chunks)
    torch.testing.assert_close(parts.estimate, whole.estimate, rtol=0, atol=1e-13)  # summed in another order
    torch.testing.assert_close(parts.t, whole.t, rtol=0, atol=0)
    torch.testing.assert_close(parts.w, whole.w, rtol=0, atol=1e-13)
    torch.testing.assert_close(parts.evals, whole.evals, rtol=0, atol=0)


def test_a_few_far_units_are_left_to_the_adaptive_rule():
    """Fewer than DENSE_MIN far units: no fallback (a unit with a few kinks may be among them); the far units
    wait for the test while others refine and go on untested when none is left."""
    kinks = [3000] * (dense.DENSE_MIN - 1)
    plan, _, _ = _plan(kinks)
    assert int(plan.evals.min()) > 4 * dense.DENSE_EVALS


def test_dense_rule_without_room_for_the_nodes_is_the_plain_midpoint_rule():
    t, w, known = dense.dense_rule(torch.tensor([0.3, 0.31], dtype=torch.float64), 10)
    want_t, want_w = (torch.tensor(v) for v in rule_nodes("midpoint", 10))
    torch.testing.assert_close(t, want_t, rtol=0, atol=1e-15)
    torch.testing.assert_close(w, want_w, rtol=0, atol=1e-15)
    assert not bool(known.any())
