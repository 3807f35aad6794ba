r"""The node grids of the kink-dense rule (:mod:`explaind.kernel.dense`): cells of a composite midpoint rule.

:func:`dense_rule` lays a grid of ``n`` cells through the first estimate's nodes (:func:`cells`);
:func:`refined_grid` adds nodes to a grid already evaluated, one at the middle of each gap where the
measured error is largest, with the cells of the union cut midway between neighbouring nodes. Weights are
cell widths: they are positive and sum to 1 (``docs/engine.md``, section 2, *kink-dense paths*).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dense_rule", "cells", "refined_grid", "half_cells"]


def dense_rule(x: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""A composite midpoint rule of ``n`` cells of :math:`[0, 1]` with the sorted nodes ``x (m,)`` among its centres.

    Each :math:`x_k` gets the cell :math:`[x_k - 1/(2n), x_k + 1/(2n)]`, the gaps between those cells are cut
    into equal cells (:func:`cells`). Every node lies in its own cell and the weights are the cell widths (they
    sum to 1), so the rule is exact for linear :math:`h'`; a kink in a cell of width :math:`w` errs by at most
    :math:`|\Delta h'|\, w` (docs/engine.md, section 2). Without ``x`` (or when the cells of ``x`` do not fit:
    nodes closer than :math:`1/n`), it is the plain ``n``-point midpoint rule.

    Returns
    -------
    t, w : Tensor
        Nodes and weights, ``(n,)``, ``t`` increasing.
    known : Tensor
        Bool ``(n,)``: the nodes that are ``x`` (in the order of ``x``).
    """
    cell = 1.0 / n
    xs = [float(v) for v in x.tolist()]
    fits = len(xs) < n and all(b - a >= cell for a, b in zip(xs, xs[1:])) and (not xs or (
        xs[0] >= cell / 2 and xs[-1] <= 1 - cell / 2))
    t, w, known = cells(xs if fits else [], n, 0.0, 1.0)
    dt, dev = x.dtype, x.device
    return (torch.tensor(t, dtype=dt, device=dev), torch.tensor(w, dtype=dt, device=dev),
            torch.tensor(known, dtype=torch.bool, device=dev))


def cells(xs: list[float], n: int, a: float, b: float) -> tuple[list[float], list[float], list[bool]]:
    r"""``n`` cells of :math:`[a, b]`, one node each: the sorted nodes ``xs`` (``m <= n``, inside) and new centres.

    With :math:`h = (b - a)/n`, node :math:`x_k` gets the cell :math:`[x_k - r_k, x_k + r_k']`, each radius
    :math:`h/2` or less where a neighbouring node or an end is nearer (half the distance to the neighbour,
    the distance to the end). The gaps between those cells, of lengths :math:`L_j`, get the :math:`n - m`
    new cells in proportion to :math:`L_j` (largest remainders), each gap cut into equal cells with a node at
    each centre; a gap that gets none widens the node's cell before it (the first node's, for the gap at
    :math:`a`). The weights are the cell widths: they sum to :math:`b - a`, every node lies in its own cell.

    Returns
    -------
    t, w, known : list
        Nodes (increasing), weights and whether each node is one of ``xs``, ``n`` each.
    """
    m, h = len(xs), (b - a) / n
    edges = [a]
    for k, v in enumerate(xs):
        lo = v - a if k == 0 else (v - xs[k - 1]) / 2
        hi = b - v if k == m - 1 else (xs[k + 1] - v) / 2
        edges += [v - min(h / 2, lo), v + min(h / 2, hi)]
    edges.append(b)
    gaps = [(edges[2 * j], edges[2 * j + 1]) for j in range(m + 1)]
    length = sum(max(0.0, hi - lo) for lo, hi in gaps)
    share = [(n - m) * max(0.0, hi - lo) / length if length > 0 else 0.0 for lo, hi in gaps]
    counts = [int(v) for v in share]
    for j in sorted(range(len(gaps)), key=lambda j: counts[j] - share[j])[:n - m - sum(counts)]:
        counts[j] += 1
    ends = list(edges)  # widened cells of the nodes absorb the gaps that get no cell of their own
    for j, (lo, hi) in enumerate(gaps):
        if counts[j] == 0 and j > 0:
            ends[2 * j] = hi
        elif counts[j] == 0 and m:
            ends[1] = lo
    t: list[float] = []
    w: list[float] = []
    known: list[bool] = []
    for j, (lo, hi) in enumerate(gaps):
        if counts[j]:
            width = (hi - lo) / counts[j]
            t += [lo + (i + 0.5) * width for i in range(counts[j])]
            w += [width] * counts[j]
            known += [False] * counts[j]
        if j < m:
            t.append(xs[j])
            w.append(ends[2 * j + 2] - ends[2 * j + 1])
            known.append(True)
    return t, w, known


def refined_grid(t: Tensor, score: Tensor, extra: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""The nodes ``t (n,)`` (increasing, in :math:`(0, 1)`) and ``extra`` new ones, at the middle of the gaps
    :math:`[t_j, t_{j+1}]` of the largest ``score (n - 1,)`` (one per gap, at most ``n - 1``).

    The cells of the union :math:`s_1 < \dots < s_N` divide each gap at its middle; the ends go to their node:
    :math:`w_1 = (s_1 + s_2)/2`, :math:`w_i = (s_{i+1} - s_{i-1})/2`, :math:`w_N = 1 - (s_{N-1} + s_N)/2`. Each
    node lies in its cell, the weights sum to 1, and the rule is exact for :math:`h'` linear on each cell.

    Returns
    -------
    s, w : Tensor
        Nodes (increasing) and weights, ``(N,)`` with ``N = n + min(extra, n - 1)``.
    known : Tensor
        Bool ``(N,)``: the nodes that are ``t`` (in the order of ``t``).
    """
    k = max(0, min(int(extra), t.numel() - 1))
    gaps = torch.topk(score, k).indices
    s, order = torch.sort(torch.cat([t, (t[gaps] + t[gaps + 1]) / 2]))
    known = order < t.numel()
    mid = (s[1:] + s[:-1]) / 2
    edges = torch.cat([s.new_zeros(1), mid, s.new_ones(1)])
    return s, edges[1:] - edges[:-1], known


def half_cells(t: Tensor) -> Tensor:
    r"""Weights on the nodes ``t (n,)`` of the cells of every other node, :math:`t_1, t_3, \dots` (zero elsewhere).

    The cells of :math:`s_j = t_{2j-1}` divide each gap midway; the ends go to their node (as in
    :func:`refined_grid`). With ``t`` a composite midpoint rule of ``n`` cells, this is about the rule of
    ``n / 2`` cells: the two errors give the rule's order on a path (:func:`~explaind.kernel.dense.shortfall`).
    """
    s = t[::2]
    mid = (s[1:] + s[:-1]) / 2
    edges = torch.cat([s.new_zeros(1), mid, s.new_ones(1)])
    w = torch.zeros_like(t)
    w[::2] = edges[1:] - edges[:-1]
    return w
