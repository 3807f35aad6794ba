r"""Quadrature of the path integral :math:`\varphi_s(x) = \int_0^1 \nabla_\theta g(\theta_s + t\Delta\theta_s, x)\,dt`.

Only this 1-D integral is approximated; it enters every decomposition as
:math:`\varphi_s(x) v \approx \sum_q w_q \nabla_\theta g(\theta(t_q), x)\, v`. Three rules:

``"gauss-legendre"``
    ``n`` Gauss–Legendre nodes on ``[0, 1]`` (default 4; exact to rounding on smooth networks).
``"midpoint"``
    ``n`` equal cells, one node at each centre (default 100; the rule of the ExPLAIND paper).
``"adaptive"`` (default)
    ``n`` Gauss–Legendre nodes (default 4) where they suffice; otherwise the segment is cut at the
    kinks of :math:`h(t) = g(\theta(t), x)` (where a ReLU switches, :math:`h'` jumps, at the same
    :math:`t` for all outputs), *located* by intersecting tangents of :math:`h`, and each piece gets
    an open Gauss–Legendre panel (no node on a kink); smooth panels that miss are bisected. Along
    the segment :math:`\int_a^b h'(t)\,dt = h(b) - h(a)` exactly, so each panel's error is *measured*.
    For every test input the panels are refined until the summed absolute panel error is at most
    ``tol * max_o |g_o(theta_{s+1}) - g_o(theta_s)| + floor`` (``floor`` = a few ulps of ``|g|``),
    for at most :data:`MAX_DEPTH` levels and up to about :data:`MAX_EVALS` evaluations per input
    and step (see :func:`adaptive_plan`). Refinement levels are batched over inputs and panels.

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

from ..exceptions import ConfigError
from ._adaptive import FLOOR, Panels, coarsen_panels, level, start_jobs, take

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
#: Most refinement levels (batched evaluations) of the adaptive rule.
MAX_DEPTH = 64
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
    first: tuple[Tensor, Tensor, Tensor] | None = None,
) -> NodePlan:
    r"""Error-controlled plan for a batch of *units* (one unit = one step and test input).

    Write :math:`h(t) = g(\theta(t))` for a unit (``O`` outputs). Each evaluation yields
    :math:`h(t)` and :math:`h'(t)`, and :math:`\int_a^b h' = h(b) - h(a)`, so every panel's error
    is measured. Batching the units of several steps makes each level one batched evaluation.

    A unit whose ``nodes``-point Gauss–Legendre estimate ``est0`` misses its tolerance becomes a
    *job*: a panel :math:`[A, B]` that failed its test (error above its tolerance :math:`\tau`) and
    a bracket :math:`[p, q] \subseteq [A, B]` thought to hold a kink (:math:`h'` jumps, at the
    same :math:`t` for all outputs). Its first job is :math:`[0, 1]`: without ``first`` it gets
    :math:`h'(0), h'(1)` and the bracket :math:`[0, 1]`. With ``first``, the samples at the
    nodes :math:`x_1 < \dots < x_n` behind ``est0``, it brackets the gap :math:`[x_i, x_{i+1}]`
    where :math:`h'` changes fastest if a kink stands out there (see below) and accounts for at
    least half the error: a kink at :math:`c` of jump :math:`\Delta = h'(x_{i+1}) - h'(x_i)` makes
    ``est0`` err by :math:`\Delta (\sum_{q > i} w_q - (1 - c))`. The bracket takes in the
    neighbouring gap when the tangents meet within their predicted error of :math:`x_i` or
    :math:`x_{i+1}` (a kink on a node), and :math:`h'(0), h'(1)` stay unevaluated: a panel ending
    at 0 or 1 that fails with no known gap explaining it brackets that end's gap and evaluates the
    missing derivative at the next level. Other units (a kink seemingly in :math:`[0, x_1]` or
    :math:`[x_n, 1]`, several, or none standing out) get :math:`h'(0), h'(1)` and bracket the
    steepest gap of :math:`0, x_1, \dots, x_n, 1` (:math:`[0, 1]` if none stands out). Each level,
    every job

    * intersects the tangents at :math:`p` and :math:`q`, least squares over the outputs,

      .. math:: c = p + \frac{\sum_o \Delta_o\,(h_o(p) - h_o(q) + h'_o(q)(q - p))}{\sum_o \Delta_o^2},
         \qquad \Delta = h'(q) - h'(p)

      (exact when :math:`h` is piecewise linear; the midpoint if :math:`c \notin (p, q)`), with
      predicted error :math:`\sigma = C (q - p)^2` from the curvature of :math:`h`;
    * if :math:`\sigma \le \delta/2`, :math:`\delta = \tau / (8 \max_o |\Delta_o|)` (a panel that
      ends :math:`\epsilon` from a kink errs by about :math:`|\Delta| \epsilon`), *splits*
      :math:`[A, B]` at :math:`c`: evaluates :math:`c` and the ``max(1, nodes // 2)``
      Gauss–Legendre nodes of :math:`[A, c]` and of :math:`[c, B]`, each half with tolerance
      :math:`\tau / 2`. These open rules never use :math:`h'(c)`, which may come from the wrong
      side of the kink (a Simpson end node there would err by :math:`|\Delta| (B - A) / 6`);
    * otherwise *probes* :math:`c \pm s`, :math:`s = \max(\sigma, \delta/4)`, and keeps as
      bracket the gap of :math:`p, c - s, c + s, q` where :math:`h'` changes fastest (:math:`C`
      quadruples unless that is the middle one), so the bracket shrinks about quadratically.

    A half that fails becomes a job bracketing the gap between its nodes and ends where
    :math:`h'` changes fastest, if it changes there
    :data:`~explaind.kernel._adaptive.KINK_RATIO` times faster than in the flattest gap (a kink
    stands out from the curvature) and the error is no larger than a kink of that jump makes (at
    most :math:`|\Delta| (B - A) / 2`; a larger one points to a kink between a located kink at an
    end of the panel and the bracket end sampled for it, which is bracketed then). A panel
    without a kink (also: probes where no gap stands out, or a kink within :math:`\delta/2` of the
    panel's ends) is retested with ``nodes`` points if it had fewer, else bisected into two
    ``nodes``-point panels. A unit stops once its summed panel error is at most
    ``tol * max_o |Delta g| + floor`` (``floor`` a few ulps of ``|g|``), after ``max_depth``
    levels or about ``max_evals`` evaluations; its open panels are kept as tested.

    With ``coarsen`` (plans that are reused for many decompositions), runs of three or more
    adjacent smooth panels (error below a hundredth of their tolerance) are then replaced by one
    ``nodes``-point Gauss–Legendre panel over their union when that keeps the unit within its
    tolerance.

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
        Gauss–Legendre nodes of the first estimate and of smooth panels (half as many next to kinks).
    coarsen : bool
        Merge smooth panels after refinement (costs ``nodes`` evaluations per merged run).
    max_depth, max_evals : int
        Refinement caps (levels, evaluations per unit).
    first : tuple of Tensor, optional
        The samples behind ``est0``: the nodes ``x (n,)`` (``rule_nodes("gauss-legendre", nodes)[0]``),
        :math:`h(x)` and :math:`h'(x)` of each unit, shape ``(U, n, O)``. Saves failing units the
        evaluation of :math:`h'(0), h'(1)` where a kink stands out between two nodes (the ``nodes``
        evaluations behind ``est0`` are counted for every unit either way).

    Raises
    ------
    ConfigError
        If ``first`` does not match ``nodes`` and ``est0``.
    """
    dev, dt = g_a.device, g_a.dtype
    rules = [tuple(torch.as_tensor(v, dtype=dt, device=dev) for v in rule_nodes("gauss-legendre", n))
             for n in (nodes, max(1, nodes // 2))]
    U = g_a.shape[0]
    if first is not None:
        _check_first(first, rules[0][0], est0)
    exact = g_b - g_a
    eps = torch.finfo(dt).eps
    rel = tol * exact.abs().amax(-1)
    thr = rel + FLOOR * eps * (g_a.abs().amax(-1) + g_b.abs().amax(-1))
    evals = torch.full((U,), nodes, dtype=torch.long, device=dev)
    estimate = est0.clone()
    err0 = (est0 - exact).abs().amax(-1)
    failing = torch.nonzero(err0 > thr).reshape(-1)
    acc = Panels()
    if failing.numel():
        jobs = start_jobs(failing, est0, err0, g_a, g_b, thr, rel, refine, evals,
                          None if first is None else (*rules[0], first[1], first[2]))
        acc_err = torch.zeros(U, dtype=dt, device=dev)
        for depth in range(1, max_depth + 1):
            total = acc_err.index_add(0, jobs["unit"], jobs["err"])
            done = (total <= thr) | (evals >= max_evals) | (depth >= max_depth)
            stop = done[jobs["unit"]]
            acc.add(take(jobs, stop), acc_err)
            jobs = take(jobs, ~stop)
            if jobs["unit"].numel() == 0:
                break
            jobs = level(jobs, refine, rules, eps, evals, acc, acc_err)
    panels = acc.cat()
    if coarsen and panels is not None:
        panels = coarsen_panels(panels, refine, *rules[0], rel, thr, evals)
    return _assemble(U, rules, failing, panels, exact, estimate, evals)


def _check_first(first: tuple[Tensor, Tensor, Tensor], x01: Tensor, est0: Tensor) -> None:
    """Raise :class:`~explaind.exceptions.ConfigError` unless ``first`` fits the nodes ``x01 (n,)`` and ``est0``."""
    x, h, d = first
    (U, O), n = est0.shape, x01.numel()
    if tuple(x.shape) != (n,) or tuple(h.shape) != (U, n, O) or tuple(d.shape) != (U, n, O):
        raise ConfigError(f"adaptive_plan: 'first' must hold the nodes ({n},) and h, h' ({U}, {n}, {O}) of the first "
                          f"estimate; got shapes {tuple(x.shape)}, {tuple(h.shape)}, {tuple(d.shape)}. Pass the "
                          f"samples behind est0, or first=None.")
    xx = x.to(device=x01.device, dtype=x01.dtype)
    if not torch.allclose(xx, x01, rtol=0, atol=64 * torch.finfo(x01.dtype).eps):
        raise ConfigError(f"adaptive_plan: the nodes of 'first' must be the {n} Gauss-Legendre nodes on [0, 1] "
                          f"{x01.tolist()}; got {xx.tolist()}. Pass rule_nodes('gauss-legendre', {n})[0].")


def _assemble(U: int, rules: list[tuple[Tensor, Tensor]], failing: Tensor, panels: dict[str, Tensor] | None,
              exact: Tensor, estimate: Tensor, evals: Tensor) -> NodePlan:
    """Node lists per unit: Gauss–Legendre for passing units, merged panel nodes for the others."""
    dev, dt = exact.device, exact.dtype
    good = torch.ones(U, dtype=torch.bool, device=dev)
    good[failing] = False
    g_units = torch.nonzero(good).reshape(-1)
    units = [g_units.repeat_interleave(rules[0][0].numel())]
    ts = [rules[0][0].repeat(g_units.numel())]
    ws = [rules[0][1].repeat(g_units.numel())]
    if failing.numel():
        estimate[failing] = 0
    if panels is not None:
        estimate.index_add_(0, panels["unit"], panels["est"])
        for kind, (pos, wts) in enumerate(rules):
            sel = panels["kind"] == kind
            ins, lo, hi = panels["unit"][sel], panels["a"][sel], panels["b"][sel]
            h = hi - lo
            for p_, w_ in zip(pos.tolist(), wts.tolist()):
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
