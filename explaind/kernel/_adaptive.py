r"""Refinement machinery of the adaptive rule: jobs, levels, panel tests and coarsening.

Used by :func:`~explaind.kernel.quadrature.adaptive_plan` (see there for the rule). A *unit* is
one step and test input, :math:`h(t) = g(\theta_s + t\Delta\theta_s, x)` with ``O`` outputs;
``refine(units (P,), t (P,)) -> (h (P, O), h' (P, O))`` evaluates units at points of ``[0, 1]``.

A *job* (a dict of per-row tensors) is a panel :math:`[A, B]` of a unit that failed its test,
with

* ``fA, fB, dA, dB``: :math:`h, h'` at the panel's ends;
* ``sA, sB`` (``fsA`` ... ``dsB``): the samples nearest the ends on the panel's side of a kink
  located at an end (``sA = A``, ``sB = B`` otherwise), where :math:`h'` is that of the panel;
* ``p, q`` (``fp`` ... ``dq``): a bracket :math:`[p, q] \subseteq [A, B]` thought to hold a kink;
* ``kind`` (the rule of its last test), ``est``, ``err`` (that test's estimate and error),
  ``tol``, ``core`` (its share of the unit's tolerance, with and without the rounding floor),
  ``C`` (curvature constant of the bracket) and ``bis`` (no kink: bisect).

:math:`h'(0)` and :math:`h'(1)` are not evaluated for units that start from the samples of the
first estimate (see :func:`start_jobs`): they are ``nan`` until a panel needs them. A gap of
samples with an unknown derivative at an end is never taken as the steepest; a failed panel that
no known gap explains brackets it and *fetches* the derivative at the next level (one evaluation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GAUSS_KIND", "KINK_KIND", "FLOOR", "Panels", "start_jobs", "level", "coarsen_panels", "take"]

Jobs = dict[str, Tensor]
Refine = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

#: Panel kinds: ``nodes``-point and ``max(1, nodes // 2)``-point Gauss–Legendre.
GAUSS_KIND, KINK_KIND = 0, 1
#: Initial constant ``C`` of the predicted kink-location error ``C (q - p)**2``.
C0 = 0.05
#: A kink stands out where ``h'`` changes this many times faster than in the flattest gap.
KINK_RATIO = 4.0
#: A failed panel's error is too large for a kink in its steepest gap above this fraction of
#: ``max_o |Delta h'_o| (B - A)`` (a kink errs by at most 0.21 of it with two or more nodes, 0.5 with one).
EXPLAIN = 0.5
#: Rounding floor of the adaptive rule, in ulps of ``|g|``.
FLOOR = 64
#: Fields of an accepted panel.
FIELDS = ("kind", "unit", "a", "b", "est", "err", "fa", "fb", "tol")


def take(d: Jobs, sel: Tensor) -> Jobs:
    """The rows ``sel`` (mask or indices) of every field."""
    return {k: v[sel] for k, v in d.items()}


def bracket(rows: Jobs, t: Tensor, f: Tensor, d: Tensor, use: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Set each row's bracket to the gap of its samples where :math:`h'` changes fastest.

    The slope of gap :math:`[t_i, t_{i+1}]` is :math:`\max_o |d_{i+1,o} - d_{i,o}| / (t_{i+1} - t_i)`;
    gaps excluded by ``use`` or with an unknown (``nan``) derivative at an end are never taken.

    Parameters
    ----------
    rows : dict
        Jobs; ``p, q, fp, fq, dp, dq`` are set (``R`` rows).
    t : Tensor
        Sorted samples, shape ``(R, m)``.
    f, d : Tensor
        :math:`h, h'` there, shape ``(R, m, O)``.
    use : Tensor, optional
        Gaps that may be taken, shape ``(R, m - 1)``.

    Returns
    -------
    stands : Tensor
        ``(R,)``: whether :math:`h'` changes there :data:`KINK_RATIO` times faster than in the flattest
        gap taken into account, i.e. whether a kink stands out from the curvature.
    i : Tensor
        ``(R,)``: the index of the gap (``p = t[i]``, ``q = t[i + 1]``).
    """
    slope = torch.nan_to_num((d[:, 1:] - d[:, :-1]).abs().amax(-1) / (t[:, 1:] - t[:, :-1]), nan=0.0)
    known = ~torch.isnan(d).any(-1)
    ok = known[:, 1:] & known[:, :-1]
    if use is not None:
        ok = ok & use
    slope = torch.where(ok, slope, -1.0)
    top, i = slope.max(1)
    flat = torch.where(slope < 0, torch.inf, slope).amin(1)
    r = torch.arange(i.numel(), device=i.device)
    rows.update(p=t[r, i], q=t[r, i + 1], fp=f[r, i], fq=f[r, i + 1], dp=d[r, i], dq=d[r, i + 1])
    return (top > 0) & (top > KINK_RATIO * flat), i


def _place(rows: Jobs, t: Tensor, f: Tensor, d: Tensor, i: Tensor) -> Tensor:
    r"""Widen each bracket (gap ``i`` of the samples ``t (R, m)``) over a sample that holds its kink.

    The tangents at the gap's ends meet at :math:`p + o`, :math:`o` as in :func:`level`. A kink on a
    sample, whose :math:`h'` comes from one side (or is a mean), makes them meet at that sample, up
    to the predicted error :math:`\sigma =` :data:`C0` :math:`(q - p)^2`; as a bracket end it would
    be approached only linearly. Where :math:`o \le \sigma` (or :math:`o \ge q - p - \sigma`) the
    bracket takes in the neighbouring gap on that side, where the tangents from either side of the
    kink meet at it. Returns whether the kink is placed: inside the gap, or the neighbouring gap
    exists.
    """
    m = t.shape[1]
    r = torch.arange(i.numel(), device=i.device)
    w = rows["q"] - rows["p"]
    off = _meet(rows)
    sigma = C0 * w * w
    left = (off <= sigma) & (i > 0)
    right = ~left & (off >= w - sigma) & (i + 2 < m)
    i0, i1 = i - left.long(), i + 1 + right.long()
    rows.update(p=t[r, i0], q=t[r, i1], fp=f[r, i0], fq=f[r, i1], dp=d[r, i0], dq=d[r, i1])
    return ((off > 0) & (off < w)) | left | right


def start_jobs(failing: Tensor, est0: Tensor, err0: Tensor, g_a: Tensor, g_b: Tensor, thr: Tensor, rel: Tensor,
               refine: Refine, evals: Tensor, first: tuple[Tensor, Tensor, Tensor, Tensor] | None) -> Jobs:
    r"""The first job of each unit ``failing (F,)``: the panel :math:`[0, 1]` and a bracket.

    Without ``first``, evaluates :math:`h'(0), h'(1)` and brackets :math:`[0, 1]`. With the first
    estimate's rule and samples ``first = (x (n,), w (n,), h (U, n, O), h' (U, n, O))``, a unit
    whose steepest gap :math:`[x_i, x_{i+1}]` stands out (:func:`bracket`) and accounts for the
    error brackets that gap (:func:`_place`) and leaves :math:`h'(0), h'(1)` unknown. A kink at
    :math:`c` (where the tangents meet, clipped to the gap) of jump
    :math:`\Delta = h'(x_{i+1}) - h'(x_i)` makes the first estimate err by

    .. math:: e = \Delta \, S(c), \qquad S(c) = \sum_{q > i} w_q - (1 - c)

    (exact for piecewise linear :math:`h`); it accounts for the error when
    :math:`\max_o |\mathrm{est0}_o - \Delta g_o - e_o| \le \max_o |\mathrm{est0}_o - \Delta g_o| / 2`.
    The others (a kink in :math:`[0, x_1]` or :math:`[x_n, 1]`, several, or none visible) evaluate
    :math:`h'(0), h'(1)` and bracket the steepest gap of :math:`0, x_1, \dots, x_n, 1`, or
    :math:`[0, 1]` where none stands out. Other arguments as in
    :func:`~explaind.kernel.quadrature.adaptive_plan`; ``evals`` is updated.
    """
    dev, dt = g_a.device, g_a.dtype
    F = failing.numel()
    zero, one = torch.zeros(F, dtype=dt, device=dev), torch.ones(F, dtype=dt, device=dev)
    fa, fb = g_a[failing], g_b[failing]
    jobs = {"unit": failing, "A": zero, "B": one, "fA": fa, "fB": fb, "sA": zero, "sB": one, "fsA": fa, "fsB": fb,
            "p": zero, "q": one, "fp": fa, "fq": fb, "kind": torch.full_like(failing, GAUSS_KIND),
            "est": est0[failing], "err": err0[failing], "tol": thr[failing], "core": rel[failing],
            "C": torch.full_like(zero, C0), "bis": torch.zeros(F, dtype=torch.bool, device=dev)}
    if first is None:
        _, d = refine(torch.cat([failing, failing]), torch.cat([zero, one]))
        evals[failing] += 2
        da, db = d[:F], d[F:]
        jobs.update(dA=da, dB=db, dsA=da, dsB=db, dp=da, dq=db)
        return jobs
    x, wx = (v.to(device=dev, dtype=dt) for v in first[:2])
    t = x.expand(F, -1)
    f, d = (v[failing].to(device=dev, dtype=dt) for v in first[2:])
    unknown = torch.full_like(fa, torch.nan)
    jobs.update({key: unknown.clone() for key in ("dA", "dB", "dsA", "dsB", "dp", "dq")})
    jobs.update({key: jobs[key].clone() for key in ("p", "q", "fp", "fq")})
    inner = torch.zeros(F, dtype=torch.bool, device=dev)
    if x.numel() >= 2:
        br: Jobs = {}
        stands, i = bracket(br, t, f, d)
        w = br["q"] - br["p"]
        c = br["p"] + torch.minimum(torch.nan_to_num(_meet(br), nan=0.0).clamp_min(0), w)
        tail = torch.cat([wx.flip(0).cumsum(0).flip(0)[1:], wx[:1] * 0])  # sum of the weights after node i
        e = est0[failing] - (fb - fa)
        miss = (e - (br["dq"] - br["dp"]) * (tail[i] - (1 - c))[:, None]).abs().amax(-1)
        inner = stands & (miss <= 0.5 * e.abs().amax(-1)) & _place(br, t, f, d, i)
        _put(jobs, inner, br)
    ends = torch.nonzero(~inner).reshape(-1)
    E = ends.numel()
    if E:
        _, de = refine(torch.cat([failing[ends], failing[ends]]), torch.cat([zero[ends], one[ends]]))
        evals[failing[ends]] += 2
        da, db = de[:E], de[E:]
        for key, v in (("dA", da), ("dB", db), ("dsA", da), ("dsB", db), ("dp", da), ("dq", db)):
            jobs[key][ends] = v
        br = {}
        ts = torch.cat([zero[ends, None], t[ends], one[ends, None]], 1)
        fs = torch.cat([fa[ends, None], f[ends], fb[ends, None]], 1)
        ds = torch.cat([da[:, None], d[ends], db[:, None]], 1)
        stands, i = bracket(br, ts, fs, ds)
        _place(br, ts, fs, ds, i)
        _put(jobs, ends[stands], take(br, stands))
    return jobs


def _meet(rows: Jobs) -> Tensor:
    r"""Where the tangents at each bracket's ends meet, as the offset :math:`o` from ``p`` (see :func:`level`)."""
    w = rows["q"] - rows["p"]
    dd = rows["dq"] - rows["dp"]
    return (dd * (rows["fp"] - rows["fq"] + rows["dq"] * w[:, None])).sum(-1) / (dd * dd).sum(-1)


def _put(jobs: Jobs, rows: Tensor, br: Jobs) -> None:
    """Set the bracket (``p, q, fp, fq, dp, dq``) of the jobs ``rows`` (mask or indices) to ``br``'s."""
    for key in ("p", "q", "fp", "fq", "dp", "dq"):
        jobs[key][rows] = br[key] if rows.dtype != torch.bool else br[key][rows]


def level(j: Jobs, refine: Refine, rules: list[tuple[Tensor, Tensor]], eps: float, evals: Tensor, acc: Panels,
          acc_err: Tensor) -> Jobs:
    r"""One refinement level of the jobs ``j`` (one batched evaluation); returns the jobs left open.

    Each job

    * intersects the tangents at :math:`p` and :math:`q`, least squares over the outputs,

      .. math:: c = p + \frac{\sum_o \Delta_o\,(h_o(p) - h_o(q) + h'_o(q)(q - p))}{\sum_o \Delta_o^2},
         \qquad \Delta = h'(q) - h'(p)

      (the midpoint if :math:`c \notin (p, q)`), with predicted error :math:`\sigma = C (q - p)^2`;
    * if :math:`\sigma \le \delta/2`, :math:`\delta = \tau / (8 \max_o |\Delta_o|)`, splits the panel at
      :math:`c` into two ``max(1, nodes // 2)``-point panels with half the tolerance each, tested by
      :func:`_grade` (a kink within :math:`\delta/2` of the panel's ends: bisects into two
      ``nodes``-point panels, or first retests with ``nodes`` points a panel that had fewer);
    * otherwise probes :math:`c \pm s`, :math:`s = \max(\sigma, \delta/4)`, and brackets the gap of
      :math:`p, c - s, c + s, q` where :math:`h'` changes fastest (:math:`C` quadruples unless that is
      the middle one); no gap standing out means no kink: the job bisects next;
    * with an unknown :math:`h'(p)` or :math:`h'(q)` (an end of the segment), evaluates it and
      does nothing else.
    """
    fetch = torch.isnan(j["dp"]).any(-1) | torch.isnan(j["dq"]).any(-1)
    jf = None
    if bool(fetch.any()):
        jf, j = take(j, fetch), take(j, ~fetch)
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
    regrade = split & bis & (j["kind"] == KINK_KIND)
    S, R, P = (torch.nonzero(m).reshape(-1) for m in (split & ~regrade, regrade, ~split))
    fresh = split & ~regrade & ~at_p & ~at_q
    n, xs = S.numel(), x[S]
    h = take(j, torch.cat([S, S, R]))
    h.update(A=torch.cat([A[S], xs, A[R]]), B=torch.cat([xs, B[S], B[R]]),
             core=h["core"] * torch.cat([torch.full((2 * n,), 0.5, dtype=w.dtype, device=w.device),
                                         torch.ones_like(w[R])]),
             kind=torch.where(torch.cat([bis[S], bis[S], bis[R]]), GAUSS_KIND, KINK_KIND))
    groups = [torch.nonzero(h["kind"] == g).reshape(-1) for g in (GAUSS_KIND, KINK_KIND)]
    tn = [h["A"][g, None] + (h["B"] - h["A"])[g, None] * r[0] for g, r in zip(groups, rules)]
    req_u = [u[fresh], *(h["unit"][g].repeat_interleave(r[0].numel()) for g, r in zip(groups, rules)), u[P], u[P]]
    req_t = [x[fresh], *(t.reshape(-1) for t in tn), x1[P], x2[P]]
    if jf is not None:
        lo, hi = torch.isnan(jf["dp"]).any(-1), torch.isnan(jf["dq"]).any(-1)
        req_u += [jf["unit"][lo], jf["unit"][hi]]
        req_t += [jf["p"][lo], jf["q"][hi]]
    sizes = [v.numel() for v in req_u]
    req = torch.cat(req_u)
    f, d = refine(req, torch.cat(req_t))
    evals.index_add_(0, req, torch.ones_like(req))
    fs, ds = f.split(sizes), d.split(sizes)
    out = []
    if h["unit"].numel():
        fx = torch.where(at_p[S][:, None], j["fp"][S], j["fq"][S])
        dx = torch.where(at_p[S][:, None], j["dp"][S], j["dq"][S])
        fx[fresh[S]], dx[fresh[S]] = fs[0], ds[0]
        # h' at a located kink may come from either side: the halves sample it at the bracket's ends instead
        xk = rules[1][0]
        lo_s = ~bis[S] & (p[S] > A[S] + (xs - A[S]) * xk[-1])
        hi_s = ~bis[S] & (q[S] < xs + (B[S] - xs) * xk[0])
        h.update(fA=torch.cat([h["fA"][:n], fx, h["fA"][2 * n:]]), fB=torch.cat([fx, h["fB"][n:]]),
                 dA=torch.cat([h["dA"][:n], dx, h["dA"][2 * n:]]), dB=torch.cat([dx, h["dB"][n:]]),
                 sB=torch.cat([torch.where(lo_s, p[S], xs), h["sB"][n:]]),
                 fsB=torch.cat([torch.where(lo_s[:, None], j["fp"][S], fx), h["fsB"][n:]]),
                 dsB=torch.cat([torch.where(lo_s[:, None], j["dp"][S], dx), h["dsB"][n:]]),
                 sA=torch.cat([h["sA"][:n], torch.where(hi_s, q[S], xs), h["sA"][2 * n:]]),
                 fsA=torch.cat([h["fsA"][:n], torch.where(hi_s[:, None], j["fq"][S], fx), h["fsA"][2 * n:]]),
                 dsA=torch.cat([h["dsA"][:n], torch.where(hi_s[:, None], j["dq"][S], dx), h["dsA"][2 * n:]]))
        h["tol"] = h["core"] + FLOOR * eps * (h["fA"].abs() + h["fB"].abs()).amax(-1)
        for gi, (g, (_, wq), t) in enumerate(zip(groups, rules, tn)):
            if g.numel():
                out.append(_grade(take(h, g), t, fs[1 + gi], ds[1 + gi], wq, acc, acc_err))
    if P.numel():
        jp = take(j, P)
        a1, a2 = len(rules) + 1, len(rules) + 2  # the probes' slots in the request
        kinked, _ = bracket(jp, torch.stack([jp["p"], x1[P], x2[P], jp["q"]], 1),
                            torch.stack([jp["fp"], fs[a1], fs[a2], jp["fq"]], 1),
                            torch.stack([jp["dp"], ds[a1], ds[a2], jp["dq"]], 1))
        hit = (jp["p"] == x1[P]) & (jp["q"] == x2[P])
        jp.update(C=torch.where(hit, jp["C"], 4 * jp["C"]), bis=~kinked)
        out.append(jp)
    if jf is not None:
        _fill(jf, lo, ("dp", "dA", "dsA"), ds[-2])  # h'(p), p = A = sA = 0
        _fill(jf, hi, ("dq", "dB", "dsB"), ds[-1])  # h'(q), q = B = sB = 1
        out.append(jf)
    return {k: torch.cat([o[k] for o in out]) for k in j} if out else take(j, torch.zeros_like(found))


def _fill(j: Jobs, rows: Tensor, keys: tuple[str, ...], value: Tensor) -> None:
    """Write the fetched derivative ``value`` (one per row of ``rows``, a mask) into the unknown fields ``keys``."""
    for key in keys:
        v = j[key][rows]
        miss = torch.isnan(v).any(-1)
        v[miss] = value[miss]
        j[key][rows] = v


def _grade(h: Jobs, t: Tensor, f: Tensor, d: Tensor, wq: Tensor, acc: Panels, acc_err: Tensor) -> Jobs:
    r"""Test the panels ``h`` with Gauss nodes ``t (R, k)`` (values ``f``, derivatives ``d``, ``(R*k, O)``).

    Accepts those within their tolerance; returns the others as jobs bracketing their likeliest kink:
    the gap of ``sA, t, sB`` where :math:`h'` changes fastest, if a kink stands out there
    (:func:`bracket`) and the error is at most :data:`EXPLAIN` :math:`\max_o |\Delta h'_o| (B - A)`.
    Otherwise a gap next to an end of the segment where :math:`h'` is unknown is bracketed
    (:func:`level` fetches :math:`h'` there); failing that, a larger error points to a kink hidden
    between a located kink at an end of the panel and the sample taken for that end, which is
    bracketed then. Other panels are bisected.
    """
    R, k = t.shape
    f, d = f.reshape(R, k, -1), d.reshape(R, k, -1)
    h["est"] = (h["B"] - h["A"])[:, None] * torch.einsum("q,rqo->ro", wq, d)
    h["err"] = (h["est"] - (h["fB"] - h["fA"])).abs().amax(-1)
    ok = h["err"] <= h["tol"]
    acc.add(take(h, ok), acc_err)
    h = take(h, ~ok)
    t, f, d = t[~ok], f[~ok], d[~ok]
    use = torch.ones(t.shape[0], k + 1, dtype=torch.bool, device=t.device)
    use[:, 0], use[:, -1] = h["sA"] < t[:, 0], h["sB"] > t[:, -1]
    ts = torch.cat([h["sA"][:, None], t, h["sB"][:, None]], 1)
    fs = torch.cat([h["fsA"][:, None], f, h["fsB"][:, None]], 1)
    ds = torch.cat([h["dsA"][:, None], d, h["dsB"][:, None]], 1)
    steep, _ = bracket(h, ts, fs, ds, use)
    # a kink of jump J errs by J (B - A) phi, phi <= 0.21 the offset from its nearest node or balance point: a
    # larger error than the steepest gap can explain points to a kink hidden between a located kink at an end
    # and the sample taken for that end
    ratio = h["err"] / ((h["dq"] - h["dp"]).abs().amax(-1) * (h["B"] - h["A"]))
    ja = torch.where(h["sA"] > h["A"], (h["dsA"] - h["dA"]).abs().amax(-1), 0.0)
    jb = torch.where(h["sB"] < h["B"], (h["dB"] - h["dsB"]).abs().amax(-1), 0.0)
    hidden = (ratio > EXPLAIN) & (torch.maximum(ja, jb) > (h["dq"] - h["dp"]).abs().amax(-1))
    # or to a kink in a gap at an end of the segment where h' is unknown (a first estimate's unit), likelier than
    # one within the last bracket of a located kink (whose h' there may come from the wrong side)
    unknown = torch.isnan(ds).any(-1)
    gap = (unknown[:, 1:] | unknown[:, :-1]) & use
    fetch = ~(steep & (ratio <= EXPLAIN)) & gap.any(1)
    hidden = hidden & ~fetch
    lo, hi = hidden & (ja >= jb), hidden & (ja < jb)
    for key, a_, b_ in (("p", "A", "sB"), ("q", "sA", "B"), ("fp", "fA", "fsB"), ("fq", "fsA", "fB"),
                        ("dp", "dA", "dsB"), ("dq", "dsA", "dB")):
        m_lo, m_hi = (lo, hi) if h[key].dim() == 1 else (lo[:, None], hi[:, None])
        h[key] = torch.where(m_lo, h[a_], torch.where(m_hi, h[b_], h[key]))
    kinked = hidden | (steep & (ratio <= EXPLAIN))
    if bool(fetch.any()):
        g = torch.where(gap[:, 0], 0, k)
        r = torch.arange(g.numel(), device=g.device)
        for key, src in (("p", ts), ("fp", fs), ("dp", ds)):
            h[key] = torch.where(fetch if src.dim() == 2 else fetch[:, None], src[r, g], h[key])
        for key, src in (("q", ts), ("fq", fs), ("dq", ds)):
            h[key] = torch.where(fetch if src.dim() == 2 else fetch[:, None], src[r, g + 1], h[key])
    h.update(C=torch.full_like(h["A"], C0), bis=~kinked & ~fetch)
    return h


class Panels:
    """Accepted panels, collected level by level (fields as in :data:`FIELDS`)."""

    def __init__(self) -> None:
        self.parts: list[Jobs] = []

    def add(self, rows: Jobs, acc_err: Tensor) -> None:
        """Accept the tested panels of ``rows`` (job fields) and add their errors to ``acc_err (U,)``."""
        if rows["unit"].numel():
            self.parts.append({"kind": rows["kind"], "unit": rows["unit"], "a": rows["A"], "b": rows["B"],
                               "est": rows["est"], "err": rows["err"], "fa": rows["fA"], "fb": rows["fB"],
                               "tol": rows["tol"]})
            acc_err.index_add_(0, rows["unit"], rows["err"])

    def cat(self) -> Jobs | None:
        """All accepted panels (``None`` when there are none)."""
        if not self.parts:
            return None
        return {k: torch.cat([p[k] for p in self.parts]) for k in FIELDS}


def coarsen_panels(p: Jobs, refine: Refine, x01: Tensor, w01: Tensor, rel: Tensor, thr: Tensor,
                   evals: Tensor) -> Jobs:
    """Replace runs of >= 3 adjacent smooth panels by one Gauss–Legendre panel where the unit stays in tolerance.

    A panel is smooth when its error is below a hundredth of its tolerance. The merged panel
    ``[A, B]`` (nodes ``x01``, weights ``w01`` scaled to it) is kept when its error is at most the
    run's summed error plus the unit's unused tolerance ``thr - total`` times ``B - A``.
    """
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
    add = {"kind": torch.full_like(unit[ok], GAUSS_KIND), "unit": unit[ok], "a": A[ok], "b": B[ok], "est": est[ok],
           "err": err[ok], "fa": fA[ok], "fb": fB[ok], "tol": rel[unit[ok]] * (B - A)[ok]}
    return {k2: torch.cat([keep[k2], add[k2]]) for k2 in FIELDS}
