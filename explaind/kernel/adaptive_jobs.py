r"""Job state and level steps of the adaptive rule (:mod:`explaind.kernel.adaptive`).

A *job* is a panel :math:`[A, B]` of a unit that failed its test, with a bracket
:math:`[p, q] \subseteq [A, B]` thought to hold a kink of :math:`h(t) = g(\theta_s + t\Delta\theta_s, x)`.
The rule and its symbols are described in ``docs/engine.md`` (section 2, *adaptive rule*).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Self

import torch
from torch import Tensor

from ..exceptions import ConfigError

__all__ = ["GAUSS_KIND", "KINK_KIND", "C0", "FLOOR", "Rows", "Bracket", "Jobs", "Moves", "DenseWatch", "end_slopes",
           "steepest", "place", "locate", "choose", "halves", "join", "probed", "grade", "first_bracket", "one_kink",
           "check_first", "tolerances"]

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


@dataclass
class Rows:
    """Tensors with one row per job or panel: the fields of a subclass."""

    def tensors(self) -> tuple[Tensor, ...]:
        """The fields, in declaration order."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def take(self, sel: Tensor) -> Self:
        """The rows ``sel`` (mask or indices) of every field, as new tensors (a mask is turned into indices once)."""
        if sel.dtype == torch.bool:
            sel = torch.nonzero(sel).reshape(-1)
        return type(self)(*(v.index_select(0, sel) for v in self.tensors()))

    @classmethod
    def cat(cls, parts: list[Self]) -> Self:
        """The rows of ``parts``, in order."""
        return cls(*(torch.cat(vs) for vs in zip(*(p.tensors() for p in parts))))


@dataclass
class Bracket(Rows):
    r"""An interval :math:`[p, q]` per row with :math:`h, h'` at its ends: ``p, q (R,)``, the others ``(R, O)``."""

    p: Tensor
    q: Tensor
    f_p: Tensor
    f_q: Tensor
    d_p: Tensor
    d_q: Tensor

    @classmethod
    def of_gap(cls, t: Tensor, f: Tensor, d: Tensor, i: Tensor, k: Tensor) -> Bracket:
        """The samples ``i`` and ``k (R,)`` of each row of ``t (R, m)``, ``f, d (R, m, O)`` as the ends."""
        r = torch.arange(i.numel(), device=i.device)
        return cls(t[r, i], t[r, k], f[r, i], f[r, k], d[r, i], d[r, k])

    def meet(self) -> Tensor:
        r"""Where the tangents at :math:`p, q` meet, as the offset from :math:`p` (least squares over outputs).

        .. math:: o = \frac{\sum_o \Delta_o\,(h_o(p) - h_o(q) + h'_o(q)(q - p))}{\sum_o \Delta_o^2},
           \qquad \Delta = h'(q) - h'(p)
        """
        w = self.q - self.p
        dd = self.d_q - self.d_p
        return (dd * (self.f_p - self.f_q + self.d_q * w[:, None])).sum(-1) / (dd * dd).sum(-1)

    def select(self, mask: Tensor, other: Bracket) -> Bracket:
        """``other``'s rows where ``mask (R,)`` holds, these elsewhere."""
        return Bracket(*(torch.where(mask if a.dim() == 1 else mask[:, None], b, a)
                         for a, b in zip(self.tensors(), other.tensors())))


@dataclass
class Jobs(Rows):
    r"""Open panels :math:`[A, B]`, one per row (``R`` rows; :math:`h, h'` and ``est`` are ``(R, O)``).

    Attributes
    ----------
    unit, A, B, f_A, f_B, d_A, d_B : Tensor
        The unit, the panel's ends and :math:`h, h'` there.
    s_A, s_B, f_sA, f_sB, d_sA, d_sB : Tensor
        The samples nearest the ends on the panel's side of a kink located at an end (else the ends).
    p, q, f_p, f_q, d_p, d_q : Tensor
        The :attr:`bracket`; :math:`h'` is ``nan`` at an end of the segment while not evaluated.
    kind, est, err, tol, core : Tensor
        The rule of the panel's last test, its estimate and error; the panel's share of the unit's
        tolerance, with and without the rounding floor.
    C, bisect : Tensor
        Curvature constant of the bracket; whether no kink is thought to be there (bisect next).
    """

    unit: Tensor
    A: Tensor
    B: Tensor
    f_A: Tensor
    f_B: Tensor
    d_A: Tensor
    d_B: Tensor
    s_A: Tensor
    s_B: Tensor
    f_sA: Tensor
    f_sB: Tensor
    d_sA: Tensor
    d_sB: Tensor
    p: Tensor
    q: Tensor
    f_p: Tensor
    f_q: Tensor
    d_p: Tensor
    d_q: Tensor
    kind: Tensor
    est: Tensor
    err: Tensor
    tol: Tensor
    core: Tensor
    C: Tensor
    bisect: Tensor

    @classmethod
    def whole(cls, unit: Tensor, f_0: Tensor, f_1: Tensor, d_0: Tensor, d_1: Tensor, est: Tensor, err: Tensor,
              tol: Tensor, core: Tensor) -> Jobs:
        r"""The panel :math:`[0, 1]` of each unit, bracketed whole; no two fields share memory."""
        zero = torch.zeros(unit.numel(), dtype=f_0.dtype, device=f_0.device)
        one = torch.ones_like(zero)
        jobs = (unit, zero, one, f_0, f_1, d_0, d_1, zero, one, f_0, f_1, d_0, d_1, zero, one, f_0, f_1, d_0, d_1,
                torch.full_like(unit, GAUSS_KIND), est, err, tol, core, torch.full_like(zero, C0),
                torch.zeros_like(unit, dtype=torch.bool))
        return cls(*(v.clone() for v in jobs))

    @property
    def bracket(self) -> Bracket:
        """The bracket of each job (the same tensors)."""
        return Bracket(self.p, self.q, self.f_p, self.f_q, self.d_p, self.d_q)

    def set_bracket(self, br: Bracket, rows: Tensor | None = None) -> None:
        """Set the bracket of every job to ``br``, or in place that of the jobs ``rows`` (mask or indices)."""
        if rows is None:
            self.p, self.q, self.f_p, self.f_q, self.d_p, self.d_q = br.tensors()
            return
        for mine, new in zip(self.bracket.tensors(), br.tensors()):
            mine[rows] = new

    def fill_ends(self, lo: Tensor, hi: Tensor, d_0: Tensor, d_1: Tensor) -> Jobs:
        r"""Write the fetched :math:`h'(0)`, :math:`h'(1)` where unknown; returns these jobs.

        ``d_0`` holds :math:`h'(0)` of the rows ``lo`` (``p = A = s_A = 0``), ``d_1`` :math:`h'(1)` of the rows ``hi``.
        """
        at_0, at_1 = (self.d_p, self.d_A, self.d_sA), (self.d_q, self.d_B, self.d_sB)
        for rows, value, ends in ((lo, d_0, at_0), (hi, d_1, at_1)):
            for field in ends:
                v = field[rows]
                miss = torch.isnan(v).any(-1)
                v[miss] = value[miss]
                field[rows] = v
        return self


@dataclass
class DenseWatch:
    """The counts behind the adaptive rule's batch decisions, summed over the chunks of a batch refined chunk by chunk.

    A batch of units is kink-dense (``explaind.kernel.dense``) when enough of its failing units are far: after the
    first estimate (the probe) or at a refinement level. Those are the only decisions of the rule that couple
    units. A chunk refined with a watch never takes them; it adds its counts here, so that the caller can tell,
    once every chunk is done, whether the whole batch would have taken one (``explaind.kernel.adaptive_chunks``).

    Attributes
    ----------
    failing : int
        Units that missed the first estimate.
    looks : int
        Of them, those far after the first estimate.
    far : dict
        Refinement level -> ripe units far at that level.
    bound : float
        The most units a decision can need (the batch's need once its failing units are known): a chunk stops
        refining once a count reaches it, the batch's decision being certain.
    counted : bool
        ``failing`` and ``looks`` are the whole batch's, counted by the caller from every chunk's first
        estimate: the chunks do not count them again.
    """

    failing: int = 0
    looks: int = 0
    far: dict[int, int] = dataclasses.field(default_factory=dict)
    bound: float = float("inf")
    counted: bool = False

    def level(self, depth: int, count: int) -> None:
        """Add a chunk's ``count`` of far ripe units at refinement level ``depth``."""
        self.far[depth] = self.far.get(depth, 0) + count

    def coupled(self, need: float) -> bool:
        """Whether a count reaches ``need`` units: the whole batch would have been found kink-dense."""
        return self.looks >= need or any(c >= need for c in self.far.values())


def tolerances(g_a: Tensor, g_b: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Per unit, from :math:`g` at the segment's ends ``(U, O)`` each: the exact difference ``(U, O)``, the
    relative target ``tol`` :math:`\max_o |\Delta g_o|`, the rounding floor (:data:`FLOOR` ulps) and their sum."""
    exact = g_b - g_a
    rel = tol * exact.abs().amax(-1)
    floor = FLOOR * torch.finfo(g_a.dtype).eps * (g_a.abs().amax(-1) + g_b.abs().amax(-1))
    return exact, rel, floor, rel + floor


def end_slopes(refine: Any, units: Tensor, evals: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""Evaluate :math:`h'(0)`, :math:`h'(1)` of ``units (E,)`` by ``refine`` (one call, counted), each ``(E, O)``."""
    E = units.numel()
    zero = torch.zeros(E, dtype=dtype, device=units.device)
    _, d = refine(torch.cat([units, units]), torch.cat([zero, torch.ones_like(zero)]))
    evals[units] += 2
    return d[:E], d[E:]


def steepest(t: Tensor, f: Tensor, d: Tensor, use: Tensor | None = None) -> tuple[Bracket, Tensor, Tensor]:
    r"""The gap :math:`[t_i, t_{i+1}]` of each row's samples where :math:`h'` changes fastest.

    ``t (R, m)`` are sorted samples, ``f, d (R, m, O)`` :math:`h, h'` there; gaps excluded by
    ``use (R, m - 1)`` or with an unknown (``nan``) :math:`h'` are never taken. The slope of a gap is
    :math:`\max_o |h'_o(t_{i+1}) - h'_o(t_i)| / (t_{i+1} - t_i)`. Returns the gap, whether it stands out
    (:data:`KINK_RATIO` times the slope of the flattest gap taken into account) and ``i``, each per row.
    """
    slope = torch.nan_to_num((d[:, 1:] - d[:, :-1]).abs().amax(-1) / (t[:, 1:] - t[:, :-1]), nan=0.0)
    known = ~torch.isnan(d).any(-1)
    ok = known[:, 1:] & known[:, :-1]
    if use is not None:
        ok = ok & use
    slope = torch.where(ok, slope, -1.0)
    top, i = slope.max(1)
    flat = torch.where(slope < 0, torch.inf, slope).amin(1)
    return Bracket.of_gap(t, f, d, i, i + 1), (top > 0) & (top > KINK_RATIO * flat), i


def place(gap: Bracket, t: Tensor, f: Tensor, d: Tensor, i: Tensor) -> tuple[Bracket, Tensor]:
    r"""Widen each bracket ``gap`` (gap ``i`` of the samples ``t (R, m)``) over a sample that holds its kink.

    Where the tangents meet within :math:`\sigma =` :data:`C0` :math:`(q - p)^2` of an end (a kink on
    that sample), the bracket takes in the neighbouring gap. Returns the bracket and whether the kink
    is placed (inside the gap, or the neighbouring gap exists).
    """
    w = gap.q - gap.p
    off = gap.meet()
    sigma = C0 * w * w
    left = (off <= sigma) & (i > 0)
    right = ~left & (off >= w - sigma) & (i + 2 < t.shape[1])
    return Bracket.of_gap(t, f, d, i - left.long(), i + 1 + right.long()), ((off > 0) & (off < w)) | left | right


@dataclass
class Moves:
    """What each of ``R`` jobs does at a level.

    ``x`` split points, ``at_p`` (mask) split at the bracket's ``p``, ``bisect`` (mask) split without a
    kink, ``x1, x2`` probes, ``S, R, P`` the jobs split, retested with ``nodes`` points and probed
    (indices), ``fresh`` (mask) the jobs whose split point is evaluated.
    """

    x: Tensor
    at_p: Tensor
    bisect: Tensor
    x1: Tensor
    x2: Tensor
    S: Tensor
    R: Tensor
    P: Tensor
    fresh: Tensor


def locate(j: Jobs) -> tuple[Tensor, Tensor, Tensor]:
    r"""Each job's kink estimate :math:`c`, its predicted error :math:`\sigma` and the reach :math:`\delta`.

    :math:`c = p + o` (:meth:`Bracket.meet`) and :math:`\sigma = C (q - p)^2`, or the midpoint and
    :math:`(q - p)/2` where :math:`c \notin (p, q)` or the job bisects; :math:`\delta = \tau / (8 \max_o |\Delta_o|)`.
    """
    w = j.q - j.p
    off = j.bracket.meet()
    found = torch.isfinite(off) & (off > 0) & (off < w) & ~j.bisect
    c = torch.where(found, j.p + off, j.p + 0.5 * w)
    delta = torch.nan_to_num(0.125 * j.tol / (j.d_q - j.d_p).abs().amax(-1), nan=float("inf"))
    sigma = torch.where(found, j.C * w * w, 0.5 * w)
    return c, sigma, delta


def choose(j: Jobs, c: Tensor, sigma: Tensor, delta: Tensor, eps: float) -> Moves:
    r"""Split where :math:`\sigma \le \delta/2` (bisect a kink within :math:`\delta/2` of the ends), else probe."""
    p, q, A, B = j.p, j.q, j.A, j.B
    w = q - p
    split = j.bisect | (torch.minimum(sigma, w) <= 0.5 * delta) | (w <= 1024 * eps)
    bis = j.bisect | (split & ((c - A <= 0.5 * delta) | (B - c <= 0.5 * delta)))
    x = torch.where(bis, 0.5 * (A + B), c)
    at_p = split & ~bis & (x - p <= 0.5 * delta) & (p > A)
    at_q = split & ~bis & ~at_p & (q - x <= 0.5 * delta) & (q < B)
    x = torch.where(at_p, p, torch.where(at_q, q, x))
    s = torch.maximum(sigma, 0.25 * delta)
    cc = torch.minimum(torch.maximum(c, p + w / 64), q - w / 64)
    x1 = torch.maximum(cc - s, 0.5 * (p + cc))
    x2 = torch.minimum(cc + s, 0.5 * (cc + q))
    # a smooth panel is bisected into `nodes`-point halves, or first retested with `nodes` points when it had fewer
    regrade = split & bis & (j.kind == KINK_KIND)
    S, R, P = (torch.nonzero(m).reshape(-1) for m in (split & ~regrade, regrade, ~split))
    return Moves(x, at_p, bis, x1, x2, S, R, P, split & ~regrade & ~at_p & ~at_q)


def halves(j: Jobs, mv: Moves, rules: list[tuple[Tensor, Tensor]]) -> tuple[Jobs, list[Tensor], list[Tensor]]:
    """The panels to test, the rows of each kind and their nodes (``(rows, k)`` per kind).

    The panels are both halves of each split job, then the retested jobs."""
    S, R = mv.S, mv.R
    xs = mv.x[S]
    h = j.take(torch.cat([S, S, R]))
    h.A, h.B = torch.cat([j.A[S], xs, j.A[R]]), torch.cat([xs, j.B[S], j.B[R]])
    h.core = h.core * torch.cat([torch.full((2 * S.numel(),), 0.5, dtype=xs.dtype, device=xs.device),
                                 torch.ones(R.numel(), dtype=xs.dtype, device=xs.device)])
    h.kind = torch.where(torch.cat([mv.bisect[S], mv.bisect[S], mv.bisect[R]]), GAUSS_KIND, KINK_KIND)
    groups = [torch.nonzero(h.kind == g).reshape(-1) for g in (GAUSS_KIND, KINK_KIND)]
    nodes = [h.A[g, None] + (h.B - h.A)[g, None] * x for g, (x, _) in zip(groups, rules)]
    return h, groups, nodes


def join(h: Jobs, j: Jobs, mv: Moves, f_x: Tensor, d_x: Tensor, x_kink: Tensor, eps: float) -> None:
    r"""Give the halves ``h`` of the split jobs their common end :math:`x` in place, and every panel its tolerance.

    :math:`h(x), h'(x)` are the evaluated ``f_x, d_x`` or the bracket end's. :math:`h'` at a located kink
    may come from either side: the halves sample it at the bracket's ends, unless those lie beyond their
    outermost node (``x_kink``: the nodes of the halves' rule on ``[0, 1]``).
    """
    S, n, xs = mv.S, mv.S.numel(), mv.x[mv.S]
    if n:
        at_p = mv.at_p[S][:, None]
        fx, dx = torch.where(at_p, j.f_p[S], j.f_q[S]), torch.where(at_p, j.d_p[S], j.d_q[S])
        fx[mv.fresh[S]], dx[mv.fresh[S]] = f_x, d_x
        lo = ~mv.bisect[S] & (j.p[S] > j.A[S] + (xs - j.A[S]) * x_kink[-1])
        hi = ~mv.bisect[S] & (j.q[S] < xs + (j.B[S] - xs) * x_kink[0])
        left, right = slice(0, n), slice(n, 2 * n)
        h.f_B[left], h.d_B[left], h.f_A[right], h.d_A[right] = fx, dx, fx, dx
        h.s_B[left] = torch.where(lo, j.p[S], xs)
        h.f_sB[left] = torch.where(lo[:, None], j.f_p[S], fx)
        h.d_sB[left] = torch.where(lo[:, None], j.d_p[S], dx)
        h.s_A[right] = torch.where(hi, j.q[S], xs)
        h.f_sA[right] = torch.where(hi[:, None], j.f_q[S], fx)
        h.d_sA[right] = torch.where(hi[:, None], j.d_q[S], dx)
    h.tol = h.core + FLOOR * eps * (h.f_A.abs() + h.f_B.abs()).amax(-1)


def probed(jp: Jobs, x1: Tensor, x2: Tensor, v1: tuple[Tensor, Tensor], v2: tuple[Tensor, Tensor]) -> Jobs:
    r"""Bracket the steepest gap of :math:`p, x_1, x_2, q` (``v1, v2``: :math:`h, h'` at the probes).

    :math:`C` quadruples unless that is the middle gap; no gap standing out means no kink: bisect next.
    """
    br, kinked, _ = steepest(torch.stack([jp.p, x1, x2, jp.q], 1), torch.stack([jp.f_p, v1[0], v2[0], jp.f_q], 1),
                             torch.stack([jp.d_p, v1[1], v2[1], jp.d_q], 1))
    jp.set_bracket(br)
    hit = (jp.p == x1) & (jp.q == x2)
    jp.C, jp.bisect = torch.where(hit, jp.C, 4 * jp.C), ~kinked
    return jp


def grade(h: Jobs, t: Tensor, f: Tensor, d: Tensor, wq: Tensor) -> tuple[Jobs, Jobs]:
    r"""Test the panels ``h`` with nodes ``t (R, k)``, weights ``wq (k,)``, :math:`h, h'` ``f, d (R*k, O)``.

    Returns the panels within tolerance and the others, bracketing their likeliest kink: the steepest
    gap of :math:`s_A, t, s_B` if a kink stands out there that explains the error, else a gap at an
    end of the segment where :math:`h'` is unknown (fetched next level), else a kink hidden between a
    located kink at an end and its side sample; the others bisect.
    """
    R, k = t.shape
    f, d = f.reshape(R, k, -1), d.reshape(R, k, -1)
    h.est = (h.B - h.A)[:, None] * torch.einsum("q,rqo->ro", wq, d)
    h.err = (h.est - (h.f_B - h.f_A)).abs().amax(-1)
    ok = h.err <= h.tol
    passed, h = h.take(ok), h.take(~ok)
    t, f, d = t[~ok], f[~ok], d[~ok]
    use = torch.ones(t.shape[0], k + 1, dtype=torch.bool, device=t.device)
    use[:, 0], use[:, -1] = h.s_A < t[:, 0], h.s_B > t[:, -1]
    ts = torch.cat([h.s_A[:, None], t, h.s_B[:, None]], 1)
    fs = torch.cat([h.f_sA[:, None], f, h.f_sB[:, None]], 1)
    ds = torch.cat([h.d_sA[:, None], d, h.d_sB[:, None]], 1)
    br, steep, _ = steepest(ts, fs, ds, use)
    h.set_bracket(br)
    # a kink of jump J errs by J (B - A) phi, phi <= 0.21: a larger error than the steepest gap explains points
    # to a kink hidden between a located kink at an end and the sample taken for that end
    jump = (h.d_q - h.d_p).abs().amax(-1)
    ratio = h.err / (jump * (h.B - h.A))
    ja = torch.where(h.s_A > h.A, (h.d_sA - h.d_A).abs().amax(-1), 0.0)
    jb = torch.where(h.s_B < h.B, (h.d_B - h.d_sB).abs().amax(-1), 0.0)
    explained = steep & (ratio <= EXPLAIN)
    # or to a kink in a gap at an end of the segment where h' is unknown, likelier than a hidden one
    unknown = torch.isnan(ds).any(-1)
    gap = (unknown[:, 1:] | unknown[:, :-1]) & use
    fetch = ~explained & gap.any(1)
    hidden = (ratio > EXPLAIN) & (torch.maximum(ja, jb) > jump) & ~fetch
    at_a = Bracket(h.A, h.s_A, h.f_A, h.f_sA, h.d_A, h.d_sA)
    at_b = Bracket(h.s_B, h.B, h.f_sB, h.f_B, h.d_sB, h.d_B)
    br = h.bracket.select(hidden & (ja < jb), at_b).select(hidden & (ja >= jb), at_a)
    if bool(fetch.any()):
        g = torch.where(gap[:, 0], 0, k)
        br = br.select(fetch, Bracket.of_gap(ts, fs, ds, g, g + 1))
    h.set_bracket(br)
    h.C, h.bisect = torch.full_like(h.A, C0), ~(hidden | explained) & ~fetch
    return passed, h


def first_bracket(failing: Tensor, est0: Tensor, g_a: Tensor, g_b: Tensor,
                   first: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Any, Tensor, tuple[Tensor, Tensor, Tensor]]:
    r"""The bracket of the steepest gap between the first estimate's nodes, and where one kink there explains the error.

    A kink at :math:`c` of jump :math:`\Delta` makes ``est0`` err by :math:`\Delta` (the sum of the weights
    after node :math:`i` less :math:`1 - c`); a unit is *inner* when a kink standing out in the steepest gap
    accounts for at least half its error (``docs/engine.md``, section 2). No evaluation.

    Returns
    -------
    bracket : Bracket or None
        The placed brackets of all ``failing`` units (``None`` with fewer than two nodes).
    inner : Tensor
        Bool ``(F,)``.
    samples : tuple of Tensor
        The nodes ``(F, n)``, :math:`h` and :math:`h'` ``(F, n, O)`` of the failing units.
    """
    dev, dt = g_a.device, g_a.dtype
    x, wx = (v.to(device=dev, dtype=dt) for v in first[:2])
    t = x.expand(failing.numel(), -1)
    f, d = (v[failing].to(device=dev, dtype=dt) for v in first[2:])
    inner = torch.zeros(failing.numel(), dtype=torch.bool, device=dev)
    if x.numel() < 2:
        return None, inner, (t, f, d)
    br, stands, i = steepest(t, f, d)
    w = br.q - br.p
    c = br.p + torch.minimum(torch.nan_to_num(br.meet(), nan=0.0).clamp_min(0), w)
    tail = torch.cat([wx.flip(0).cumsum(0).flip(0)[1:], wx[:1] * 0])  # sum of the weights after node i
    e = est0[failing] - (g_b[failing] - g_a[failing])
    miss = (e - (br.d_q - br.d_p) * (tail[i] - (1 - c))[:, None]).abs().amax(-1)
    br, placed = place(br, t, f, d, i)
    return br, stands & (miss <= 0.5 * e.abs().amax(-1)) & placed, (t, f, d)


def one_kink(units: Tensor, est0: Tensor, g_a: Tensor, g_b: Tensor,
              first: tuple[Tensor, Tensor, Tensor, Tensor] | None) -> Tensor:
    """Bool ``(F,)``: units whose first-estimate error one kink between nodes explains (none without samples)."""
    if first is None:
        return torch.zeros(units.numel(), dtype=torch.bool, device=units.device)
    return first_bracket(units, est0, g_a, g_b, first)[1]


def check_first(first: tuple[Tensor, Tensor, Tensor], x01: Tensor, est0: Tensor) -> None:
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
