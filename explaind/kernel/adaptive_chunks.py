r"""The adaptive rule over a group of stacked steps, its units in chunks whose state fits :data:`RULE_BYTES`.

The rule (:func:`~explaind.kernel.adaptive.adaptive_plan`) keeps, for every unit (step, test input) it refines,
:math:`h` and :math:`h'` of all the explained outputs at the first estimate's nodes and at the ends and brackets of
its open panels, and the estimate of every accepted panel: tens to hundreds of output-sized vectors per unit. A
causal language model explains ``sequence x vocabulary`` outputs per input (65,536 at 64 tokens of 1,024), so four
inputs of a three-step group held gigabytes (docs/scaling.md, *Real widths*). :func:`adaptive_group` refines the
units of a group a chunk at a time instead (:func:`unit_chunks`: whole steps while they fit, else one step's inputs
in even slices), each unit taken at :data:`UNIT_OUTPUT_COPIES` output-sized vectors.

**Why the plans are the same.** Each unit is refined on its own: its panels, brackets, kink locations, errors and
evaluation counts depend on its own values only (the evaluations of a level are batched, which changes nothing but
possibly the rounding of a matrix product). Two decisions of the rule look at the whole batch: whether the first
estimate looks kink-dense (then a probe of the failing units is refined first) and, at every level, whether enough
units are far to call the batch kink-dense (then its far units take a grid of nodes shared by the inputs of each
step, :mod:`~explaind.kernel.dense`). A chunk never takes them: it adds the counts they rest on to a
:class:`~explaind.kernel.adaptive_jobs.DenseWatch`, and since no unit's refinement depends on another's until one of
them is taken, the sums over the chunks are the counts of the whole batch. When those sums show that the whole batch
would have taken one (more failing units far after the first estimate, or far at some level, than
:data:`~explaind.kernel.dense.DENSE_SHARE` of them and :data:`~explaind.kernel.dense.DENSE_MIN`), the group is
planned as one batch, as before (a log line says so: its memory is then not bounded). Otherwise the chunks' plans,
padded to the batch's most nodes, are the batch's plan.

**No refinement before the first decision.** The first of those decisions (the probe's) rests on the first
estimates alone, 2 ``nodes`` output-sized vectors a unit: every chunk's first estimate is taken before any chunk is
refined, and a batch they show kink-dense is planned whole at once from them (:func:`probe_counts`), the chunks
never refined; the first estimates are passed on, not evaluated twice, while they fit :data:`RULE_BYTES` together
(beyond, each chunk's is evaluated again when it is refined). Those counts are the batch's, taken once: the chunks
refined next add only their levels' counts (``DenseWatch.counted``), and since the batch's failing units are then
known, so is the count a level needs, and the chunks stop as soon as one level reaches it. Only a batch found
kink-dense at a refinement level is refined in chunks first (until then) and then planned whole.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from . import adaptive
from . import dense as _dense
from .adaptive_jobs import DenseWatch, one_kink, tolerances
from .evaluate import Grid, Rows, StepStack
from .gaps import GAP_TOL
from .quadrature import NodePlan, rule_nodes

__all__ = ["cap", "RULE_BYTES", "UNIT_OUTPUT_COPIES", "unit_chunks", "adaptive_group", "probe_counts", "coupled",
           "merge"]

logger = logging.getLogger(__name__)

#: Bytes of output-sized state the adaptive rule may hold for the units of one chunk (one unit at the least).
RULE_BYTES = 2**30
#: Output-sized vectors the rule is taken to hold per unit (step, input): the first estimate's ``h, h'`` at its
#: nodes (8 at 4 nodes) and 13 per open panel (its ends, the samples beside them, its bracket, its estimate); room
#: for dozens of open panels per unit, as a tight ``tol`` on a curved path takes. A level's copies of its open
#: panels and their nodes' values are bounded apart, and accepted panels are summed at once
#: (:mod:`~explaind.kernel.adaptive_memory`).
UNIT_OUTPUT_COPIES = 1024


def cap(engine: Any) -> int:
    """The adaptive rule's evaluations per (step, input) pair at most: the engine's ``max_evals`` (an estimator's
    parameter) or :data:`~explaind.kernel.adaptive.MAX_EVALS`."""
    return getattr(engine, "max_evals", None) or adaptive.MAX_EVALS


def unit_chunks(n_steps: int, n_inputs: int, n_outputs: int, dtype: torch.dtype,
                budget: int | None = None) -> list[tuple[int, int, int, int]]:
    """The chunks ``(step_lo, step_hi, input_lo, input_hi)`` of a group, each within ``budget`` bytes (default
    :data:`RULE_BYTES`) if one unit is: whole steps of all inputs while they fit, else one step a chunk and the
    inputs in even slices.

    Examples
    --------
    >>> unit_chunks(3, 4, 10, torch.float64)  # a classifier: one chunk
    [(0, 3, 0, 4)]
    >>> unit_chunks(2, 3, 64 * 1024, torch.float64)  # 64 tokens of 1,024: two units of 512 MiB fit
    [(0, 1, 0, 2), (0, 1, 2, 3), (1, 2, 0, 2), (1, 2, 2, 3)]
    """
    elem = torch.finfo(dtype).bits // 8
    fit = max(1, (RULE_BYTES if budget is None else budget) // max(1, UNIT_OUTPUT_COPIES * elem * n_outputs))
    if fit >= n_steps * n_inputs:
        return [(0, n_steps, 0, n_inputs)]
    if fit >= n_inputs:
        k = fit // n_inputs
        return [(s, min(n_steps, s + k), 0, n_inputs) for s in range(0, n_steps, k)]
    per = math.ceil(n_inputs / math.ceil(n_inputs / fit))
    return [(s, s + 1, lo, min(n_inputs, lo + per)) for s in range(n_steps) for lo in range(0, n_inputs, per)]


def adaptive_group(engine: Any, stack: StepStack, begins: list[Tensor], ends: list[Tensor], n: int, tol: float,
                   coarsen: bool) -> NodePlan:
    """The adaptive plan of the stacked steps (units are (step, input) pairs, step-major), refined chunk by chunk.

    ``begins``, ``ends``: :math:`g` at each step's segment ends, ``(T, O)`` each; ``n`` the Gauss–Legendre nodes
    of the first estimate; ``tol``, ``coarsen`` as in :func:`~explaind.kernel.adaptive.adaptive_plan`.
    """
    S, T = stack.n_steps, stack.X.shape[0]
    budget = getattr(engine, "rule_bytes", None) or RULE_BYTES
    chunks = unit_chunks(S, T, stack.explained.n_outputs, engine.dtype, budget)
    if len(chunks) == 1:
        return _plan(engine, stack, begins, ends, n, tol, coarsen, None)
    x01, w01 = _nodes(engine, n)
    subs, kept, failing, looks = [], 0, 0, 0
    for s0, s1, i0, i1 in chunks:
        steps = stack.steps(s0, s1)
        sub = StepStack(steps.base, steps.delta, stack.X[i0:i1], stack.explained.take(slice(i0, i1)))
        b, e = [v[i0:i1] for v in begins[s0:s1]], [v[i0:i1] for v in ends[s0:s1]]
        first = (x01, *engine.evaluator.slopes(sub, Grid(x01)))  # first estimates of all chunks, then their counts
        f, k = probe_counts(first, w01, torch.cat(b), torch.cat(e), tol)
        failing, looks = failing + f, looks + k
        kept += 2 * first[1].numel() * first[1].element_size()
        subs.append((sub, b, e, first if kept <= budget else None))
    need = _dense.dense_need(failing)
    if tol < GAP_TOL and _dense.DENSE_AFTER > 0 and looks >= need:
        logger.warning("the adaptive quadrature found the first estimates of %d (step, input) pairs kink-dense, a "
                       "decision over all of them: planned as one batch, not in %d chunks (RULE_BYTES), its memory "
                       "past that budget. Fix: fewer inputs per call (predict a few at a time).", S * T, len(chunks))
        return _plan(engine, stack, begins, ends, n, tol, coarsen, None, _stitch(chunks, subs, S, T))
    # the probe's counts are the batch's already: the chunks add only their levels' counts, and stop refining once
    # one of those reaches the batch's need
    watch = DenseWatch(failing=failing, looks=looks if tol < GAP_TOL else 0, bound=need, counted=True)
    parts = []
    for chunk, (sub, b, e, first) in zip(chunks, subs):
        parts.append((chunk, _plan(engine, sub, b, e, n, tol, coarsen, watch, first)))
        if watch.coupled(watch.bound):  # certain before the other chunks are refined
            break
    if coupled(watch):
        logger.warning("the adaptive quadrature refined %d (step, input) pairs in %d chunks (RULE_BYTES) and found "
                       "the batch kink-dense, a decision over all of them: planned again as one batch, whose memory "
                       "passes that budget. Fix: fewer inputs per call (predict a few at a time).", S * T, len(chunks))
        return _plan(engine, stack, begins, ends, n, tol, coarsen, None, _stitch(chunks, subs, S, T))
    return merge(parts, S, T)


def probe_counts(first: tuple[Tensor, Tensor, Tensor], w01: Tensor, g_a: Tensor, g_b: Tensor,
                 tol: float) -> tuple[int, int]:
    """The counts of the probe's decision over ``first = (x01, h0, d0)``, the first estimate of some units: units
    that miss it, and of them those far after it that no one kink explains, as
    :func:`~explaind.kernel.adaptive.adaptive_plan` counts them (sums over a partition are the whole batch's)."""
    x01, h0, d0 = first
    est0 = torch.einsum("q,uqo->uo", w01, d0)
    exact, _, floor, thr = tolerances(g_a, g_b, tol)
    err0 = (est0 - exact).abs().amax(-1)
    failing = torch.nonzero(err0 > thr).reshape(-1)
    far = _dense.far_units(err0[failing], thr[failing], exact.abs().amax(-1)[failing], floor[failing])
    far &= ~one_kink(failing, est0, g_a, g_b, (x01, w01, h0, d0))
    return failing.numel(), int(far.sum())


def _stitch(chunks: list[tuple[int, int, int, int]], subs: list[tuple[Any, ...]], n_steps: int,
            n_inputs: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The chunks' first estimates ``(x01, h0, d0)`` as the whole group's, step-major (``None`` where some were not
    kept)."""
    if any(first is None for *_, first in subs):
        return None
    x01, h0, _ = subs[0][3]
    q_o = h0.shape[1:]
    h = h0.new_empty(n_steps, n_inputs, *q_o)
    d = torch.empty_like(h)
    for (s0, s1, i0, i1), (*_, first) in zip(chunks, subs):
        h[s0:s1, i0:i1] = first[1].reshape(s1 - s0, i1 - i0, *q_o)
        d[s0:s1, i0:i1] = first[2].reshape(s1 - s0, i1 - i0, *q_o)
    return x01, h.reshape(n_steps * n_inputs, *q_o), d.reshape(n_steps * n_inputs, *q_o)


def coupled(watch: DenseWatch) -> bool:
    """Whether the whole batch behind ``watch`` would have been found kink-dense: its first estimate (the probe's
    test) or a refinement level (:func:`~explaind.kernel.dense.dense_units`)."""
    return _dense.DENSE_AFTER > 0 and watch.coupled(_dense.dense_need(watch.failing))


def merge(parts: list[tuple[tuple[int, int, int, int], NodePlan]], n_steps: int, n_inputs: int) -> NodePlan:
    """One step-major plan of ``n_steps x n_inputs`` units from the plans of chunks ``(step_lo, step_hi, input_lo,
    input_hi)``, the nodes padded with weight 0 to the most of any unit."""
    Q = max(p.t.shape[1] for _, p in parts)
    first = parts[0][1]
    t = first.t.new_zeros(n_steps, n_inputs, Q)
    w = torch.zeros_like(t)
    exact = first.exact.new_empty(n_steps, n_inputs, first.exact.shape[-1])
    estimate = torch.empty_like(exact)
    evals = first.evals.new_empty(n_steps, n_inputs)
    for (s0, s1, i0, i1), p in parts:
        shape = (s1 - s0, i1 - i0)
        t[s0:s1, i0:i1, :p.t.shape[1]] = p.t.reshape(*shape, -1)
        w[s0:s1, i0:i1, :p.w.shape[1]] = p.w.reshape(*shape, -1)
        exact[s0:s1, i0:i1], estimate[s0:s1, i0:i1] = p.exact.reshape(*shape, -1), p.estimate.reshape(*shape, -1)
        evals[s0:s1, i0:i1] = p.evals.reshape(shape)
    U = n_steps * n_inputs
    return NodePlan(t.reshape(U, Q), w.reshape(U, Q), exact.reshape(U, -1), estimate.reshape(U, -1),
                    evals.reshape(U))


def _plan(engine: Any, stack: StepStack, begins: list[Tensor], ends: list[Tensor], n: int, tol: float,
          coarsen: bool, watch: DenseWatch | None, first: tuple[Tensor, Tensor, Tensor] | None = None) -> NodePlan:
    """The adaptive plan of all the units of ``stack`` in one batch (``watch``: a chunk of a larger one; ``first``:
    its first estimate ``(x01, h0, d0)`` where already taken)."""
    T = stack.X.shape[0]
    x01, w01 = _nodes(engine, n)
    if first is None:
        first = (x01, *engine.evaluator.slopes(stack, Grid(x01)))  # first estimate, nodes shared by all inputs
    _, h0, d0 = first
    est0 = torch.einsum("q,uqo->uo", w01, d0)

    def refine(units: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return engine.evaluator.slopes(stack, Rows(units // T, units % T, t))

    def shared(units: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # the nodes t shared by the units of one step: one evaluation per node for all of the step's inputs
        h = d0.new_empty(units.numel(), t.numel(), d0.shape[-1])
        d = torch.empty_like(h)
        # the step's T inputs at a chunk of nodes: within _dense.SHARED_NODES_BYTES like the chunks of cut_cells
        per = max(1, _dense.SHARED_NODES_BYTES // max(1, 2 * d0.element_size() * T * d0.shape[-1]))
        for s in torch.unique(units // T).tolist():
            mine = units // T == s
            for lo in range(0, t.numel(), per):
                hs, ds = engine.evaluator.slopes(stack.steps(s, s + 1), Grid(t[lo:lo + per]))  # (T, per, O)
                h[mine, lo:lo + per], d[mine, lo:lo + per] = hs[units[mine] % T], ds[units[mine] % T]
        return h, d

    steps = torch.arange(stack.n_steps, device=d0.device).repeat_interleave(T)
    rule = getattr(engine, "rule_bytes", None)  # a level's groups within a quarter of it (kernel/adaptive_memory.py)
    return adaptive.adaptive_plan(est0, torch.cat(begins), torch.cat(ends), refine, tol=tol, nodes=n,
                                  coarsen=coarsen, first=(x01, h0, d0), max_depth=adaptive.MAX_DEPTH,
                                  max_evals=cap(engine), shared=shared, steps=steps, watch=watch,
                                  level_bytes=None if rule is None else max(1, rule // 4))


def _nodes(engine: Any, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` Gauss–Legendre nodes and weights on ``[0, 1]`` of the first estimate, in the engine's dtype."""
    x01, w01 = rule_nodes("gauss-legendre", n)
    return (torch.as_tensor(x01, dtype=engine.dtype, device=engine.device),
            torch.as_tensor(w01, dtype=engine.dtype, device=engine.device))
