r"""The adaptive rule at a loose tolerance: gaps between evaluated nodes, each cut at its kink, bisected where they err.

Every evaluation of :math:`h(t) = g(\theta_s + t\Delta\theta_s, x)` returns :math:`h` with :math:`h'`, so the exact
integral :math:`I = h(b) - h(a)` of each gap :math:`[a, b]` between two evaluated nodes is known. Cut at
:math:`a + u`, node :math:`a` weighted by :math:`u` and node :math:`b` by :math:`L - u` (:math:`L = b - a`), the gap
errs by the vector (over the outputs)

.. math:: r(u) = h'(a)\,u + h'(b)\,(L - u) - I,

known exactly; :math:`r = 0` where :math:`h` is linear on each side of one kink at :math:`a + u`, and on a smooth
stretch the cut where the tangents meet is the trapezoid rule on :math:`h'` (second order). :func:`gap_plan` starts
each unit (step, test input) from the gaps between its nodes :math:`0, x_1, \dots, x_n, 1` (the first estimate's
Gauss–Legendre nodes, :math:`h'(0)` and :math:`h'(1)` evaluated), cuts each gap where the tangents at its ends meet
(least squares over the outputs, clipped to the gap) or at its middle, whichever errs less, and then, level by level
(one batched evaluation per level), bisects the gaps whose error :math:`\max_o |r_o|` is above their share
:math:`\tau L` of the unit's tolerance :math:`\tau` (at least the unit's worst gap) until the unit's summed error
:math:`\max_o |\sum_j r_{j,o}|` is within :math:`\tau`, or its budget is spent.

Where the kink-by-kink rule (:mod:`explaind.kernel.adaptive`) spends a few evaluations per kink it locates (tangent
intersection, probes, Gauss–Legendre panels on either side), a gap holding one kink costs nothing more here: at a
loose tolerance (:data:`GAP_TOL`) most gaps hold at most one kink that matters. At a tight tolerance the second
order of the cut on smooth stretches would cost more than Gauss–Legendre panels, so the adaptive rule uses this only
for ``tol >= GAP_TOL`` (``docs/engine.md``, section 2, *loose tolerances*).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .adaptive_jobs import Bracket, Rows

__all__ = ["GAP_TOL", "GapPlan", "cut_gaps", "gap_plan", "loose_plan"]

#: The adaptive rule integrates the units that miss its first estimate by :func:`gap_plan` at this tolerance and
#: looser (``docs/engine.md``, section 2, *loose tolerances*): at 1e-3 it spent 4-12x fewer evaluations than the
#: kink-by-kink rule on every workload of ``benchmarks/bench_loose_tol.py``; at 1e-4 it reached the tolerance on a
#: GroupNorm ResNet where the kink-dense fallback stopped above it, but at 2.4x the evaluations, so not below 1e-3.
GAP_TOL = 1e-3

#: ``(units (P,), t (P,)) -> (h (P, O), h' (P, O))``.
Refine = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def cut_gaps(a: Tensor, b: Tensor, f_a: Tensor, f_b: Tensor, d_a: Tensor, d_b: Tensor) -> tuple[Tensor, Tensor]:
    r"""Where to cut each gap :math:`[a, b]` and what the cut errs by.

    Parameters
    ----------
    a, b : Tensor
        The gaps' ends, ``(R,)``, ``a < b``.
    f_a, f_b, d_a, d_b : Tensor
        :math:`h` and :math:`h'` at the ends, ``(R, O)``.

    Returns
    -------
    u : Tensor
        The cut's offset from :math:`a`, in :math:`[0, L]`, ``(R,)``: the tangents' meeting point or :math:`L/2`,
        whichever errs less (:math:`\max_o |r_o|`).
    r : Tensor
        :math:`r(u) = h'(a) u + h'(b)(L - u) - (h(b) - h(a))`, ``(R, O)``.
    """
    L = b - a
    half = 0.5 * L
    fit = Bracket(a, b, f_a, f_b, d_a, d_b).meet()  # 0 / 0 where h' does not jump: the middle
    fit = torch.where(torch.isfinite(fit), fit, half).clamp(min=0).minimum(L)
    jump = d_b - d_a
    rest = d_b * L[:, None] - (f_b - f_a)
    r_fit = rest - jump * fit[:, None]
    r_half = rest - jump * half[:, None]
    better = r_fit.abs().amax(-1) < r_half.abs().amax(-1)
    return torch.where(better, fit, half), torch.where(better[:, None], r_fit, r_half)


@dataclass
class GapPlan:
    r"""The rule of :func:`gap_plan` for ``K`` units.

    Attributes
    ----------
    est, err : Tensor
        :math:`\sum_q w_q h'(t_q)` ``(K, O)`` and :math:`\max_o |\mathrm{est}_o - \Delta g_o|` ``(K,)``.
    node_unit, t, w : Tensor
        The nodes, one row per (gap end): the unit (its index in ``units``), the node and its weight; a node shared
        by two gaps comes twice (the plan adds the weights).
    """

    est: Tensor
    err: Tensor
    node_unit: Tensor
    t: Tensor
    w: Tensor


def gap_plan(units: Tensor, x: Tensor, h: Tensor, d: Tensor, g_a: Tensor, g_b: Tensor, thr: Tensor, refine: Refine,
             evals: Tensor, *, max_evals: int, max_depth: int) -> GapPlan:
    r"""Integrate ``units (K,)`` on gaps cut at kinks, bisected until each unit is within ``thr``.

    Parameters
    ----------
    units : Tensor
        The units (indices for ``refine`` and ``evals``), ``(K,)``.
    x : Tensor
        The start nodes in :math:`(0, 1)`, increasing, ``(n,)``.
    h, d : Tensor
        :math:`h, h'` of the units at ``x``, ``(K, n, O)``.
    g_a, g_b : Tensor
        :math:`h(0), h(1)` of the units, ``(K, O)``.
    thr : Tensor
        Each unit's tolerance :math:`\tau`, ``(K,)``.
    refine : callable
        ``(units (P,), t (P,)) -> (h, h')``, each ``(P, O)``.
    evals : Tensor
        Evaluations spent per unit (all units), updated: :math:`h'(0), h'(1)` and every bisection.
    max_evals, max_depth : int
        A unit stops before a level would take it past ``max_evals`` evaluations, or after ``max_depth`` levels.

    Returns
    -------
    GapPlan
    """
    K, n = units.numel(), x.numel()
    zero = torch.zeros(K, dtype=g_a.dtype, device=g_a.device)
    _, ends = refine(torch.cat([units, units]), torch.cat([zero, zero + 1]))
    evals.index_add_(0, units, torch.full_like(units, 2))
    ts = torch.cat([zero[:, None], x.expand(K, n), zero[:, None] + 1], 1)  # (K, n + 2)
    fs = torch.cat([g_a[:, None], h, g_b[:, None]], 1)
    ds = torch.cat([ends[:K, None], d, ends[K:, None]], 1)
    k = torch.arange(K, device=units.device).repeat_interleave(n + 1)
    gaps = _Gaps(k, ts[:, :-1].reshape(-1), ts[:, 1:].reshape(-1), fs[:, :-1].flatten(0, 1), fs[:, 1:].flatten(0, 1),
                 ds[:, :-1].flatten(0, 1), ds[:, 1:].flatten(0, 1))
    done: list[tuple[_Gaps, Tensor]] = []  # the gaps of the units that stopped, and their cuts
    for depth in range(max_depth + 1):
        u, r = cut_gaps(gaps.a, gaps.b, gaps.f_a, gaps.f_b, gaps.d_a, gaps.d_b)
        err = torch.zeros(K, r.shape[-1], dtype=r.dtype, device=r.device).index_add_(0, gaps.k, r).abs().amax(-1)
        e = r.abs().amax(-1)
        worst = torch.zeros_like(err).scatter_reduce_(0, gaps.k, e, reduce="amax", include_self=False)
        split = (e > thr[gaps.k] * (gaps.b - gaps.a)) | (e >= worst[gaps.k])
        count = torch.bincount(gaps.k[split], minlength=K)
        stop = ((err <= thr) | (evals[units] + count > max_evals) | (depth >= max_depth))[gaps.k]
        done.append((gaps.take(stop), u[stop]))  # a unit's gaps stay open (their errors summed) until it stops
        split &= ~stop
        if not bool(split.any()):
            break
        cut, gaps = gaps.take(split), gaps.take(~split & ~stop)
        m = 0.5 * (cut.a + cut.b)
        fm, dm = refine(units[cut.k], m)
        evals.index_add_(0, units[cut.k], torch.ones_like(cut.k))
        gaps = _Gaps.cat([gaps, _Gaps(cut.k, cut.a, m, cut.f_a, fm, cut.d_a, dm),
                          _Gaps(cut.k, m, cut.b, fm, cut.f_b, dm, cut.d_b)])
    g, u = _Gaps.cat([p for p, _ in done]), torch.cat([c for _, c in done])
    L = g.b - g.a
    est = torch.zeros_like(g_a).index_add_(0, g.k, u[:, None] * g.d_a + (L - u)[:, None] * g.d_b)
    err = (est - (g_b - g_a)).abs().amax(-1)
    return GapPlan(est, err, torch.cat([g.k, g.k]), torch.cat([g.a, g.b]), torch.cat([u, L - u]))


@dataclass
class _Gaps(Rows):
    """Gaps ``[a, b]`` of units ``k`` (indices into the units of :func:`gap_plan`), with ``h, h'`` at their ends."""

    k: Tensor
    a: Tensor
    b: Tensor
    f_a: Tensor
    f_b: Tensor
    d_a: Tensor
    d_b: Tensor


def loose_plan(failing: Tensor, samples: tuple[Tensor, Tensor, Tensor, Tensor] | None, g_a: Tensor, g_b: Tensor,
               thr: Tensor, refine: Refine, evals: Tensor, max_evals: int,
               max_depth: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r""":func:`gap_plan` for the units ``failing (F,)`` of :func:`~explaind.kernel.adaptive.adaptive_plan`.

    ``samples``: the first estimate's nodes ``x (n,)``, weights, and :math:`h, h'` of all ``U`` units at ``x``,
    ``(U, n, O)`` each (``None``: no start nodes but :math:`0, 1`); ``g_a, g_b (U, O)``, ``thr (U,)``.

    Returns
    -------
    unit, t, w, est, err : Tensor
        The nodes as rows ``(N,)`` over all units, and the estimate ``(F, O)`` and error ``(F,)`` of ``failing``.
    """
    if samples is None:
        x = g_a.new_zeros(0)
        h = d = g_a.new_zeros(failing.numel(), 0, g_a.shape[-1])
    else:
        x, h, d = samples[0], samples[2][failing], samples[3][failing]
    gp = gap_plan(failing, x, h, d, g_a[failing], g_b[failing], thr[failing], refine, evals, max_evals=max_evals,
                  max_depth=max_depth)
    return failing[gp.node_unit], gp.t, gp.w, gp.est, gp.err
