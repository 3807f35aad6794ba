"""The kink-dense rule's grid per step on a convolutional model: nodes shared by a step's inputs, step by step.

A small Conv2d + GroupNorm + ReLU network recorded for a few SGD steps; the fallback is forced on every unit
that misses its tolerance (``DENSE_RATIO = DENSE_REL = 0``: every such unit is far). References written here:
a plain loop over (step, input, node) with one forward-mode derivative each (``torch.autograd.forward_ad``, one
input at a time, the step's own parameters), and the grids rebuilt from ``dense_rule``. A fallback that gave a
unit the nodes or slopes of another step or input fails the first; one that mixed the steps' grids the second.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import explaind
from explaind.kernel import adaptive, dense
from explaind.kernel.autograd import AutogradEvaluator
from explaind.kernel.engine import PathEngine
from explaind.kernel.evaluate import Grid
from explaind.kernel.planning import window_plans
from explaind.kernel.quadrature import rule_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, INPUTS = 3, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.conv2, self.head = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.norm(self.conv(x))))).mean((2, 3)))


def _run():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(100, 1, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (100,), generator=gen)
    torch.manual_seed(1)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:80], y[:80]))
    with rec:
        for s in range(STEPS):
            idx = torch.arange(20 * s, 20 * (s + 1))
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory, X[80:80 + INPUTS]


def _slope(model, base, delta, t: float, x) -> torch.Tensor:
    r""":math:`h'(t)` of one input by forward-mode AD through the module at :math:`\theta_s + t\Delta\theta_s`."""
    with fwAD.dual_level():
        point = {n: fwAD.make_dual(base[n] + t * delta[n], delta[n]) for n in base}
        return fwAD.unpack_dual(functional_call(model, point, (x[None],))).tangent[0]


@pytest.fixture(scope="module")
def recorded():
    return _run()


def _every_unit_dense(traj, X, monkeypatch):
    """An engine on ``traj`` whose kink-dense test finds every failing unit far; its inputs and explained outputs."""
    monkeypatch.setattr(dense, "DENSE_RATIO", 0.0)
    monkeypatch.setattr(dense, "DENSE_REL", 0.0)
    monkeypatch.setattr(adaptive, "DENSE_MIN", 1)
    eng = PathEngine(traj, device=torch.device("cpu"), dtype=torch.float64, chunk_size=None)
    Xc = eng.inputs(X)
    return eng, Xc, eng.explained(Xc, None, None, "test")


def test_every_unit_s_estimate_is_its_own_step_and_input_s_weighted_slopes(recorded, monkeypatch):
    model, traj, X = recorded
    eng, Xc, ex = _every_unit_dense(traj, X, monkeypatch)
    assert eng.evaluator.per_node  # a convolutional model on the CPU: grids one call per (step, node)
    with pytest.warns(explaind.exceptions.ExplaindWarning):
        _, _, plans, _ = window_plans(eng, Xc, ex, (0, STEPS), "adaptive", None, 1e-12, with_estimate=True)
    names = [n for n, _ in model.named_parameters()]
    thetas = [{n: traj.params(s)[n].to(torch.float64) for n in names} for s in range(STEPS + 1)]
    gl = torch.tensor(rule_nodes("gauss-legendre", 4)[0])
    took = 0
    for s, plan in enumerate(plans):
        delta = {n: thetas[s + 1][n] - thetas[s][n] for n in names}
        grids = set()
        for i in range(INPUTS):
            nodes = plan.t[i][(plan.t[i] > 0) | (plan.w[i] != 0)]
            total = sum(w * _slope(model, thetas[s], delta, t, X[i]) for t, w in
                        zip(nodes.tolist(), plan.w[i][:nodes.numel()].tolist()))
            torch.testing.assert_close(plan.estimate[i], total, rtol=0, atol=1e-12)
            cells = nodes.numel()
            t_ref, _, _ = dense.dense_rule(gl, cells)
            if nodes.numel() >= 0.9 * dense.DENSE_EVALS and torch.equal(nodes, t_ref):
                took += 1
                grids.add(tuple(nodes.tolist()))
                w = plan.w[i][:cells]
                assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-13
        assert len(grids) <= 1  # one grid per step, shared by the step's inputs
    assert took >= STEPS * INPUTS - dense.PROBE_UNITS  # the fallback ran beyond the probe


def test_grid_cells_per_step_spend_each_step_s_budget():
    """Two steps of units, one with a costly probe unit: only its step's grid shrinks, each from its own budget."""
    U, m, O = 12, 4, 2
    steps = torch.arange(2).repeat_interleave(6)
    evals = torch.full((U,), m)
    evals[1] = 160  # a probe unit of step 0 spent 156 beyond the first estimate
    x = torch.tensor(rule_nodes("gauss-legendre", m)[0])
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(U, m, O, generator=gen, dtype=torch.float64)
    d = torch.randn(U, m, O, generator=gen, dtype=torch.float64)
    calls = []

    def shared(units, t):
        calls.append((units.clone(), t.clone()))
        k = torch.stack([torch.sin(t * (u + 1)) for u in units.tolist()])  # (K, Q)
        return torch.stack([k, -k], -1), torch.stack([k + 1, k - 1], -1)

    cand = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])  # unit 1 (the probe unit) kept its panels
    fb = dense.dense_fallback(cand, steps, torch.arange(U), evals, shared, x, (h, d), h[:, 0] * 0, h[:, 0] * 0 + 1)
    want = {0: dense.grid_cells(160 + 5 * m, 6, 5, m), 1: dense.grid_cells(6 * m, 6, 6, m)}
    assert want[0] < want[1] == dense.DENSE_EVALS
    for units, t in calls:  # each call holds the units of one step, at that step's new nodes
        g = int(steps[units[0]])
        assert bool((steps[units] == g).all())
        t_ref, _, known = dense.dense_rule(x, want[g])
        torch.testing.assert_close(t, t_ref[~known], rtol=0, atol=0)
    for u, new in zip(fb.unit.tolist(), fb.new.tolist()):
        assert new == want[int(steps[u])] - m
        assert int((fb.node_unit == u).sum()) == want[int(steps[u])]


def test_grids_one_call_per_node_equal_the_vmap_over_nodes(recorded):
    _, traj, X = recorded
    eng = PathEngine(traj, device=torch.device("cpu"), dtype=torch.float64, chunk_size=None, factored="never")
    ev = eng.evaluator
    assert isinstance(ev, AutogradEvaluator) and ev.per_node
    ex = eng.explained(eng.inputs(X), None, None, "test")
    stack = eng.stack(0, STEPS, eng.inputs(X), ex)
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    ev.rows_chunk = 3  # inputs in chunks too
    per_node = ev.slopes(stack, Grid(t))
    ev.per_node = False
    batched = ev.slopes(stack, Grid(t))
    for a, b in zip(per_node, batched):
        assert a.shape == (STEPS * INPUTS, 3, 3)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_models_without_convolutions_keep_the_vmap_over_nodes():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        rec.log_batch(torch.arange(8))
        opt.step()
    eng = PathEngine(rec.trajectory, device=torch.device("cpu"), dtype=torch.float64, chunk_size=None,
                     factored="never")
    assert not eng.evaluator.per_node


def test_weighted_jvps_one_call_per_node_equal_the_vmap_over_nodes(recorded):
    """The decompositions' JVPs at shared nodes (``Evaluator.jvp``) take the same per-node path on conv models."""
    from explaind.kernel.evaluate import Segment
    from explaind.kernel.quadrature import fixed_plan

    model, traj, X = recorded
    eng = PathEngine(traj, device=torch.device("cpu"), dtype=torch.float64, chunk_size=None, factored="never")
    ev = eng.evaluator
    Xc = eng.inputs(X)
    ex = eng.explained(Xc, None, None, "test")
    seg = Segment(eng.params(1), eng.delta(1), Xc, ex)
    plan = fixed_plan("gauss-legendre", 3, torch.zeros(INPUTS, 3, dtype=torch.float64))
    gen = torch.Generator().manual_seed(2)
    tangents = {n: torch.randn(2, *v.shape, generator=gen, dtype=torch.float64) for n, v in seg.delta.items()}
    per_node = ev.jvp(seg, plan, tangents)
    ev.per_node = False
    torch.testing.assert_close(per_node, ev.jvp(seg, plan, tangents), rtol=0, atol=1e-13)
    for i in (0, INPUTS - 1):  # one input, one tangent, by forward-mode AD at each node
        want = sum(w * _slope(model, {n: seg.base[n] + t * seg.delta[n] for n in seg.delta},
                              {n: v[1] for n, v in tangents.items()}, 0.0, X[i])
                   for t, w in zip(plan.t[i].tolist(), plan.w[i].tolist()))
        torch.testing.assert_close(per_node[i, 1], want, rtol=0, atol=1e-12)


def test_shared_nodes_in_chunks_give_the_same_plans(recorded, monkeypatch):
    """The engine's shared evaluation splits a step's nodes by ``SHARED_NODES_BYTES`` (all its inputs at each chunk)."""
    _, traj, X = recorded
    eng, Xc, ex = _every_unit_dense(traj, X, monkeypatch)
    got = []
    for nbytes in (dense.SHARED_NODES_BYTES, 1):  # one chunk; one node per evaluation (two per cut_cells chunk)
        monkeypatch.setattr(dense, "SHARED_NODES_BYTES", nbytes)
        with pytest.warns(explaind.exceptions.ExplaindWarning):
            got.append(window_plans(eng, Xc, ex, (0, STEPS), "adaptive", None, 1e-12, with_estimate=True)[2])
    assert max(int(p.evals.max()) for p in got[0]) >= 0.9 * dense.DENSE_EVALS  # the grid ran
    for whole, parts in zip(*got):
        torch.testing.assert_close(parts.t, whole.t, rtol=0, atol=0)
        torch.testing.assert_close(parts.w, whole.w, rtol=0, atol=1e-13)
        torch.testing.assert_close(parts.estimate, whole.estimate, rtol=0, atol=1e-13)
