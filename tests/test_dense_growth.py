"""The kink-dense grids grow where the shared budget would err more than the 100-point midpoint rule.

``dense.dense_fallback`` shares :data:`~explaind.kernel.dense.GRID_EVALS` evaluations per unit over a batch's
steps, counting on the cells cut at kinks to err less than the 100-point midpoint rule at fewer nodes. Where the
cut cannot help (many kinks per gap whose jumps move the outputs differently), the grids gain nodes until the
rule is expected to beat the midpoint rule (docs/engine.md, section 2). Expected values are worked out by hand;
the estimates and the midpoint rule are checked against plain loops over the path's kinks.
"""

from __future__ import annotations

import math

import pytest
import torch

from explaind.kernel import dense
from explaind.kernel.dense_grid import half_cells, refined_grid
from explaind.kernel.quadrature import rule_nodes


def test_refined_grid_adds_nodes_in_the_middle_of_the_worst_gaps_with_cells_cut_midway():
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    s, w, known = refined_grid(t, torch.tensor([1.0, 3.0], dtype=torch.float64), 1)
    # the second gap scores higher: a node at 0.625; cells cut at 0.375, 0.5625, 0.6875, the ends to their node
    torch.testing.assert_close(s, torch.tensor([0.25, 0.5, 0.625, 0.75], dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(w, torch.tensor([0.375, 0.1875, 0.125, 0.3125], dtype=torch.float64), rtol=0,
                               atol=1e-15)
    assert known.tolist() == [True, True, False, True]


def test_refined_grid_adds_at_most_one_node_per_gap():
    t = torch.tensor([0.2, 0.6], dtype=torch.float64)
    s, w, known = refined_grid(t, torch.tensor([1.0], dtype=torch.float64), 5)
    assert s.tolist() == [0.2, 0.4, 0.6] and known.tolist() == [True, False, True]
    assert abs(float(w.sum()) - 1) < 1e-15


def test_half_cells_weigh_every_other_node_with_cells_cut_midway():
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    # nodes 0.1, 0.5, 0.9: cells [0, 0.3], [0.3, 0.7], [0.7, 1]
    torch.testing.assert_close(half_cells(t), torch.tensor([0.3, 0, 0.4, 0, 0.3], dtype=torch.float64), rtol=0,
                               atol=1e-15)


def _cut(err, cells, half):
    z = torch.zeros(len(err), dtype=torch.float64)
    return dense.Cut(z, z, *(torch.tensor(v, dtype=torch.float64) for v in (err, cells, half)), z)


@pytest.mark.parametrize(("half_over_cells", "p"), [(2.0, 1.0), (4.0, 2.0), (1.0, 1.0), (8.0, 2.0)])
def test_shortfall_predicts_the_midpoint_rule_from_the_cells_order(half_over_cells, p):
    # the cells err by c at 50 nodes and by half_over_cells * c on every other node: order p (clipped to [1, 2]),
    # the 100-point rule about c (50 / 100)^p; the cut errs by e = c / 2 on one grid and c on the other
    cuts = [_cut([1.0], [2.0], [2.0 * half_over_cells]), _cut([3.0], [3.0], [3.0 * half_over_cells])]
    want = math.sqrt((1.0 + 9.0) / ((2.0 * 0.5 ** p) ** 2 + (3.0 * 0.5 ** p) ** 2))
    assert dense.shortfall(cuts, [50, 50], 100) == pytest.approx(want, rel=1e-12)


def test_shortfall_of_grids_without_error_is_one():
    assert dense.shortfall([_cut([0.0], [0.0], [0.0])], [40], 100) == 1.0


STEPS, PER, O, KINKS = dense.SHARE_STEPS, 4, 3, 1500


def _paths():
    """Per unit: kinks ``tau (U, K)``, jumps of h' ``J (U, K, O)`` (each output its own) and a base slope."""
    gen = torch.Generator().manual_seed(3)
    U = STEPS * PER
    tau = torch.rand(U, KINKS, generator=gen, dtype=torch.float64)
    size = (torch.arange(STEPS).repeat_interleave(PER).double() + 1)[:, None, None]  # later steps move more
    J = size * torch.randn(U, KINKS, O, generator=gen, dtype=torch.float64) / KINKS
    base = torch.randn(U, O, generator=gen, dtype=torch.float64)
    return tau, J, base


def _at(tau, J, base, u, t):
    """h and h' of unit ``u`` at the points ``t (Q,)``: h' = base + sum of the jumps before t."""
    past = (t[:, None] - tau[u][None, :]).clamp_min(0)  # (Q, K)
    return base[u] * t[:, None] + past @ J[u], base[u] + (past > 0).double() @ J[u]


def _fallback(paths):
    tau, J, base = paths
    U, m = STEPS * PER, 4
    x, wx = (torch.tensor(v, dtype=torch.float64) for v in rule_nodes("gauss-legendre", m))
    vals = [_at(tau, J, base, u, x) for u in range(U)]
    h, d = torch.stack([v[0] for v in vals]), torch.stack([v[1] for v in vals])
    g_a = torch.zeros(U, O, dtype=torch.float64)
    g_b = torch.stack([_at(tau, J, base, u, torch.ones(1, dtype=torch.float64))[0][0] for u in range(U)])
    need = (torch.einsum("q,uqo->uo", wx, d) - g_b).abs().amax(-1)

    def shared(units, t):
        out = [_at(tau, J, base, int(u), t) for u in units]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    every = torch.arange(U)
    steps = torch.arange(STEPS).repeat_interleave(PER)
    fb = dense.dense_fallback(every, steps, every, torch.full((U,), m), shared, x, (h, d), g_a, g_b, need=need)
    return fb, g_b, m


def _midpoint_errors(paths, g_b):
    """The 100-point midpoint rule's error of every unit, by a loop over its cells."""
    tau, J, base = paths
    out = []
    for u in range(g_b.shape[0]):
        est = torch.zeros(O, dtype=torch.float64)
        for i in range(100):
            t = (i + 0.5) / 100
            est += (base[u] + J[u][tau[u] < t].sum(0)) / 100
        out.append(float((est - g_b[u]).abs().max()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def paths():
    return _paths()


def test_grids_grow_to_beat_the_midpoint_rule_where_the_cut_cannot_help(paths, monkeypatch):
    fb, g_b, m = _fallback(paths)
    mid = _midpoint_errors(paths, g_b)
    per_unit = fb.new + m
    assert int(per_unit.sum()) <= dense.DENSE_EVALS * per_unit.numel()  # 100 per unit on average at most
    assert int(per_unit.sum()) > dense.GRID_EVALS * per_unit.numel()  # the grids grew
    rms = float(fb.err.pow(2).mean().sqrt())
    assert rms <= float(mid.pow(2).mean().sqrt())
    monkeypatch.setattr(dense, "SHORTFALL_TARGET", float("inf"))  # the same batch without growing
    before, _, _ = _fallback(paths)
    assert float(before.err.pow(2).mean().sqrt()) > float(mid.pow(2).mean().sqrt())  # the shared budget alone missed
    assert int((before.new + m).sum()) <= dense.GRID_EVALS * per_unit.numel()
    order = torch.argsort(before.unit)
    assert bool((fb.err[torch.argsort(fb.unit)] <= before.err[order] * (1 + 1e-12)).all())  # no unit errs more


def test_grown_grids_estimates_and_weights_against_a_loop(paths):
    tau, J, base = paths
    fb, g_b, _ = _fallback(paths)
    for k, u in enumerate(fb.unit.tolist()):
        sel = fb.node_unit == u
        t, w = fb.t[sel], fb.w[sel]
        assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-12
        assert bool((t[1:] > t[:-1]).all())
        est = torch.zeros(O, dtype=torch.float64)
        for tq, wq in zip(t.tolist(), w.tolist()):
            est += wq * (base[u] + J[u][tau[u] < tq].sum(0))
        torch.testing.assert_close(fb.est[k], est, rtol=0, atol=1e-12)
        assert abs(float((est - g_b[u]).abs().max()) - float(fb.err[k])) < 1e-12
