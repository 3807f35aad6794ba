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
) -> NodePlan:
    r"""Error-controlled plan for a batch of *units* (one unit = one step and test input).

    Write :math:`h(t) = g(\theta(t))` for a unit (``O`` outputs). Each evaluation yields
    :math:`h(t)` and :math:`h'(t)`, and :math:`\int_a^b h' = h(b) - h(a)`, so every panel's error
    is measured. Batching the units of several steps makes each level one batched evaluation.

    A unit whose ``nodes``-point Gauss–Legendre estimate ``est0`` misses its tolerance gets
    :math:`h'(0), h'(1)` and becomes a *job*: a panel :math:`[A, B]` that failed its test (error
    above its tolerance :math:`\tau`) and a bracket :math:`[p, q] \subseteq [A, B]` thought to
    hold a kink (:math:`h'` jumps, at the same :math:`t` for all outputs). Each level, every job

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
    :math:`h'` changes fastest, if it changes there :data:`_KINK_RATIO` times faster than in the
    flattest gap (a kink stands out from the curvature) and the error is no larger than a kink of
    that jump makes (at most :math:`|\Delta| (B - A) / 2`; a larger one points to a kink between a
    located kink at an end of the panel and the bracket end sampled for it, which is bracketed
    then). A panel without a kink (also: probes where no gap stands out, or a kink within
    :math:`\delta/2` of the panel's ends) is retested with ``nodes`` points if it had fewer, else
    bisected into two ``nodes``-point panels. A unit stops once its summed panel error is at most
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
    """
    dev, dt = g_a.device, g_a.dtype
    rules = [tuple(torch.as_tensor(v, dtype=dt, device=dev) for v in rule_nodes("gauss-legendre", n))
             for n in (nodes, max(1, nodes // 2))]
    U = g_a.shape[0]
    exact = g_b - g_a
    eps = torch.finfo(dt).eps
    rel = tol * exact.abs().amax(-1)
    thr = rel + _FLOOR * eps * (g_a.abs().amax(-1) + g_b.abs().amax(-1))
    evals = torch.full((U,), nodes, dtype=torch.long, device=dev)
    estimate = est0.clone()
    err0 = (est0 - exact).abs().amax(-1)
    failing = torch.nonzero(err0 > thr).reshape(-1)
    acc = _Panels()
    if failing.numel():
        F = failing.numel()
        zero, one = torch.zeros(F, dtype=dt, device=dev), torch.ones(F, dtype=dt, device=dev)
        _, d = refine(torch.cat([failing, failing]), torch.cat([zero, one]))
        evals[failing] += 2
        no = torch.zeros(F, dtype=torch.bool, device=dev)
        fa, fb, da, db = g_a[failing], g_b[failing], d[:F], d[F:]
        jobs = {"unit": failing, "A": zero, "B": one, "fA": fa, "fB": fb, "dA": da, "dB": db, "sA": zero, "sB": one,
                "fsA": fa, "fsB": fb, "dsA": da, "dsB": db,
                "p": zero, "q": one, "fp": fa, "fq": fb, "dp": da, "dq": db,
                "kind": torch.full_like(failing, _GAUSS_KIND), "est": est0[failing], "err": err0[failing],
                "tol": thr[failing], "core": rel[failing], "C": torch.full_like(zero, _C0), "bis": no}
        acc_err = torch.zeros(U, dtype=dt, device=dev)
        for depth in range(1, max_depth + 1):
            total = acc_err.index_add(0, jobs["unit"], jobs["err"])
            done = (total <= thr) | (evals >= max_evals) | (depth >= max_depth)
            stop = done[jobs["unit"]]
            acc.add(_rows(jobs, stop), acc_err)
            jobs = _rows(jobs, ~stop)
            if jobs["unit"].numel() == 0:
                break
            jobs = _level(jobs, refine, rules, eps, evals, acc, acc_err)
    panels = acc.cat()
    if coarsen and panels is not None:
        panels = _coarsen(panels, refine, *rules[0], rel, thr, evals)
    return _assemble(U, rules, failing, panels, exact, estimate, evals)


#: Panel kinds: ``nodes``-point and ``max(1, nodes // 2)``-point Gauss–Legendre.
_GAUSS_KIND, _KINK_KIND = 0, 1
#: Initial constant ``C`` of the predicted kink-location error ``C (q - p)**2``.
_C0 = 0.05
#: A kink stands out where ``h'`` changes this many times faster than in the flattest gap.
_KINK_RATIO = 4.0
#: A failed panel's error is too large for a kink in its steepest gap above this fraction of
#: ``max_o |Delta h'_o| (B - A)`` (a kink errs by at most 0.21 of it with two or more nodes, 0.5 with one).
_EXPLAIN = 0.5
#: Rounding floor of the adaptive rule, in ulps of ``|g|``.
_FLOOR = 64
_FIELDS = ("kind", "unit", "a", "b", "est", "err", "fa", "fb", "tol")


def _rows(d: dict[str, Tensor], sel: Tensor) -> dict[str, Tensor]:
    """The rows ``sel`` of every field."""
    return {k: v[sel] for k, v in d.items()}


def _bracket(rows: dict[str, Tensor], t: Tensor, f: Tensor, d: Tensor, use: Tensor | None = None) -> Tensor:
    """Set each row's bracket ``p, q`` (with values and derivatives) to the gap of its sorted samples ``t (R, m)``
    (values ``f``, derivatives ``d``, ``(R, m, O)``) where ``h'`` changes fastest, among the gaps ``use (R, m-1)``.

    Returns whether ``h'`` changes there :data:`_KINK_RATIO` times faster than in the flattest gap, i.e. whether a
    kink stands out from the curvature.
    """
    slope = torch.nan_to_num((d[:, 1:] - d[:, :-1]).abs().amax(-1) / (t[:, 1:] - t[:, :-1]), nan=0.0)
    if use is not None:
        slope = torch.where(use, slope, -1.0)
    top, i = slope.max(1)
    flat = torch.where(slope < 0, torch.inf, slope).amin(1)
    r = torch.arange(i.numel(), device=i.device)
    rows.update(p=t[r, i], q=t[r, i + 1], fp=f[r, i], fq=f[r, i + 1], dp=d[r, i], dq=d[r, i + 1])
    return (top > 0) & (top > _KINK_RATIO * flat)


def _level(j: dict[str, Tensor], refine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
           rules: list[tuple[Tensor, Tensor]], eps: float, evals: Tensor, acc: _Panels,
           acc_err: Tensor) -> dict[str, Tensor]:
    """One refinement level of the jobs ``j`` (one batched evaluation); returns the jobs left open."""
    u, A, B, p, q = j["unit"], j["A"], j["B"], j["p"], j["q"]
    w = q - p
    dd = j["dq"] - j["dp"]
    off = (dd * (j["fp"] - j["fq"] + j["dq"] * w[:, None])).sum(-1) / (dd * dd).sum(-1)
    found = torch.isfinite(off) & (off > 0) & (off < w) & ~j["bis"]
    c = torch.where(found, p + off, p + 0.5 * w)
    delta = torch.nan_to_num(0.125 * j["tol"] / dd.abs().amax(-1), nan=float("inf"))
    sigma = torch.where(found, j["C"] * w * w, 0.5 * w)
    split = j["bis"] | (torch.minimum(sigma, w) <= 0.5 * delta) | (w <= 1024 * eps)
    # a kink within reach of the panel's ends is not why the panel failed: bisect it
    bis = j["bis"] | (split & ((c - A <= 0.5 * delta) | (B - c <= 0.5 * delta)))
    x = torch.where(bis, 0.5 * (A + B), c)
    at_p = split & ~bis & (x - p <= 0.5 * delta) & (p > A)
    at_q = split & ~bis & ~at_p & (q - x <= 0.5 * delta) & (q < B)
    x = torch.where(at_p, p, torch.where(at_q, q, x))
    s = torch.maximum(sigma, 0.25 * delta)
    cc = torch.minimum(torch.maximum(c, p + w / 64), q - w / 64)
    x1 = torch.maximum(cc - s, 0.5 * (p + cc))
    x2 = torch.minimum(cc + s, 0.5 * (cc + q))
    # a smooth panel is bisected into `nodes`-point halves, or first retested with `nodes` points when it had fewer
    regrade = split & bis & (j["kind"] == _KINK_KIND)
    S, R, P = (torch.nonzero(m).reshape(-1) for m in (split & ~regrade, regrade, ~split))
    fresh = split & ~regrade & ~at_p & ~at_q
    n, xs = S.numel(), x[S]
    h = _rows(j, torch.cat([S, S, R]))
    h.update(A=torch.cat([A[S], xs, A[R]]), B=torch.cat([xs, B[S], B[R]]),
             core=h["core"] * torch.cat([torch.full((2 * n,), 0.5, dtype=w.dtype, device=w.device),
                                         torch.ones_like(w[R])]),
             kind=torch.where(torch.cat([bis[S], bis[S], bis[R]]), _GAUSS_KIND, _KINK_KIND))
    groups = [torch.nonzero(h["kind"] == g).reshape(-1) for g in (_GAUSS_KIND, _KINK_KIND)]
    tn = [h["A"][g, None] + (h["B"] - h["A"])[g, None] * r[0] for g, r in zip(groups, rules)]
    req_u = torch.cat([u[fresh], *(h["unit"][g].repeat_interleave(r[0].numel()) for g, r in zip(groups, rules)),
                       u[P], u[P]])
    f, d = refine(req_u, torch.cat([x[fresh], *(t.reshape(-1) for t in tn), x1[P], x2[P]]))
    evals.index_add_(0, req_u, torch.ones_like(req_u))
    sizes = [int(fresh.sum()), *(t.numel() for t in tn), P.numel(), P.numel()]
    fs, ds = f.split(sizes), d.split(sizes)
    out = []
    if h["unit"].numel():
        fx = torch.where(at_p[S][:, None], j["fp"][S], j["fq"][S])
        dx = torch.where(at_p[S][:, None], j["dp"][S], j["dq"][S])
        fx[fresh[S]], dx[fresh[S]] = fs[0], ds[0]
        # h' at a located kink may come from either side: the halves sample it at the bracket's ends instead
        xk = rules[1][0]
        lo = ~bis[S] & (p[S] > A[S] + (xs - A[S]) * xk[-1])
        hi = ~bis[S] & (q[S] < xs + (B[S] - xs) * xk[0])
        h.update(fA=torch.cat([h["fA"][:n], fx, h["fA"][2 * n:]]), fB=torch.cat([fx, h["fB"][n:]]),
                 dA=torch.cat([h["dA"][:n], dx, h["dA"][2 * n:]]), dB=torch.cat([dx, h["dB"][n:]]),
                 sB=torch.cat([torch.where(lo, p[S], xs), h["sB"][n:]]),
                 fsB=torch.cat([torch.where(lo[:, None], j["fp"][S], fx), h["fsB"][n:]]),
                 dsB=torch.cat([torch.where(lo[:, None], j["dp"][S], dx), h["dsB"][n:]]),
                 sA=torch.cat([h["sA"][:n], torch.where(hi, q[S], xs), h["sA"][2 * n:]]),
                 fsA=torch.cat([h["fsA"][:n], torch.where(hi[:, None], j["fq"][S], fx), h["fsA"][2 * n:]]),
                 dsA=torch.cat([h["dsA"][:n], torch.where(hi[:, None], j["dq"][S], dx), h["dsA"][2 * n:]]))
        h["tol"] = h["core"] + _FLOOR * eps * (h["fA"].abs() + h["fB"].abs()).amax(-1)
        for gi, (g, (_, wq), t) in enumerate(zip(groups, rules, tn)):
            if g.numel():
                out.append(_test(_rows(h, g), t, fs[1 + gi], ds[1 + gi], wq, acc, acc_err))
    if P.numel():
        jp = _rows(j, P)
        kinked = _bracket(jp, torch.stack([jp["p"], x1[P], x2[P], jp["q"]], 1),
                          torch.stack([jp["fp"], fs[-2], fs[-1], jp["fq"]], 1),
                          torch.stack([jp["dp"], ds[-2], ds[-1], jp["dq"]], 1))
        hit = (jp["p"] == x1[P]) & (jp["q"] == x2[P])
        jp.update(C=torch.where(hit, jp["C"], 4 * jp["C"]), bis=~kinked)
        out.append(jp)
    return {k: torch.cat([o[k] for o in out]) for k in j} if out else _rows(j, torch.zeros_like(found))


def _test(h: dict[str, Tensor], t: Tensor, f: Tensor, d: Tensor, wq: Tensor, acc: _Panels,
          acc_err: Tensor) -> dict[str, Tensor]:
    """Test the panels ``h`` with Gauss nodes ``t (R, k)`` (values ``f``, derivatives ``d``, ``(R*k, O)``).

    Accepts those within their tolerance; returns the others as jobs bracketing their likeliest kink.
    """
    R, k = t.shape
    f, d = f.reshape(R, k, -1), d.reshape(R, k, -1)
    h["est"] = (h["B"] - h["A"])[:, None] * torch.einsum("q,rqo->ro", wq, d)
    h["err"] = (h["est"] - (h["fB"] - h["fA"])).abs().amax(-1)
    ok = h["err"] <= h["tol"]
    acc.add(_rows(h, ok), acc_err)
    h = _rows(h, ~ok)
    t, f, d = t[~ok], f[~ok], d[~ok]
    use = torch.ones(t.shape[0], k + 1, dtype=torch.bool, device=t.device)
    use[:, 0], use[:, -1] = h["sA"] < t[:, 0], h["sB"] > t[:, -1]
    steep = _bracket(h, torch.cat([h["sA"][:, None], t, h["sB"][:, None]], 1),
                     torch.cat([h["fsA"][:, None], f, h["fsB"][:, None]], 1),
                     torch.cat([h["dsA"][:, None], d, h["dsB"][:, None]], 1), use)
    # a kink of jump J errs by J (B - A) phi, phi <= 0.21 the offset from its nearest node or balance point: a
    # larger error than the steepest gap can explain points to a kink hidden between a located kink at an end
    # and the sample taken for that end
    ratio = h["err"] / ((h["dq"] - h["dp"]).abs().amax(-1) * (h["B"] - h["A"]))
    ja = torch.where(h["sA"] > h["A"], (h["dsA"] - h["dA"]).abs().amax(-1), 0.0)
    jb = torch.where(h["sB"] < h["B"], (h["dB"] - h["dsB"]).abs().amax(-1), 0.0)
    hidden = (ratio > _EXPLAIN) & (torch.maximum(ja, jb) > (h["dq"] - h["dp"]).abs().amax(-1))
    lo, hi = hidden & (ja >= jb), hidden & (ja < jb)
    for key, a_, b_ in (("p", "A", "sB"), ("q", "sA", "B"), ("fp", "fA", "fsB"), ("fq", "fsA", "fB"),
                        ("dp", "dA", "dsB"), ("dq", "dsA", "dB")):
        m_lo, m_hi = (lo, hi) if h[key].dim() == 1 else (lo[:, None], hi[:, None])
        h[key] = torch.where(m_lo, h[a_], torch.where(m_hi, h[b_], h[key]))
    kinked = hidden | (steep & (ratio <= _EXPLAIN))
    h.update(C=torch.full_like(h["A"], _C0), bis=~kinked)
    return h


class _Panels:
    """Accepted panels, collected level by level (fields as in :data:`_FIELDS`)."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Tensor]] = []

    def add(self, rows: dict[str, Tensor], acc_err: Tensor) -> None:
        """Accept the tested panels of ``rows`` (job fields) and add their errors to ``acc_err``."""
        if rows["unit"].numel():
            self.parts.append({"kind": rows["kind"], "unit": rows["unit"], "a": rows["A"], "b": rows["B"],
                               "est": rows["est"], "err": rows["err"], "fa": rows["fA"], "fb": rows["fB"],
                               "tol": rows["tol"]})
            acc_err.index_add_(0, rows["unit"], rows["err"])

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
