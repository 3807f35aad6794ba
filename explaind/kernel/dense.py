r"""The adaptive rule's fallback for kink-dense paths: a grid of shared nodes per step, its cells cut at kinks.

Locating kinks one by one (:mod:`explaind.kernel.adaptive`) pays off when a path crosses a few
dozen activation kinks. A ReLU-dense network (convolutions over many positions, wide MLPs, large
first steps) crosses thousands per segment: each located kink removes a tiny share of the error and
the rule would run into its evaluation cap after thousands of evaluations per unit, each at its own
point of its own segment (the costliest kind of evaluation).

So after :data:`DENSE_AFTER` evaluations the rule tests the units still refining: a unit is *far*
when its error is above its tolerance, :data:`DENSE_RATIO` times its rounding floor and :data:`DENSE_REL`
times :math:`\max_o |h_o(1) - h_o(0)|`. When at least :data:`DENSE_SHARE` of the units that missed the first
estimate, and at least :data:`DENSE_MIN` units, are far, the batch is kink-dense (a property of the
model and the step size, not of one test input: a few far units among many converging ones are left to
the adaptive rule, which locates their kinks). Its far units are integrated by :func:`dense_fallback`:
per step, one grid of :func:`dense_rule` (cells of a composite midpoint rule, the first estimate's nodes
among the centres) whose new nodes are shared by every test input of the step, so the engine evaluates
each (step, node) once for all of them with the step's parameters; each unit's weights then cut the gaps
between the nodes at the kinks their values locate (:func:`cut_cells`), never erring more than the cells
as given. The step's failing units spend :math:`n_g` evaluations each in all: the grid gets the cells the
probe's refinement left (:func:`grid_cells`, at least :data:`GRID_FLOOR` of :math:`n_g`). The budgets
:math:`n_g` of the steps of a batch share :data:`GRID_EVALS` per failing unit on average, in proportion to
the square root of each step's first-estimate error (:func:`step_budgets`), where at least
:data:`SHARE_STEPS` steps take the grid; fewer steps get :data:`DENSE_EVALS` each.
The batch's other units stop refining before a level could take them past :data:`DENSE_EVALS`
evaluations; those still far then take that rule too where it errs less than their panels (both errors
are known exactly). The error left is reported as quadrature error and warned about (``docs/engine.md``,
section 2).

Where the first estimate already looks kink-dense (as many units far as the test asks for, and no
single kink between the first nodes explaining their error), the test runs first on a *probe* of at
most :data:`PROBE_UNITS` failing units spread over the batch (:func:`probe_positions`). When the probe
is kink-dense and none of its units reached its tolerance, the batch's other failing units are not
refined one by one at all: those far after the first estimate whose error no single kink between its
nodes accounts for go straight to the grid, the rest are refined as usual. Otherwise (no
kink-dense probe, or some of its units converged: few-kink units among kink-dense ones) every other
failing unit is refined and tested like the probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .adaptive_jobs import Bracket
from .dense_grid import cells, dense_rule, half_cells, refined_grid

__all__ = ["DENSE_AFTER", "DENSE_RATIO", "DENSE_REL", "DENSE_SHARE", "DENSE_MIN", "dense_need", "DENSE_EVALS",
           "PROBE_UNITS", "MIDPOINT_KIND", "Shared", "dense_units", "far_units", "probe_positions",
           "dense_rule", "cells", "GRID_FLOOR", "grid_cells", "BUDGET_SPREAD", "BUDGET_POWER",
           "GRID_EVALS", "SHARE_STEPS", "step_budgets", "SHARED_NODES_BYTES", "Fallback", "dense_fallback",
           "Cut", "cut_cells", "shortfall", "refine_grid", "SHORTFALL_TARGET"]

#: Evaluations per unit after which the adaptive rule tests whether the batch is kink-dense.
DENSE_AFTER = 64
#: A unit is far when, after ``DENSE_AFTER`` evaluations, its error is above its tolerance, above this many
#: rounding floors (the part of the tolerance that is a few ulps of :math:`|g|`) ...
DENSE_RATIO = 1000.0
#: ... and above this fraction of :math:`\max_o |h_o(1) - h_o(0)|` (1000 tolerances at the default ``tol``
#: 1e-7; not more at a looser ``tol``, whose far level would otherwise rise with it).
DENSE_REL = 1e-4
#: The batch is kink-dense when at least this share of the units that missed the first estimate are far,
#: and at least ``DENSE_MIN`` units (a kink-dense model shows it on many inputs; a few far units may hold
#: a few kinks each, which the adaptive rule locates).
DENSE_SHARE = 0.5
DENSE_MIN = 8
#: Nodes of the grid for the far units of a kink-dense batch (the first estimate's included: the evaluations
#: such a unit spends in all).
DENSE_EVALS = 100
#: Failing units of a batch refined first to decide whether the batch is kink-dense (all when not more).
PROBE_UNITS = 16
#: Panel kind of a midpoint panel (after the adaptive rule's two Gauss–Legendre kinds).
MIDPOINT_KIND = 2

#: ``(units (K,), t (Q,)) -> (h, h')``, each ``(K, Q, O)``: ``units`` at nodes ``t`` shared by all of them.
Shared = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]



def dense_need(failing: int) -> float:
    """Far units that make a batch kink-dense when ``failing`` of its units missed the first estimate: at least
    :data:`DENSE_SHARE` of them and :data:`DENSE_MIN` (the probe's test, each refinement level's, and the chunked
    rule's sums over its chunks, :mod:`~explaind.kernel.adaptive_chunks`)."""
    return max(DENSE_MIN, DENSE_SHARE * failing)

def dense_units(total: Tensor, ripe: Tensor, failing: int, thr: Tensor, scale: Tensor, floor: Tensor) -> Tensor:
    r"""The far units of a kink-dense batch (bool ``(U,)``; all ``False`` when the batch is not kink-dense).

    Parameters
    ----------
    total : Tensor
        Each unit's summed panel error now, ``(U,)``.
    ripe : Tensor
        Units still refining that have spent ``DENSE_AFTER`` evaluations, bool ``(U,)``.
    failing : int
        Number of units that missed the first estimate.
    thr, scale, floor : Tensor
        Each unit's tolerance, :math:`\max_o |\Delta g_o|` and rounding floor, ``(U,)``.
    """
    far = ripe & far_units(total, thr, scale, floor)
    if int(far.sum()) < dense_need(failing):
        return torch.zeros_like(far)
    return far


def far_units(err: Tensor, thr: Tensor, scale: Tensor, floor: Tensor) -> Tensor:
    r"""Bool: error above the tolerance ``thr``, :data:`DENSE_RATIO` rounding floors and :data:`DENSE_REL`
    :math:`\max_o |\Delta g_o|` (``scale``); all ``(U,)``."""
    return err > torch.maximum(thr, torch.maximum(DENSE_RATIO * floor, DENSE_REL * scale))


def probe_positions(n_failing: int, n: int = PROBE_UNITS) -> Tensor:
    """Positions of at most ``n`` of ``n_failing`` failing units, evenly spread (all of them when not more)."""
    if n_failing <= n:
        return torch.arange(n_failing)
    return torch.unique(torch.linspace(0, n_failing - 1, n).round().long())


#: The grid of :func:`grid_cells` keeps at least this share of its budget ``n`` in cells.
GRID_FLOOR = 0.9


def grid_cells(spent: int, failing: int, takers: int, m: int, n: int = DENSE_EVALS) -> int:
    r"""Cells of the grid of a kink-dense step: ``n`` evaluations per failing unit in all.

    The step's ``failing`` units may spend ``n * failing`` evaluations; they have spent ``spent``
    (the first estimate's ``m`` nodes each, and the refinement of the probe and of the units not far).
    Each of the ``takers`` units that take the rule gets :math:`\lfloor (n F - \mathrm{spent}) / K \rfloor`
    new nodes, so the rule has that many cells plus the ``m`` it reuses, at most ``n`` and at least
    :data:`GRID_FLOOR` ``n`` (where a probe spent more than the batch can make up, the batch spends more).
    """
    new = (n * failing - spent) // max(1, takers)
    return int(min(n, max(new + m, math.ceil(GRID_FLOOR * n))))


#: Mean budget per failing unit of the grids of a batch of at least :data:`SHARE_STEPS` kink-dense steps, whose
#: budget :func:`step_budgets` shares out by their first-estimate errors (fewer steps: :data:`DENSE_EVALS` each).
GRID_EVALS = 60
SHARE_STEPS = 8
#: :func:`step_budgets` gives a step between ``1 / BUDGET_SPREAD`` and ``BUDGET_SPREAD`` times the mean budget.
BUDGET_SPREAD = 4.0
#: ... in proportion to this power of the step's first-estimate error.
BUDGET_POWER = 0.5


def step_budgets(failing: list[Tensor], need: Tensor | None, n: int) -> list[int]:
    r"""Evaluations per failing unit of each step: ``n`` on average over the failing units, shared out by ``need``.

    On a kink-dense path the rule's error in a step falls about like :math:`E_g / n_g` in its budget
    :math:`n_g`, and the errors of the steps add up in the replica, so a step whose first estimate errs
    more should get more nodes: with :math:`E_g` the root mean square of ``need`` over the step's failing
    units (``F_g`` of them), :math:`n_g \propto E_g^{p}` (:data:`BUDGET_POWER` :math:`p = 1/2`, the
    minimiser of :math:`\sum_g (E_g / n_g)^2` under :math:`\sum_g F_g n_g` fixed when the errors fall like
    :math:`1/n_g`: ``docs/engine.md``, section 2), clipped to :math:`[n / c, c\, n]`
    (:data:`BUDGET_SPREAD` :math:`c`), and scaled so that :math:`\sum_g F_g n_g \le n \sum_g F_g`.

    Parameters
    ----------
    failing : list of Tensor
        Per step, bool ``(U,)``: its failing units.
    need : Tensor or None
        Each unit's first-estimate error ``(U,)``; ``None``: ``n`` for every step.
    n : int
        The mean budget.

    Returns
    -------
    list of int
        :math:`n_g` per step, each at least 1.
    """
    counts = torch.tensor([float(f.sum()) for f in failing], dtype=torch.float64)
    if need is None or len(failing) < 2:
        return [n] * len(failing)
    rms = torch.stack([need[f].double().pow(2).mean().sqrt() for f in failing])  # nan for a step without any
    if not bool(torch.isfinite(rms).all()) or not bool((rms > 0).all()):
        return [n] * len(failing)
    weight = rms.pow(BUDGET_POWER)
    lo, hi, total = n / BUDGET_SPREAD, n * BUDGET_SPREAD, n * float(counts.sum())
    budget = torch.full_like(weight, float(n))
    free = torch.ones_like(weight, dtype=torch.bool)
    for _ in range(len(failing)):  # water filling: clipped steps keep their bound, the rest share what is left
        left = total - float((counts * budget)[~free].sum())
        budget[free] = left * weight[free] / float((counts * weight)[free].sum())
        clipped = free & ((budget < lo) | (budget > hi))
        if not bool(clipped.any()):
            break
        budget[clipped] = budget[clipped].clamp(lo, hi)
        free &= ~clipped
    return [max(1, int(v)) for v in budget.floor().tolist()]


def dense_fallback(cand: Tensor, steps: Tensor, failing: Tensor, evals: Tensor, shared: Shared, x: Tensor,
                   first: tuple[Tensor, Tensor] | None, g_a: Tensor, g_b: Tensor,
                   n: int = DENSE_EVALS, need: Tensor | None = None, grid_evals: int = GRID_EVALS) -> Fallback:
    r"""The kink-dense rule of the units ``cand (K,)``: one grid of shared nodes per step, its cells cut at kinks.

    Per step (``steps (U,)``: each unit's group, all units of a group share its grid), the grid is
    :func:`dense_rule` through the first estimate's nodes ``x (m,)`` with :func:`grid_cells` cells: the step's
    failing units (``failing (F,)``, having spent ``evals (U,)``) spend :math:`n_g` evaluations each in all:
    ``n`` each without ``need`` or with fewer than :data:`SHARE_STEPS` steps; else ``min(n, grid_evals)`` on
    average, shared out by ``need`` (:func:`step_budgets`).
    Every new node is one evaluation for all of the step's units (``shared``); the weights of each unit are
    those of :func:`cut_cells`. Where the shared budget is below ``n`` and the cut grids are not expected to
    err less than :data:`SHORTFALL_TARGET` times the ``n``-point midpoint rule (:func:`shortfall` :math:`R`),
    every step's grid gains :math:`R` / :data:`SHORTFALL_TARGET` times its nodes (at most ``n`` per unit on
    average in all), each in the middle of a gap where the cut errs most (:func:`refine_grid`).

    Parameters
    ----------
    first : tuple of Tensor or None
        :math:`h` and :math:`h'` at ``x`` of every unit, ``(U, m, O)`` each (``None`` when ``x`` is empty).
    g_a, g_b : Tensor
        :math:`h(0)` and :math:`h(1)` of every unit, ``(U, O)``.
    need : Tensor, optional
        Each unit's first-estimate error :math:`\max_o |\mathrm{est}^{(0)}_o - \Delta g_o|`, ``(U,)``.
    """
    in_cand = torch.zeros_like(steps, dtype=torch.bool)
    in_cand[cand] = True
    is_failing = torch.zeros_like(in_cand)
    is_failing[failing] = True
    groups = torch.unique(steps[cand]).tolist()
    mean = n if need is None or len(groups) < SHARE_STEPS else min(n, grid_evals)
    budget = step_budgets([is_failing & (steps == g) for g in groups], need, mean)
    grids = []
    for g, n_g in zip(groups, budget):
        mine = steps == g
        units = torch.nonzero(mine & in_cand).reshape(-1)
        cells_g = grid_cells(int(evals[mine & is_failing].sum()), int((mine & is_failing).sum()), units.numel(),
                             x.numel(), n_g)
        t, wc, known = dense_rule(x, cells_g)
        cut = cut_cells(units, t, wc, known, shared, first, g_a[units], g_b[units], keep=mean < n)
        grids.append((units, t, cut, int((~known).sum())))
    ratio = shortfall([c for _, _, c, _ in grids], [t.numel() for _, t, _, _ in grids], n)
    grow = min(n / mean, ratio / SHORTFALL_TARGET)  # at most n per unit on average
    parts = []
    for units, t, cut, new in grids:
        if grow > 1 and cut.h is not None:
            t, cut, added = refine_grid(units, t, cut, math.ceil((grow - 1) * t.numel()), shared, g_a[units],
                                        g_b[units])
            new += added
        parts.append((units, cut.est, torch.full_like(units, new), units.repeat_interleave(t.numel()),
                      t.repeat(units.numel()), cut.w.reshape(-1)))
    unit, est, new, node_unit, tt, ww = (torch.cat(v) for v in zip(*parts))
    err = (est - (g_b - g_a)[unit]).abs().amax(-1)
    return Fallback(unit, est, err, new, node_unit, tt, ww)


def shortfall(cuts: list[Cut], sizes: list[int], n: int) -> float:
    r"""By how much the grids' nodes should grow for the cut grids to err like the ``n``-point midpoint rule.

    The cells of a grid of :math:`n_g` nodes (a composite midpoint rule) err by :math:`c_k` on unit :math:`k`,
    and the same rule on every other node by :math:`c'_k` (both known exactly), so the rule's order on these
    paths is :math:`p = \log_2 (\lVert c' \rVert / \lVert c \rVert)` over all units, clipped to
    :math:`[1, 2]` (about 1 on kink-dense paths, 2 on smooth ones), and the ``n``-point rule would err by about
    :math:`c_k (n_g / n)^p`. The cut grids err by :math:`e_k`; over the units of all grids

    .. math:: R = \sqrt{\sum_k e_k^2 \Big/ \sum_k \big(c_k (n_g / n)^p\big)^2},

    :math:`R \le 1`: the cut grids are expected to err no more than the ``n``-point rule.

    Parameters
    ----------
    cuts : list of Cut
        Each grid's weights and errors.
    sizes : list of int
        Each grid's nodes :math:`n_g`.
    """
    cells = sum(float(c.cells_err.double().pow(2).sum()) for c in cuts)
    half = sum(float(c.half_err.double().pow(2).sum()) for c in cuts)
    if not cells > 0 or not half > 0:
        return 1.0
    p = min(2.0, max(1.0, 0.5 * math.log2(half / cells)))
    num = sum(float(c.err.double().pow(2).sum()) for c in cuts)
    den = sum(float((c.cells_err.double() * (m / n) ** p).pow(2).sum()) for c, m in zip(cuts, sizes))
    return math.sqrt(num / den) if den > 0 else 1.0


def refine_grid(units: Tensor, t: Tensor, cut: Cut, extra: int, shared: Shared, h0: Tensor,
                h1: Tensor) -> tuple[Tensor, Cut, int]:
    r"""The grid ``t (n,)`` of ``units (K,)`` with ``extra`` nodes more, in the gaps where the cut errs most.

    A gap's score is :math:`\sum_k r_{kj}^2` over the units of the squared error of its cut
    (:attr:`Cut.gap_err`); the new nodes (one evaluation each for all the units) go to the middle of the gaps
    of the largest scores (:func:`~explaind.kernel.dense_grid.refined_grid`), and :func:`cut_cells` cuts the
    union's gaps anew from the values kept in ``cut``. A unit keeps its former weights (zero at the new
    nodes) where they err less.

    Returns
    -------
    t : Tensor
        The nodes of the union, ``(N,)``.
    cut : Cut
        Its weights ``(K, N)`` and estimates.
    added : int
        New nodes evaluated.
    """
    s, wc, known = refined_grid(t, cut.gap_err.pow(2).sum(0), extra)

    def local(u: Tensor, tq: Tensor) -> tuple[Tensor, Tensor]:
        return shared(units[u], tq)

    fine = cut_cells(torch.arange(units.numel(), device=units.device), s, wc, known, local, (cut.h, cut.d), h0, h1)
    keep = cut.err < fine.err
    w_old = cut.w.new_zeros(fine.w.shape)
    w_old[:, known] = cut.w
    fine.w = torch.where(keep[:, None], w_old, fine.w)
    fine.est = torch.where(keep[:, None], cut.est, fine.est)
    fine.err = torch.minimum(cut.err, fine.err)
    fine.cells_err, fine.half_err = cut.cells_err, cut.half_err
    return s, fine, int((~known).sum())


#: :func:`dense_fallback` grows the shared-budget grids of a batch whose :func:`shortfall` is above this: on three
#: workloads :math:`R` was 0.85-0.88 of the measured ratio of the replica's error to the ``n``-point midpoint rule's
#: (``docs/engine.md``, section 2), so the grids aim below the prediction by that margin.
SHORTFALL_TARGET = 0.8


#: Bytes of :math:`h, h'` at shared nodes ``(K, nodes, O)`` the fallback holds per call of ``shared`` (the
#: engine's ``shared`` also splits its nodes so that a step's ``T`` inputs, ``(T, nodes, O)``, stay within it),
#: and the most it keeps of a step's grid for :func:`refine_grid` (a larger grid is not refined).
SHARED_NODES_BYTES = 1 << 27


@dataclass
class Cut:
    r"""The weights of :func:`cut_cells` for ``K`` units on ``n`` nodes and what they err by.

    Attributes
    ----------
    w : Tensor
        Weights ``(K, n)``.
    est : Tensor
        :math:`\sum_q w_q h'(t_q)` ``(K, O)``.
    err, cells_err, half_err : Tensor
        :math:`\max_o |\mathrm{est}_o - (h_o(1) - h_o(0))|` ``(K,)``, that of the given cells and that of the
        cells of every other node (:func:`~explaind.kernel.dense_grid.half_cells`).
    gap_err : Tensor
        ``(K, n - 1)``: :math:`\max_o |r_o(u)|` of each gap's cut.
    h, d : Tensor or None
        :math:`h, h'` at the nodes, ``(K, n, O)``, when kept.
    """

    w: Tensor
    est: Tensor
    err: Tensor
    cells_err: Tensor
    half_err: Tensor
    gap_err: Tensor
    h: Tensor | None = None
    d: Tensor | None = None


@dataclass
class Fallback:
    r"""The rule of :func:`dense_fallback` for units ``unit (K,)``.

    Attributes
    ----------
    unit : Tensor
        Units ``(K,)``.
    est, err : Tensor
        :math:`\sum_q w_q h'(t_q)` ``(K, O)`` and its error :math:`\max_o |\mathrm{est}_o - \Delta g_o|` ``(K,)``.
    new : Tensor
        Nodes evaluated for each unit (its step's grid less the reused nodes), ``(K,)`` long.
    node_unit, t, w : Tensor
        The nodes: one row per (unit, node), ``(N,)`` each.
    """

    unit: Tensor
    est: Tensor
    err: Tensor
    new: Tensor
    node_unit: Tensor
    t: Tensor
    w: Tensor

    def nodes(self, units: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(unit, t, w)`` rows of the nodes of ``units`` (bool over all units)."""
        keep = units[self.node_unit]
        return self.node_unit[keep], self.t[keep], self.w[keep]


def cut_cells(units: Tensor, t: Tensor, wc: Tensor, known: Tensor, shared: Shared,
              first: tuple[Tensor, Tensor] | None, h0: Tensor, h1: Tensor, keep: bool = False) -> Cut:
    r"""Weights of the nodes ``t (n,)`` (cells of widths ``wc``) for each unit: cells cut at a located kink.

    Every evaluation returns :math:`h` with :math:`h'`, so the exact integral
    :math:`I = h(b) - h(a)` of each gap :math:`[a, b]` between neighbouring nodes is known. The gap is
    split at :math:`a + u`, node :math:`a` weighted by :math:`u` and node :math:`b` by :math:`L - u`
    (:math:`L = b - a`): that errs by :math:`r(u) = h'(a)\,u + h'(b)(L - u) - I`, zero where :math:`h` is
    linear on each side of one kink at :math:`a + u`. Each gap takes the tangent intersection
    (least squares over the outputs, clipped to the gap) or the cut of the cells (the rule as given), whichever
    errs less there (:math:`\max_o |r_o|`, known exactly); the ends :math:`[0, t_1]` and :math:`[t_n, 1]` go to
    their node. The weights stay positive and sum to 1. Each unit finally keeps the cut or the given cells,
    whichever errs less in all (``docs/engine.md``, section 2).

    Parameters
    ----------
    units : Tensor
        Units ``(K,)``, evaluated at the new nodes by ``shared``.
    t, wc, known : Tensor
        The nodes (increasing), the widths of their cells and which nodes are reused from ``first``, ``(n,)``.
    first : tuple of Tensor or None
        :math:`h, h'` of every unit at the reused nodes, in order, ``(U, m, O)`` each.
    h0, h1 : Tensor
        :math:`h(0)` and :math:`h(1)` of ``units``, ``(K, O)``.
    keep : bool
        Keep :math:`h, h'` at the nodes in the result where they take at most :data:`SHARED_NODES_BYTES`.

    Returns
    -------
    Cut
        The weights ``(K, n)``, the estimates and their errors.
    """
    K, n, O = units.numel(), t.numel(), h0.shape[-1]
    cut = wc.expand(K, n).clone()  # the given cells as the start: each gap then cut where it errs less
    edge = torch.cumsum(wc, 0)  # edge[q]: where the given cells divide the gap [t_q, t_{q+1}]
    which = torch.cumsum(known.long(), 0) - 1
    est_cut = torch.zeros(K, O, dtype=h0.dtype, device=h0.device)
    est_cells = torch.zeros_like(est_cut)
    est_half = torch.zeros_like(est_cut)
    w_half = half_cells(t)
    gap_err = h0.new_zeros(K, max(0, n - 1))
    kept: list[tuple[Tensor, Tensor]] | None = [] if keep and 2 * h0.element_size() * K * n * O <= \
        SHARED_NODES_BYTES else None
    per = max(2, SHARED_NODES_BYTES // max(1, 2 * h0.element_size() * K * O))
    prev: tuple[Tensor, Tensor] | None = None
    for lo in range(0, n, per):
        hi = min(n, lo + per)
        h, d = _values(units, t[lo:hi], known[lo:hi], which[lo:hi], shared, first, h0)
        if kept is not None:
            kept.append((h, d))
        est_cells += torch.einsum("q,kqo->ko", wc[lo:hi], d)
        est_half += torch.einsum("q,kqo->ko", w_half[lo:hi], d)
        if lo == 0:
            est_cut += t[0] * d[:, 0]  # [0, t_1] to the first node
        if prev is not None:
            h, d = torch.cat([prev[0], h], 1), torch.cat([prev[1], d], 1)
        first_node = lo - 1 if prev is not None else lo
        gap_err[:, first_node:hi - 1] = _cut_gaps(t[first_node:hi], edge[first_node:hi], h, d, cut[:, first_node:hi],
                                                  est_cut)
        prev = (h[:, -1:], d[:, -1:])
    est_cut += (1 - t[-1]) * prev[1][:, 0]  # [t_n, 1] to the last node
    exact = h1 - h0
    err_cut, err_cells = (est_cut - exact).abs().amax(-1), (est_cells - exact).abs().amax(-1)
    better = err_cut <= err_cells
    w = torch.where(better[:, None], cut, wc.expand(K, n))
    out = Cut(w, torch.where(better[:, None], est_cut, est_cells), torch.minimum(err_cut, err_cells), err_cells,
              (est_half - exact).abs().amax(-1), gap_err)
    if kept is not None:
        out.h, out.d = (torch.cat(v, 1) for v in zip(*kept))
    return out


def _values(units: Tensor, t: Tensor, known: Tensor, which: Tensor, shared: Shared,
            first: tuple[Tensor, Tensor] | None, like: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`h, h'` of ``units`` at the nodes ``t (c,)``: reused from ``first`` where ``known``, else ``shared``."""
    K, O = like.shape
    h = like.new_empty(K, t.numel(), O)
    d = like.new_empty(K, t.numel(), O)
    if bool((~known).any()):
        h[:, ~known], d[:, ~known] = shared(units, t[~known])
    if bool(known.any()) and first is not None:
        h[:, known] = first[0][units][:, which[known]]
        d[:, known] = first[1][units][:, which[known]]
    return h, d


def _cut_gaps(t: Tensor, edge: Tensor, h: Tensor, d: Tensor, w: Tensor, est: Tensor) -> Tensor:
    r"""Cut the gaps between the nodes ``t (c,)`` (``h, d (K, c, O)``): shift ``w (K, c)`` in place, add to ``est``.

    ``w`` holds the given cells' weights; a gap cut at :math:`a + u` instead of at ``edge`` moves
    :math:`u - (\mathrm{edge} - a)` of weight from node :math:`b` to node :math:`a`. Returns each gap's error
    :math:`\max_o |r_o(u)|`, ``(K, c - 1)``.
    """
    K, c, O = h.shape
    if c < 2:
        return h.new_zeros(K, 0)
    L = (t[1:] - t[:-1]).expand(K, c - 1)
    flat = Bracket(t[:-1].expand(K, c - 1).reshape(-1), t[1:].expand(K, c - 1).reshape(-1),
                   h[:, :-1].reshape(-1, O), h[:, 1:].reshape(-1, O), d[:, :-1].reshape(-1, O), d[:, 1:].reshape(-1, O))
    given = (edge[:-1] - t[:-1]).expand(K, c - 1)
    fit = flat.meet().reshape(K, c - 1)  # no jump of h' (0 / 0): the given cut
    fit = torch.where(torch.isfinite(fit), fit, given).clamp(min=0).minimum(L)
    jump = d[:, 1:] - d[:, :-1]
    rest = d[:, 1:] * L[..., None] - (h[:, 1:] - h[:, :-1])  # r(u) = -jump u + rest
    r_fit = (rest - jump * fit[..., None]).abs().amax(-1)
    r_given = (rest - jump * given[..., None]).abs().amax(-1)
    worse = r_fit >= r_given
    u = torch.where(worse, given, fit)
    est += (u[..., None] * d[:, :-1] + (L - u)[..., None] * d[:, 1:]).sum(1)
    shift = u - given
    w[:, :-1] += shift
    w[:, 1:] -= shift
    return torch.minimum(r_fit, r_given)
