r"""The adaptive quadrature rule: an error-controlled :class:`~explaind.kernel.quadrature.NodePlan`.

For a *unit* (one step and test input), :math:`h(t) = g(\theta_s + t\Delta\theta_s, x)`; every panel's
error is measured, as :math:`\int_a^b h' = h(b) - h(a)`. Panels are cut at located kinks of :math:`h` and
bisected where smooth until each unit is within tolerance: ``docs/engine.md`` (section 2, *adaptive
rule*), ``docs/maths.md`` (section 2). Job state and level steps: :mod:`explaind.kernel.adaptive_jobs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .adaptive_jobs import (
    GAUSS_KIND,
    DenseWatch,
    Jobs,
    check_first,
    choose,
    end_slopes,
    first_bracket,
    grade,
    halves,
    join,
    locate,
    one_kink,
    place,
    probed,
    steepest,
    tolerances,
)
from .adaptive_memory import LEVEL_BYTES, Accepted, Groups, Panels, level_rows
from .dense import (
    DENSE_AFTER,
    DENSE_EVALS,
    DENSE_MIN,
    DENSE_SHARE,
    MIDPOINT_KIND,
    Shared,
    dense_fallback,
    dense_units,
    far_units,
    probe_positions,
)
from .gaps import GAP_TOL, loose_plan
from .quadrature import NodePlan, rule_nodes

__all__ = ["MAX_DEPTH", "MAX_EVALS", "adaptive_plan"]

#: ``(units (P,), t (P,)) -> (h (P, O), h' (P, O))``: evaluate units at points of ``[0, 1]``.
Refine = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
#: Nodes and weights on ``[0, 1]`` of the ``nodes``-point and ``max(1, nodes // 2)``-point rules.
Rules = list[tuple[Tensor, Tensor]]

#: Most refinement levels (batched evaluations) of the adaptive rule.
MAX_DEPTH = 64
#: Evaluations per test input and step after which the adaptive rule stops refining.
MAX_EVALS = 4096


def adaptive_plan(
    est0: Tensor,
    g_a: Tensor,
    g_b: Tensor,
    refine: Refine,
    *,
    tol: float,
    nodes: int = 4,
    coarsen: bool = False,
    max_depth: int = MAX_DEPTH,
    max_evals: int = MAX_EVALS,
    first: tuple[Tensor, Tensor, Tensor] | None = None,
    dense_after: int = DENSE_AFTER,
    dense_evals: int = DENSE_EVALS,
    shared: Shared | None = None,
    steps: Tensor | None = None,
    watch: DenseWatch | None = None,
    level_bytes: int | None = None,
) -> NodePlan:
    r"""Error-controlled plan for a batch of units (one unit = one step and test input).

    A unit whose ``nodes``-point Gauss–Legendre estimate ``est0`` misses
    :math:`\tau = \mathrm{tol} \max_o |\Delta g_o| + \mathrm{floor}` (a few ulps of :math:`|g|`) is
    refined, level by level and batched over units, until its summed panel error is within
    :math:`\tau`, for at most ``max_depth`` levels or about ``max_evals`` evaluations. The rule is
    described in ``docs/engine.md`` (section 2, *adaptive rule*).

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
        Merge runs of smooth panels after refinement (costs ``nodes`` evaluations per merged run).
    max_depth, max_evals : int
        Refinement caps (levels, evaluations per unit).
    first : tuple of Tensor, optional
        The samples behind ``est0``: the nodes ``x (n,)`` (``rule_nodes("gauss-legendre", nodes)[0]``),
        :math:`h(x)` and :math:`h'(x)` of each unit, shape ``(U, n, O)``. Saves failing units the
        evaluation of :math:`h'(0), h'(1)` where a kink stands out between two nodes (the ``nodes``
        evaluations behind ``est0`` are counted for every unit either way).
    dense_after, dense_evals : int
        After ``dense_after`` evaluations of a probe of at most ``PROBE_UNITS`` failing units, the far
        units of a kink-dense batch are integrated on a grid of nodes per step (``steps (U,)``, each unit's
        step; default one grid) shared by the step's units (``shared``) instead, cells cut at kinks, each
        step spending ``dense_evals`` evaluations per failing unit in all; the far units beyond the probe
        skip the refinement when no probe unit converged; the other units of the batch stop before
        ``dense_evals`` evaluations and take the grid too where still far and it errs less
        (:mod:`explaind.kernel.dense`; ``dense_after=0``: never).
    shared : callable, optional
        ``(units (K,), t (Q,)) -> (h, h')``, each ``(K, Q, O)``, units of one step at shared nodes (the
        engine evaluates each node once for the step's inputs); by default ``refine`` at every (unit, node).
    watch : DenseWatch, optional
        A chunk of a larger batch: no probe and no kink-dense test (the decisions that couple units); their
        counts are added to ``watch`` instead (:mod:`explaind.kernel.adaptive_chunks`).
    level_bytes : int, optional
        Bytes of output-sized state a refinement level may take: its open panels are refined in groups within
        it (:func:`~explaind.kernel.adaptive_memory.level_rows`; default ``LEVEL_BYTES``), the same plan.

    Returns
    -------
    NodePlan
        Nodes and weights per unit, the exact difference, the estimate and the evaluations spent.

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
        check_first(first, rules[0][0], est0)
    exact, rel, floor, thr = tolerances(g_a, g_b, tol)
    eps = torch.finfo(dt).eps
    evals = torch.full((U,), nodes, dtype=torch.long, device=dev)
    estimate = est0.clone()
    err0 = (est0 - exact).abs().amax(-1)
    failing = torch.nonzero(err0 > thr).reshape(-1)
    acc, scale = Accepted(torch.zeros(U, dtype=dt, device=dev), exact.shape[-1], coarsen), exact.abs().amax(-1)
    run = _Levels(refine, rules, eps, evals, acc, thr, scale, floor, max_depth, max_evals, dense_after, dense_evals,
                  watch, level_rows(exact.shape[-1], dt, level_bytes), (4 * (level_bytes or LEVEL_BYTES), tol))
    samples = None if first is None else (*rules[0], first[1], first[2])
    if failing.numel() and tol >= GAP_TOL:  # a loose tolerance: gaps cut at kinks (kernel/gaps.py)
        extra = loose_plan(failing, samples, g_a, g_b, thr, refine, evals, max_evals, max_depth)
        acc.add(Panels(torch.full_like(failing, MIDPOINT_KIND), failing, 0 * rel[failing], 1 + 0 * rel[failing],
                       *extra[3:], g_a[failing], g_b[failing], rel[failing]))
        return _assemble(U, rules, failing, acc.panels(), exact, estimate, acc.est, evals, extra[:3])
    if failing.numel():
        # a probe only where the first estimate already looks kink-dense: far, and no one kink explains it (the
        # kink test only where enough units are far for the count to pass: it cannot raise the count)
        looks = far_units(err0[failing], thr[failing], scale[failing], floor[failing])
        need = max(DENSE_MIN, DENSE_SHARE * failing.numel())
        if watch is not None and not watch.counted:  # a chunk: the caller takes the batch's decision (the probe's
            # test below, exactly)
            watch.failing += failing.numel()
            watch.looks += int((looks & ~one_kink(failing, est0, g_a, g_b, samples)).sum())
        split = watch is None and dense_after > 0 and int(looks.sum()) >= need
        if split:
            looks = looks & ~one_kink(failing, est0, g_a, g_b, samples)
            split = int(looks.sum()) >= need
        probe = failing[probe_positions(failing.numel())] if split else failing
        rest = failing[~torch.isin(failing, probe)]
        run(_start_jobs(probe, est0, err0, g_a, g_b, thr, rel, refine, evals, samples), probe.numel())
        settled = (acc.err[probe] <= thr[probe]) & ~run.dense[probe]
        if rest.numel() and bool(run.dense.any()) and not bool(settled.any()):
            # a kink-dense probe where no unit reached its tolerance: the far units skip the refinement
            far = looks[torch.isin(failing, rest)]
            run.dense[rest[far]] = True
            rest = rest[~far]
        elif rest.numel():  # otherwise the others are refined and tested as without a probe
            run.retest(max_evals)
        if rest.numel():
            run(_start_jobs(rest, est0, err0, g_a, g_b, thr, rel, refine, evals, samples), rest.numel())
    extra = None
    if bool(run.dense.any()):  # the far units, and the others left far above tolerance where that rule errs less
        extra = _fallback(run.dense, acc, evals, failing, exact, thr, (scale, floor), rel, g_a, g_b, steps,
                          shared or _pointwise(refine), rules[0][0] if first is not None else rules[0][0][:0],
                          None if first is None else first[1:], dense_evals, err0)
    panels, summed = acc.panels(), acc.est
    if coarsen and panels is not None:  # the accepted panels kept whole (Accepted(keep=coarsen)), merged, summed
        panels = _coarsen(panels, refine, *rules[0], rel, thr, evals)
        summed = torch.zeros_like(summed).index_add_(0, panels.unit, panels.est)
    return _assemble(U, rules, failing, panels, exact, estimate, summed, evals, extra)


class _Levels:
    """The refinement levels of :func:`adaptive_plan`, and the kink-dense test between them (:mod:`~.dense`).

    Calling it refines ``jobs`` level by level until every unit is within tolerance or capped. It tests
    the units still refining at every level until the batch is found kink-dense (``dense``: the far
    units, taken out of the refinement; the others then stop before a level could take them past
    ``dense_evals`` evaluations, the far units' budget; :meth:`retest` starts the test over for the units
    refined next).
    """

    def __init__(self, refine: Refine, rules: Rules, eps: float, evals: Tensor, acc: Accepted, thr: Tensor,
                 scale: Tensor, floor: Tensor, max_depth: int, max_evals: int, dense_after: int, dense_evals: int,
                 watch: DenseWatch | None, rows: int, limit: tuple[int, float]):
        self.refine, self.rules, self.eps, self.evals, self.acc, self.watch = refine, rules, eps, evals, acc, watch
        self.rows, self.limit = rows, limit  # open panels a level refines at once; the bytes they may hold, tol
        self.thr, self.scale, self.floor, self.max_depth = thr, scale, floor, max_depth
        self.dense_after, self.cap, self.dense_evals, self.strict = dense_after, max_evals, dense_evals, False
        n = rules[0][0].numel()
        self.per_job = max(2 * n, 1 + 2 * max(1, n // 2))  # the most one job spends at a level
        self.dense = torch.zeros_like(thr, dtype=torch.bool)
        self.tested = dense_after <= 0 or watch is not None

    def retest(self, max_evals: int) -> None:
        """Test the units refined next as if the batch were not known to be kink-dense (``dense`` is kept)."""
        self.tested, self.cap, self.strict = self.dense_after <= 0, max_evals, False

    def __call__(self, jobs: Jobs, failing: int) -> None:
        acc, evals = self.acc, self.evals
        jobs = Groups(jobs, self.rows, *self.limit)  # a level takes a group at a time (kernel/adaptive_memory.py)
        for depth in range(1, self.max_depth + 1):
            if not jobs.parts:
                return
            units = jobs.unit
            total = acc.err.index_add(0, units, jobs.err)
            if self.watch is not None and self.dense_after > 0:  # a chunk: count what the test would see
                ripe = units.unique()
                ripe = ripe[evals[ripe] >= self.dense_after]
                self.watch.level(depth, int(far_units(total[ripe], self.thr[ripe], self.scale[ripe],
                                                      self.floor[ripe]).sum()))
                if self.watch.coupled(self.watch.bound):  # the batch's decision is certain: it is planned whole
                    return
            if not self.tested:  # tested at every level until the batch is found kink-dense
                ripe = torch.zeros_like(self.dense)
                ripe[units] = True
                ripe &= evals >= self.dense_after
                dense = dense_units(total, ripe, failing, self.thr, self.scale, self.floor) if ripe.any() else None
                if dense is not None and bool(dense.any()):  # the others then stop short of dense_evals
                    self.tested, self.strict, self.cap = True, True, min(self.cap, self.dense_evals)
                    self.dense |= dense
                    jobs.drop(dense)
                    units = jobs.unit
                    if units.numel() == 0:
                        return
                    total = acc.err.index_add(0, units, jobs.err)
            if self.strict:  # the most the next level could spend on each unit
                over = evals + self.per_job * torch.bincount(units, minlength=evals.numel()) > self.cap
            else:
                over = evals >= self.cap
            jobs.stop((total <= self.thr) | over | (depth >= self.max_depth), acc)
            jobs.level(self._group)

    def _group(self, jobs: Jobs) -> Jobs:
        """One refinement level of the open panels ``jobs`` (of a group: :mod:`~explaind.kernel.adaptive_memory`)."""
        return _level(jobs, self.refine, self.rules, self.eps, self.evals, self.acc)


def _fallback(dense: Tensor, acc: Accepted, evals: Tensor, failing: Tensor, exact: Tensor, thr: Tensor,
              levels: tuple[Tensor, Tensor], rel: Tensor, g_a: Tensor, g_b: Tensor, steps: Tensor | None,
              shared: Shared, x: Tensor,
              first: tuple[Tensor, Tensor] | None, dense_evals: int, err0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kink-dense rule (:func:`~explaind.kernel.dense.dense_fallback`) for the far units ``dense (U,)`` and
    the units still far whose panels err more (``levels``: each unit's scale and rounding floor for
    :func:`~explaind.kernel.dense.far_units`); updates ``acc`` and ``evals``, returns their ``(unit, t, w)`` nodes."""
    cand = dense | ((acc.err > thr) & far_units(acc.err, thr, *levels))
    cu = torch.nonzero(cand).reshape(-1)
    groups = torch.zeros_like(evals) if steps is None else steps.to(evals.device)
    fb = dense_fallback(cu, groups, failing, evals, shared, x, first, g_a, g_b, dense_evals, need=err0)
    take = dense[fb.unit] | (fb.err < (acc.est[fb.unit] - exact[fb.unit]).abs().amax(-1))
    chosen = torch.zeros_like(dense)
    chosen[fb.unit[take]] = True
    acc.drop(chosen)
    du = fb.unit[take]
    evals[fb.unit] += fb.new
    one = torch.ones_like(du, dtype=exact.dtype)
    acc.add(Panels(torch.full_like(du, MIDPOINT_KIND), du, 0 * one, one, fb.est[take], fb.err[take], g_a[du],
                   g_b[du], rel[du]))
    return fb.nodes(chosen)


def _pointwise(refine: Refine) -> Shared:
    """``shared`` from ``refine``: every (unit, node) pair evaluated as its own row."""

    def shared(units: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        h, d = refine(units.repeat_interleave(t.numel()), t.repeat(units.numel()))
        return h.reshape(units.numel(), t.numel(), -1), d.reshape(units.numel(), t.numel(), -1)

    return shared


def _start_jobs(failing: Tensor, est0: Tensor, err0: Tensor, g_a: Tensor, g_b: Tensor, thr: Tensor, rel: Tensor,
                refine: Refine, evals: Tensor, first: tuple[Tensor, Tensor, Tensor, Tensor] | None) -> Jobs:
    r"""The first job of each unit ``failing (F,)``: the panel :math:`[0, 1]` and a bracket.

    Without ``first``, evaluates :math:`h'(0), h'(1)` and brackets :math:`[0, 1]`. With the first
    estimate's nodes, weights and samples ``first = (x (n,), w (n,), h (U, n, O), h' (U, n, O))``, a
    unit whose error a kink in the steepest gap between nodes accounts for brackets that gap, with
    :math:`h'(0), h'(1)` unknown; the others evaluate them and bracket the steepest gap of
    :math:`0, x_1, \dots, x_n, 1` (``docs/engine.md``, section 2). Other arguments as in
    :func:`adaptive_plan`; ``evals`` is updated.
    """
    fa, fb = g_a[failing], g_b[failing]
    if first is None:
        da, db = end_slopes(refine, failing, evals, g_a.dtype)
        return Jobs.whole(failing, fa, fb, da, db, est0[failing], err0[failing], thr[failing], rel[failing])
    dt = g_a.dtype
    unknown = torch.full_like(fa, torch.nan)
    jobs = Jobs.whole(failing, fa, fb, unknown, unknown, est0[failing], err0[failing], thr[failing], rel[failing])
    br, inner, (t, f, d) = first_bracket(failing, est0, g_a, g_b, first)
    if br is not None:
        jobs.set_bracket(br.take(inner), inner)
    ends = torch.nonzero(~inner).reshape(-1)
    if ends.numel():
        da, db = end_slopes(refine, failing[ends], evals, dt)
        for field, v in zip((jobs.d_A, jobs.d_B, jobs.d_sA, jobs.d_sB, jobs.d_p, jobs.d_q), (da, db) * 3):
            field[ends] = v
        ts = torch.cat([jobs.A[ends, None], t[ends], jobs.B[ends, None]], 1)
        fs = torch.cat([fa[ends, None], f[ends], fb[ends, None]], 1)
        ds = torch.cat([da[:, None], d[ends], db[:, None]], 1)
        br, stands, i = steepest(ts, fs, ds)
        br, _ = place(br, ts, fs, ds, i)
        jobs.set_bracket(br.take(stands), ends[stands])
    return jobs


def _level(j: Jobs, refine: Refine, rules: Rules, eps: float, evals: Tensor, acc: Accepted) -> Jobs:
    """One refinement level of the jobs ``j`` (one batched evaluation); returns the jobs left open.

    Jobs with an unknown :math:`h'` at a bracket end get it evaluated and nothing else; the others split,
    probe or are retested (``docs/engine.md``, section 2). Tested panels within tolerance go to ``acc``.
    """
    fetch = torch.isnan(j.d_p).any(-1) | torch.isnan(j.d_q).any(-1)
    jf = None
    if bool(fetch.any()):
        jf, j = j.take(fetch), j.take(~fetch)
    mv = choose(j, *locate(j), eps)
    h, groups, nodes = halves(j, mv, rules)
    P = mv.P
    parts = [(j.unit[mv.fresh], mv.x[mv.fresh]),
             *((h.unit[g].repeat_interleave(t.shape[1]), t.reshape(-1)) for g, t in zip(groups, nodes)),
             (j.unit[P], mv.x1[P]), (j.unit[P], mv.x2[P])]
    if jf is not None:
        lo, hi = torch.isnan(jf.d_p).any(-1), torch.isnan(jf.d_q).any(-1)
        parts += [(jf.unit[lo], jf.p[lo]), (jf.unit[hi], jf.q[hi])]
    vals = _evaluate(refine, evals, parts)
    out = []
    if h.unit.numel():
        join(h, j, mv, *vals[0], rules[1][0], eps)
        for g, t, (f, d), (_, wq) in zip(groups, nodes, vals[1:3], rules):
            if g.numel():
                passed, failed = grade(h.take(g), t, f, d, wq)
                acc.add(passed)
                out.append(failed)
    if P.numel():
        out.append(probed(j.take(P), mv.x1[P], mv.x2[P], vals[3], vals[4]))
    if jf is not None:
        out.append(jf.fill_ends(lo, hi, vals[5][1], vals[6][1]))
    return Jobs.cat(out) if out else j.take(P[:0])


def _evaluate(refine: Refine, evals: Tensor, parts: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """Evaluate the ``(units, t)`` of all ``parts`` in one call, count them and return ``(h, h')`` per part."""
    sizes = [u.numel() for u, _ in parts]
    req = torch.cat([u for u, _ in parts])
    f, d = refine(req, torch.cat([t for _, t in parts]))
    evals.index_add_(0, req, torch.ones_like(req))
    return list(zip(f.split(sizes), d.split(sizes)))


def _coarsen(p: Panels, refine: Refine, x01: Tensor, w01: Tensor, rel: Tensor, thr: Tensor, evals: Tensor) -> Panels:
    r"""Replace runs of three or more adjacent smooth panels by one panel where the unit stays in tolerance.

    A panel is smooth when its error is below a hundredth of its tolerance. The merged panel
    :math:`[A, B]` (nodes ``x01``, weights ``w01`` on ``[0, 1]``) is kept when its error is at most the
    run's summed error plus the unit's unused tolerance ``thr - total`` times :math:`B - A`.
    """
    order = torch.argsort(p.a, stable=True)
    p = p.take(order[torch.argsort(p.unit[order], stable=True)])
    smooth = p.err <= 1e-2 * p.tol
    n = smooth.numel()
    new_run = torch.ones(n, dtype=torch.bool, device=smooth.device)
    new_run[1:] = ~smooth[:-1] | (p.unit[1:] != p.unit[:-1]) | (p.a[1:] != p.b[:-1])
    run = torch.cumsum(new_run.long(), 0) - 1
    counts = torch.bincount(run[smooth], minlength=int(run.max()) + 1)
    cand = torch.nonzero(counts >= 3).reshape(-1)
    if cand.numel() == 0:
        return p
    in_cand = smooth & (counts[run] >= 3)
    rows = torch.nonzero(in_cand).reshape(-1)
    first = torch.full((int(run.max()) + 1,), n, dtype=torch.long, device=smooth.device)
    first.scatter_reduce_(0, run[in_cand], rows, reduce="amin")
    last = torch.full_like(first, -1).scatter_reduce_(0, run[in_cand], rows, reduce="amax")
    i0, i1 = first[cand], last[cand]
    unit, A, B = p.unit[i0], p.a[i0], p.b[i1]
    k = x01.numel()
    _, tangent = refine(unit.repeat_interleave(k), (A[:, None] + (B - A)[:, None] * x01[None, :]).reshape(-1))
    est = (B - A)[:, None] * torch.einsum("q,cqo->co", w01, tangent.reshape(unit.numel(), k, -1))
    err = (est - (p.f_b[i1] - p.f_a[i0])).abs().amax(-1)
    evals.index_add_(0, unit, torch.full_like(unit, k))
    run_err = torch.zeros(cand.numel(), dtype=err.dtype, device=err.device)
    slot = torch.full_like(first, -1)
    slot[cand] = torch.arange(cand.numel(), device=cand.device)
    run_err.index_add_(0, slot[run[in_cand]], p.err[in_cand])
    total = torch.zeros_like(thr).index_add_(0, p.unit, p.err)
    ok = err <= run_err + (thr[unit] - total[unit]).clamp_min(0) * (B - A)
    drop = in_cand & ok[slot[run].clamp_min(0)] & (slot[run] >= 0)
    merged = Panels(torch.full_like(unit[ok], GAUSS_KIND), unit[ok], A[ok], B[ok], est[ok], err[ok], p.f_a[i0][ok],
                    p.f_b[i1][ok], rel[unit[ok]] * (B - A)[ok])
    return Panels.cat([p.take(~drop), merged])


def _assemble(U: int, rules: Rules, failing: Tensor, panels: Panels | None, exact: Tensor, estimate: Tensor,
              summed: Tensor, evals: Tensor, extra: tuple[Tensor, Tensor, Tensor] | None = None) -> NodePlan:
    """Node lists per unit: Gauss–Legendre for passing units, the merged panel nodes for the others (whose
    estimate is ``summed``, their panels' estimates summed per unit).

    Panels of the kink-dense rule (``MIDPOINT_KIND``) take their nodes from ``extra``, ``(unit, t, w)`` rows.
    """
    dev, dt = exact.device, exact.dtype
    good = torch.ones(U, dtype=torch.bool, device=dev)
    good[failing] = False
    g_units = torch.nonzero(good).reshape(-1)
    units = [g_units.repeat_interleave(rules[0][0].numel())]
    ts = [rules[0][0].repeat(g_units.numel())]
    ws = [rules[0][1].repeat(g_units.numel())]
    if failing.numel():
        estimate[failing] = summed[failing]
    if panels is not None:
        for kind, (pos, wts) in enumerate(rules):
            sel = panels.kind == kind
            ins, lo, hi = panels.unit[sel], panels.a[sel], panels.b[sel]
            h = hi - lo
            for p_, w_ in zip(pos.tolist(), wts.tolist()):
                units.append(ins)
                ts.append(lo + p_ * h)
                ws.append(w_ * h)
    if extra is not None:
        units.append(extra[0])
        ts.append(extra[1])
        ws.append(extra[2])
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
