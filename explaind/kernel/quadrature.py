r"""Quadrature of the path integral :math:`\varphi_s(x) = \int_0^1 \nabla_\theta g(\theta_s + t\Delta\theta_s, x)\,dt`.

Only this 1-D integral is approximated; it enters every decomposition as
:math:`\varphi_s(x) v \approx \sum_q w_q \nabla_\theta g(\theta(t_q), x)\, v`. Three rules:

``"gauss-legendre"``
    ``n`` Gauss–Legendre nodes on ``[0, 1]`` (default 4; exact to rounding on smooth networks).
``"midpoint"``
    ``n`` equal cells, one node at each centre (default 100; the rule of the ExPLAIND paper).
``"adaptive"`` (default)
    Gauss–Legendre panels of ``n`` nodes (default 4), bisected where needed. Along the
    segment, :math:`\int_a^b \nabla g(\theta(t))\Delta\theta\,dt = g(\theta(b)) - g(\theta(a))`
    exactly, so each panel's error is *measured* from two forward passes. For every test input
    the panels are refined until the summed absolute panel error is at most
    ``tol * max_o |g_o(theta_{s+1}) - g_o(theta_s)| + floor`` (``floor`` = a few ulps of ``|g|``);
    only panels whose error exceeds their share of that budget (proportional to their width)
    are bisected, at most :data:`MAX_DEPTH` times and up to about :data:`MAX_EVALS` evaluations
    per input and step. Refinement levels are batched over inputs and panels.

Each rule yields a :class:`NodePlan` per step: nodes ``t (T, Q)`` and weights ``w (T, Q)`` per
test input (zero-weight padding), the exact difference ``g(theta_{s+1}) - g(theta_s)``, the
estimate along :math:`\Delta\theta_s` (adaptive rule) and the evaluation count. The engine uses the
same plan for every part of the step's update, so ``exact - estimate`` is the whole
quadrature error and is reported as such.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RULES",
    "DEFAULT_NODES",
    "MAX_DEPTH",
    "MAX_EVALS",
    "NodePlan",
    "rule_nodes",
    "fixed_plan",
    "adaptive_plan",
]

RULES = ("adaptive", "gauss-legendre", "midpoint")
#: Nodes per rule when ``nodes=None`` (per panel for ``"adaptive"``).
DEFAULT_NODES = {"adaptive": 4, "gauss-legendre": 4, "midpoint": 100}
#: Deepest bisection of the adaptive rule (panel width ``2**-MAX_DEPTH``).
MAX_DEPTH = 40
#: Evaluations per test input and step after which the adaptive rule stops refining.
MAX_EVALS = 4096


def rule_nodes(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of a rule on ``[0, 1]`` (float64 numpy arrays of length ``n``; weights sum to 1)."""
    if rule == "midpoint":
        return (np.arange(n, dtype=np.float64) + 0.5) / n, np.full(n, 1.0 / n)
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


@dataclass
class NodePlan:
    r"""Quadrature nodes of one step for each test input.

    Attributes
    ----------
    t, w : Tensor
        Nodes and weights, shape ``(T, Q)``; padding has weight 0.
    exact : Tensor
        ``g(theta_{s+1}) - g(theta_s)``, shape ``(T, O)``.
    estimate : Tensor or None
        :math:`\sum_q w_q \nabla g(\theta(t_q))\,\Delta\theta_s`, shape ``(T, O)`` (adaptive rule).
    evals : Tensor
        Evaluations spent per test input, shape ``(T,)`` (JVPs at nodes, plus forward passes at
        bisection points for the adaptive rule).
    """

    t: Tensor
    w: Tensor
    exact: Tensor
    estimate: Tensor | None
    evals: Tensor

    def split(self, n_steps: int) -> list[NodePlan]:
        """Split a plan over ``n_steps * T`` units (step-major) into one plan per step, trimming padding."""
        T = self.t.shape[0] // n_steps
        out = []
        for j in range(n_steps):
            sl = slice(j * T, (j + 1) * T)
            used = torch.nonzero((self.w[sl] != 0).any(0)).reshape(-1)
            Q = int(used.max()) + 1 if used.numel() else 1
            est = None if self.estimate is None else self.estimate[sl]
            out.append(NodePlan(self.t[sl, :Q], self.w[sl, :Q], self.exact[sl], est, self.evals[sl]))
        return out

    def take(self, idx: Tensor) -> NodePlan:
        """The plan of a subset of test inputs."""
        est = None if self.estimate is None else self.estimate[idx]
        return NodePlan(self.t[idx], self.w[idx], self.exact[idx], est, self.evals[idx])

    def by_node(self, min_shared: int = 2) -> tuple[list[tuple[Tensor, Tensor, Tensor]], tuple[Tensor, Tensor, Tensor]]:
        """Group the (input, node) pairs by node value.

        Returns
        -------
        shared : list of (t, sub, w)
            A node ``t`` (0-d) used by the inputs ``sub (S,)`` (``S >= min_shared``) with weights ``w (S,)``.
        single : (idx, t, w)
            The pairs whose node no other input uses, each of shape ``(P,)``.
        """
        mask = self.w != 0
        idx = torch.arange(self.t.shape[0], device=self.t.device)[:, None].expand_as(mask)[mask]
        tv, wv = self.t[mask], self.w[mask]
        uniq, inverse, counts = torch.unique(tv, return_inverse=True, return_counts=True)
        shared = []
        min_shared = max(2, int(min_shared))
        for u in torch.nonzero(counts >= min_shared).reshape(-1).tolist():
            sel = inverse == u
            shared.append((uniq[u], idx[sel], wv[sel]))
        lone = counts[inverse] < min_shared
        return shared, (idx[lone], tv[lone], wv[lone])


def fixed_plan(rule: str, n: int, exact: Tensor) -> NodePlan:
    """The same ``n``-node rule for every test input (``exact`` gives ``T``, device and dtype)."""
    x, w = rule_nodes(rule, n)
    T = exact.shape[0]
    tt = torch.as_tensor(x, dtype=exact.dtype, device=exact.device).expand(T, n).contiguous()
    ww = torch.as_tensor(w, dtype=exact.dtype, device=exact.device).expand(T, n).contiguous()
    return NodePlan(tt, ww, exact, None, torch.full((T,), n, dtype=torch.long, device=exact.device))


def adaptive_plan(
    est0: Tensor,
    g_a: Tensor,
    g_b: Tensor,
    refine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    *,
    tol: float,
    nodes: int = 4,
    coarsen: bool = False,
    max_depth: int = MAX_DEPTH,
    max_evals: int = MAX_EVALS,
) -> NodePlan:
    r"""Error-controlled plan for a batch of *units* (one unit = one step and test input).

    Batching the units of several steps makes each refinement level one batched evaluation.
    A unit whose ``nodes``-point Gauss–Legendre estimate ``est0`` misses its tolerance is redone
    with nested Simpson panels (both ends and the middle). Bisecting a panel reuses its three
    points and adds two; with those five points the panel is first re-checked with Boole's rule
    (order 7) and accepted if that suffices (smooth parts), otherwise its two halves go on as
    Simpson panels (kinks). Each evaluation yields :math:`g(\theta(t))` (so every panel's exact
    integral) and the derivative at once.

    A panel of width ``h`` is refined while its error exceeds ``tol * max_o |Delta g| * h``
    plus a rounding floor of a few ulps of ``|g|`` at its ends, and its unit's summed error
    exceeds ``tol * max_o |Delta g|`` plus the same floor at the segment ends.

    With ``coarsen`` (plans that are reused for many decompositions), runs of three or more
    adjacent smooth panels (error below a hundredth of their tolerance) are then replaced by one
    Gauss–Legendre panel over their union when that keeps the unit within its tolerance: around
    a kink the bisection leaves a geometric sequence of small smooth panels, which one
    ``nodes``-point panel per side integrates as well with far fewer nodes.

    Parameters
    ----------
    est0 : Tensor
        Gauss–Legendre estimate of each unit on ``[0, 1]``, shape ``(U, O)``.
    g_a, g_b : Tensor
        ``g`` at the unit's segment start and end, shape ``(U, O)``.
    refine : callable
        ``(units (P,), t (P,)) -> (primal (P, O), tangent (P, O))``: :math:`g(\theta(t))` and
        :math:`\nabla g(\theta(t))\Delta\theta` of each unit's segment at ``t``.
    tol : float
        Relative tolerance.
    nodes : int
        Gauss–Legendre nodes of the first estimate and of merged panels.
    coarsen : bool
        Merge smooth panels after refinement (costs ``nodes`` evaluations per merged run).
    max_depth, max_evals : int
        Refinement caps.
    """
    dev, dt = g_a.device, g_a.dtype
    x01, w01 = (torch.as_tensor(v, dtype=dt, device=dev) for v in rule_nodes("gauss-legendre", nodes))
    U = g_a.shape[0]
    exact = g_b - g_a
    eps = torch.finfo(dt).eps
    rel = tol * exact.abs().amax(-1)
    thr = rel + _FLOOR * eps * (g_a.abs().amax(-1) + g_b.abs().amax(-1))
    evals = torch.full((U,), nodes, dtype=torch.long, device=dev)
    estimate = est0.clone()
    failing = torch.nonzero((est0 - exact).abs().amax(-1) > thr).reshape(-1)
    acc = _Panels()
    if failing.numel():
        F = failing.numel()
        t5 = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=dt, device=dev)
        primal, tangent = refine(failing.repeat_interleave(5), t5.repeat(F))
        primal, tangent = primal.reshape(F, 5, -1).clone(), tangent.reshape(F, 5, -1)
        primal[:, 0], primal[:, 4] = g_a[failing], g_b[failing]
        evals[failing] += 5
        unit = torch.cat([failing, failing])
        pa = torch.cat([t5[0].expand(F), t5[2].expand(F)])
        pb = torch.cat([t5[2].expand(F), t5[4].expand(F)])
        f = [torch.cat([primal[:, i], primal[:, i + 2]]) for i in (0, 1, 2)]  # values at a, m, b
        d = [torch.cat([tangent[:, i], tangent[:, i + 2]]) for i in (0, 1, 2)]  # derivatives at a, m, b
        acc_err = torch.zeros(U, dtype=dt, device=dev)
        for depth in range(1, max_depth + 1):
            width = pb - pa
            est = width[:, None] / 6 * (d[0] + 4 * d[1] + d[2])
            err = (est - (f[2] - f[0])).abs().amax(-1)
            tol_p = rel[unit] * width + _FLOOR * eps * (f[0].abs() + f[2].abs()).amax(-1)
            total = acc_err.index_add(0, unit, err)
            done = (total <= thr) | (evals >= max_evals) | (depth >= max_depth)
            split = ~done[unit] & (err > tol_p)
            keep = ~split
            acc.add(_SIMPSON_KIND, unit[keep], pa[keep], pb[keep], est[keep], err[keep], f[0][keep], f[2][keep],
                    tol_p[keep])
            acc_err.index_add_(0, unit[keep], err[keep])
            if not bool(split.any()):
                break
            u, a, b, h, tp = unit[split], pa[split], pb[split], width[split], tol_p[split]
            fa, fm, fb = (v[split] for v in f)
            da, dm, db = (v[split] for v in d)
            m = 0.5 * (a + b)
            fq, dq = refine(torch.cat([u, u]), torch.cat([0.5 * (a + m), 0.5 * (m + b)]))
            evals.index_add_(0, u, torch.full_like(u, 2))
            n = u.numel()
            fq1, fq2, dq1, dq2 = fq[:n], fq[n:], dq[:n], dq[n:]
            boole = h[:, None] / 90 * (7 * da + 32 * dq1 + 12 * dm + 32 * dq2 + 7 * db)
            b_err = (boole - (fb - fa)).abs().amax(-1)
            ok = b_err <= tp
            acc.add(_BOOLE_KIND, u[ok], a[ok], b[ok], boole[ok], b_err[ok], fa[ok], fb[ok], tp[ok])
            acc_err.index_add_(0, u[ok], b_err[ok])
            go = ~ok
            u, a, b, m = u[go], a[go], b[go], m[go]
            unit = torch.cat([u, u])
            pa, pb = torch.cat([a, m]), torch.cat([m, b])
            f = [torch.cat([fa[go], fm[go]]), torch.cat([fq1[go], fq2[go]]), torch.cat([fm[go], fb[go]])]
            d = [torch.cat([da[go], dm[go]]), torch.cat([dq1[go], dq2[go]]), torch.cat([dm[go], db[go]])]
            if unit.numel() == 0:
                break
    panels = acc.cat()
    if coarsen and panels is not None:
        panels = _coarsen(panels, refine, x01, w01, rel, thr, evals)
    return _assemble(U, nodes, x01, w01, failing, panels, exact, estimate, evals)


_SIMPSON_KIND, _BOOLE_KIND, _GAUSS_KIND = 0, 1, 2
_SIMPSON = ((0.0, 0.5, 1.0), (1 / 6, 4 / 6, 1 / 6))
_BOOLE = ((0.0, 0.25, 0.5, 0.75, 1.0), (7 / 90, 32 / 90, 12 / 90, 32 / 90, 7 / 90))
#: Rounding floor of the adaptive rule, in ulps of ``|g|``.
_FLOOR = 64
_FIELDS = ("kind", "unit", "a", "b", "est", "err", "fa", "fb", "tol")


class _Panels:
    """Accepted panels, collected level by level (fields as in :data:`_FIELDS`)."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Tensor]] = []

    def add(self, kind: int, unit: Tensor, a: Tensor, b: Tensor, est: Tensor, err: Tensor, fa: Tensor, fb: Tensor,
            tol: Tensor) -> None:
        if unit.numel():
            self.parts.append({"kind": torch.full_like(unit, kind), "unit": unit, "a": a, "b": b, "est": est,
                               "err": err, "fa": fa, "fb": fb, "tol": tol})

    def cat(self) -> dict[str, Tensor] | None:
        if not self.parts:
            return None
        return {k: torch.cat([p[k] for p in self.parts]) for k in _FIELDS}


def _coarsen(p: dict[str, Tensor], refine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x01: Tensor,
             w01: Tensor, rel: Tensor, thr: Tensor, evals: Tensor) -> dict[str, Tensor]:
    """Replace runs of >= 3 adjacent smooth panels by one Gauss–Legendre panel where the unit stays in tolerance."""
    order = torch.argsort(p["a"], stable=True)
    order = order[torch.argsort(p["unit"][order], stable=True)]
    p = {k: v[order] for k, v in p.items()}
    smooth = p["err"] <= 1e-2 * p["tol"]
    n = smooth.numel()
    new_run = torch.ones(n, dtype=torch.bool, device=smooth.device)
    new_run[1:] = ~smooth[:-1] | (p["unit"][1:] != p["unit"][:-1]) | (p["a"][1:] != p["b"][:-1])
    run = torch.cumsum(new_run.long(), 0) - 1
    counts = torch.bincount(run[smooth], minlength=int(run.max()) + 1)
    cand = torch.nonzero(counts >= 3).reshape(-1)
    if cand.numel() == 0:
        return p
    in_cand = smooth & (counts[run] >= 3)
    first = torch.full((int(run.max()) + 1,), n, dtype=torch.long, device=smooth.device)
    first.scatter_reduce_(0, run[in_cand], torch.nonzero(in_cand).reshape(-1), reduce="amin")
    last = torch.full_like(first, -1).scatter_reduce_(0, run[in_cand], torch.nonzero(in_cand).reshape(-1),
                                                      reduce="amax")
    i0, i1 = first[cand], last[cand]
    unit, A, B = p["unit"][i0], p["a"][i0], p["b"][i1]
    fA, fB = p["fa"][i0], p["fb"][i1]
    k = x01.numel()
    _, tangent = refine(unit.repeat_interleave(k), (A[:, None] + (B - A)[:, None] * x01[None, :]).reshape(-1))
    est = (B - A)[:, None] * torch.einsum("q,cqo->co", w01, tangent.reshape(unit.numel(), k, -1))
    err = (est - (fB - fA)).abs().amax(-1)
    evals.index_add_(0, unit, torch.full_like(unit, k))
    run_err = torch.zeros(cand.numel(), dtype=err.dtype, device=err.device)
    slot = torch.full_like(first, -1)
    slot[cand] = torch.arange(cand.numel(), device=cand.device)
    run_err.index_add_(0, slot[run[in_cand]], p["err"][in_cand])
    total = torch.zeros_like(thr).index_add_(0, p["unit"], p["err"])
    ok = err <= run_err + (thr[unit] - total[unit]).clamp_min(0) * (B - A)
    drop = in_cand & ok[slot[run].clamp_min(0)] & (slot[run] >= 0)
    keep = {k2: v[~drop] for k2, v in p.items()}
    add = {"kind": torch.full_like(unit[ok], _GAUSS_KIND), "unit": unit[ok], "a": A[ok], "b": B[ok], "est": est[ok],
           "err": err[ok], "fa": fA[ok], "fb": fB[ok], "tol": rel[unit[ok]] * (B - A)[ok]}
    return {k2: torch.cat([keep[k2], add[k2]]) for k2 in _FIELDS}


def _assemble(U: int, nodes: int, x01: Tensor, w01: Tensor, failing: Tensor, panels: dict[str, Tensor] | None,
              exact: Tensor, estimate: Tensor, evals: Tensor) -> NodePlan:
    """Node lists per unit: Gauss–Legendre for passing units, merged panel nodes for the others."""
    dev, dt = exact.device, exact.dtype
    good = torch.ones(U, dtype=torch.bool, device=dev)
    good[failing] = False
    g_units = torch.nonzero(good).reshape(-1)
    units = [g_units.repeat_interleave(nodes)]
    ts = [x01.repeat(g_units.numel())]
    ws = [w01.repeat(g_units.numel())]
    if failing.numel():
        estimate[failing] = 0
    if panels is not None:
        estimate.index_add_(0, panels["unit"], panels["est"])
        rules = {_SIMPSON_KIND: _SIMPSON, _BOOLE_KIND: _BOOLE,
                 _GAUSS_KIND: (tuple(x01.tolist()), tuple(w01.tolist()))}
        for kind, (pos, wts) in rules.items():
            sel = panels["kind"] == kind
            ins, lo, hi = panels["unit"][sel], panels["a"][sel], panels["b"][sel]
            h = hi - lo
            for p_, w_ in zip(pos, wts):
                units.append(ins)
                ts.append(lo + p_ * h)
                ws.append(w_ * h)
    unit, t, w = torch.cat(units), torch.cat(ts), torch.cat(ws)
    order = torch.argsort(t, stable=True)
    order = order[torch.argsort(unit[order], stable=True)]
    unit, t, w = unit[order], t[order], w[order]
    new = torch.ones_like(unit, dtype=torch.bool)
    new[1:] = (unit[1:] != unit[:-1]) | (t[1:] != t[:-1])
    group = torch.cumsum(new.long(), 0) - 1
    unit, t = unit[new], t[new]
    w = torch.zeros(unit.numel(), dtype=dt, device=dev).index_add_(0, group, w)
    counts = torch.bincount(unit, minlength=U)
    Q = max(int(counts.max()), 1)
    slot = torch.arange(unit.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    tt = torch.zeros(U, Q, dtype=dt, device=dev)
    ww = torch.zeros(U, Q, dtype=dt, device=dev)
    tt[unit, slot] = t
    ww[unit, slot] = w
    return NodePlan(tt, ww, exact, estimate, evals)
