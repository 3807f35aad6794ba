"""The adaptive rule on kink-dense paths: the composite midpoint fallback (explaind/kernel/dense.py).

Units are synthetic paths ``h(t) = sum_i a_i relu(t - c_i) + sin(3 t)`` with thousands of kinks (a ReLU-dense
network's path) next to units with one kink; the expected numbers are computed here from the formulas.
"""

from __future__ import annotations

import pytest
import torch

from explaind.kernel import dense
from explaind.kernel.adaptive import adaptive_plan
from explaind.kernel.quadrature import rule_nodes

pytestmark = pytest.mark.usefixtures("one_thread")


def _paths(kinks: list[int], seed: int = 0):
    """Units with ``kinks[u]`` kinks each (two outputs: h and -2h + t): ``h(t, u), h'(t, u)``."""
    gen = torch.Generator().manual_seed(seed)
    K = max(kinks)
    c = torch.rand(len(kinks), K, generator=gen, dtype=torch.float64)
    a = torch.randn(len(kinks), K, generator=gen, dtype=torch.float64) / max(K, 1) ** 0.5
    a[torch.arange(K)[None, :] >= torch.tensor(kinks)[:, None]] = 0

    def h(t, u):
        v = (a[u] * torch.relu(t[:, None] - c[u])).sum(-1) + torch.sin(3 * t)
        return torch.stack([v, -2 * v + t], -1)

    def dh(t, u):
        v = (a[u] * (t[:, None] > c[u]).double()).sum(-1) + 3 * torch.cos(3 * t)
        return torch.stack([v, -2 * v + 1], -1)

    return h, dh


def _plan(kinks, tol=1e-7, shared=None):
    h, dh = _paths(kinks)
    U = len(kinks)
    units = torch.arange(U)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    d0 = torch.stack([dh(x[q].expand(U), units) for q in range(4)], 1)
    est0 = torch.einsum("q,uqo->uo", w, d0)
    h0 = torch.stack([h(x[q].expand(U), units) for q in range(4)], 1)
    zero, one = torch.zeros(U, dtype=torch.float64), torch.ones(U, dtype=torch.float64)
    plan = adaptive_plan(est0, h(zero, units), h(one, units), lambda u, t: (h(t, u), dh(t, u)), tol=tol,
                         first=(x, h0, d0), shared=shared)
    return plan, h, dh


def _midpoint(dh, u: int, n: int = dense.DENSE_EVALS) -> torch.Tensor:
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return dh(t, torch.full((n,), u)).mean(0)


def test_kink_dense_units_get_the_midpoint_rule_and_few_kink_units_keep_their_tolerance():
    kinks = [3000] * 12 + [1] * 4
    plan, h, dh = _plan(kinks)
    exact = plan.exact
    for u, k in enumerate(kinks):
        keep = plan.w[u] != 0
        recon = (plan.w[u][keep][:, None] * dh(plan.t[u][keep], torch.full((int(keep.sum()),), u))).sum(0)
        torch.testing.assert_close(recon, plan.estimate[u], rtol=0, atol=1e-12)  # the nodes give the estimate
        err = float((plan.estimate[u] - exact[u]).abs().max())
        if k > 1:  # the midpoint rule's own error, never more: the error is reported, not hidden
            mid = float((_midpoint(dh, u) - exact[u]).abs().max())
            assert err <= mid + 1e-12
            assert err > 1e-7 * float(exact[u].abs().max())
            assert int(plan.evals[u]) <= dense.DENSE_CAP * dense.DENSE_AFTER + dense.DENSE_EVALS + 24
        else:  # one kink: located, within tolerance
            assert err <= 1e-7 * float(exact[u].abs().max()) + 1e-13
            assert int(plan.evals[u]) <= dense.DENSE_CAP * dense.DENSE_AFTER


def test_without_the_fallback_the_same_units_run_to_the_cap(monkeypatch):
    """dense_after=0 switches the fallback off: the rule spends far more and ends no closer than midpoint-100."""
    import explaind.kernel.adaptive as adaptive

    monkeypatch.setattr(adaptive, "MAX_EVALS", 400)
    kinks = [3000] * 10
    h, dh = _paths(kinks)
    plan_on, _, _ = _plan(kinks)
    U = len(kinks)
    units = torch.arange(U)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    est0 = torch.einsum("q,uqo->uo", w, torch.stack([dh(x[q].expand(U), units) for q in range(4)], 1))
    zero, one = torch.zeros(U, dtype=torch.float64), torch.ones(U, dtype=torch.float64)
    plan_off = adaptive_plan(est0, h(zero, units), h(one, units), lambda u, t: (h(t, u), dh(t, u)), tol=1e-7,
                             dense_after=0, max_evals=400)
    assert int(plan_off.evals.min()) >= 400 > int(plan_on.evals.max())


def test_shared_nodes_give_the_same_plan_as_pointwise_evaluation():
    """The engine's ``shared`` evaluation (every unit at common nodes) and the default agree."""
    kinks = [2000] * 10
    _, dh = _paths(kinks)

    def shared(units, t, w):
        d = torch.stack([dh(t, torch.full_like(t, int(u), dtype=torch.long)) for u in units])
        return torch.einsum("q,kqo->ko", w, d)

    a, _, _ = _plan(kinks)
    b, _, _ = _plan(kinks, shared=shared)
    torch.testing.assert_close(a.estimate, b.estimate, rtol=0, atol=1e-13)
    torch.testing.assert_close(a.t, b.t)
    torch.testing.assert_close(a.w, b.w)


def test_a_few_far_units_are_left_to_the_adaptive_rule():
    """Fewer than DENSE_MIN far units: no fallback (a unit with a few kinks may be among them)."""
    kinks = [3000] * (dense.DENSE_MIN - 1)
    plan, _, _ = _plan(kinks)
    assert int(plan.evals.min()) > dense.DENSE_CAP * dense.DENSE_AFTER + dense.DENSE_EVALS
