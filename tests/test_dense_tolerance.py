"""The kink-dense test at a tolerance looser than the default: the far level does not rise with ``tol``.

A unit is far (``dense.far_units``) when its error is above its tolerance, 1000 rounding floors and 1e-4 of its
change. It used to be 1000 tolerances: at ``tol=1e-5`` a unit had to err by 1e-2 of its change to count, so a
kink-dense batch was never found kink-dense and every unit located its kinks one by one up to the cap of 4,096
evaluations (measured: a transformer trained by Adam at lr 1e-2, 1,840 evaluations per unit against 72.5 at
``tol=1e-7``; docs/engine.md, section 2). Expectations worked out by hand; the paths are sums of ReLU kinks
whose integrals are known in closed form.
"""

from __future__ import annotations

import pytest
import torch

from explaind.kernel import dense
from explaind.kernel.adaptive import adaptive_plan
from explaind.kernel.quadrature import rule_nodes

pytestmark = pytest.mark.usefixtures("one_thread")


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_far_is_above_the_tolerance_1000_floors_and_1e_4_of_the_change():
    one, tiny = _t(1.0), _t(1e-15)
    assert bool(dense.far_units(_t(5e-4), _t(1e-5) + tiny, one, tiny))  # tol 1e-5: 5e-4 is far (not 1e-2)
    assert not bool(dense.far_units(_t(5e-5), _t(1e-5) + tiny, one, tiny))  # below 1e-4 of the change
    assert not bool(dense.far_units(_t(5e-4), _t(1e-3), one, tiny))  # within a loose tolerance
    # a change of 1e-6 with a rounding floor of 1e-12: 1e-4 of the change is 1e-10, 1000 floors 1e-9
    assert not bool(dense.far_units(_t(5e-10), _t(1e-13) + 1e-12, _t(1e-6), _t(1e-12)))
    assert bool(dense.far_units(_t(2e-9), _t(1e-13) + 1e-12, _t(1e-6), _t(1e-12)))


def _plan(tol: float, U: int = 200, K: int = 1000):
    """``adaptive_plan`` on ``U`` paths of ``K`` kinks each and a drift ``10 t`` (their change about 10, what the
    kinks leave after 64 evaluations a few 1e-4 of it), outputs ``h`` and ``t - 2h``."""
    gen = torch.Generator().manual_seed(1)
    c = torch.rand(U, K, generator=gen, dtype=torch.float64)
    a = torch.randn(U, K, generator=gen, dtype=torch.float64) / K ** 0.5

    def h(t, u):
        v = (a[u] * torch.relu(t[:, None] - c[u])).sum(-1) + 10 * t
        return torch.stack([v, t - 2 * v], -1)

    def dh(t, u):
        v = (a[u] * (t[:, None] > c[u]).double()).sum(-1) + 10
        return torch.stack([v, 1 - 2 * v], -1)

    units = torch.arange(U)
    x, w = (torch.tensor(v) for v in rule_nodes("gauss-legendre", 4))
    d0 = torch.stack([dh(x[q].expand(U), units) for q in range(4)], 1)
    h0 = torch.stack([h(x[q].expand(U), units) for q in range(4)], 1)
    zero, one = torch.zeros(U, dtype=torch.float64), torch.ones(U, dtype=torch.float64)
    est0 = torch.einsum("q,uqo->uo", w, d0)
    return adaptive_plan(est0, h(zero, units), h(one, units), lambda u, t: (h(t, u), dh(t, u)), tol=tol,
                         first=(x, h0, d0))


def test_a_kink_dense_batch_at_a_loose_tolerance_takes_the_grid_like_at_the_default():
    strict, loose = _plan(1e-7), _plan(1e-5)
    # at tol=1e-7 the batch spends about DENSE_EVALS per unit (its probe's refinement a little more); at tol=1e-5
    # as much, not the hundreds to thousands of units refined kink by kink
    assert float(strict.evals.double().mean()) <= 1.1 * dense.DENSE_EVALS
    assert float(loose.evals.double().mean()) <= 1.02 * float(strict.evals.double().mean())
