r"""Quadrature plans of a window's steps (docs/engine.md §2).

For each step ``s`` of the window and each test input, a :class:`~explaind.kernel.quadrature.NodePlan`
gives the nodes and weights of :math:`\varphi_s(x) \approx \sum_q w_q \nabla_\theta g(\theta_s + t_q\Delta\theta_s, x)`,
the exact difference :math:`g(\theta_{s+1}) - g(\theta_s)` and, for the adaptive rule (and fixed rules
when asked), the estimate along :math:`\Delta\theta_s`. Steps are handled in groups whose stacked
:math:`\theta_s, \Delta\theta_s` take at most :data:`~explaind.kernel.evaluate.STACK_BYTES`: the first
estimates of a group are one grid evaluation, and each refinement level of the adaptive rule one
evaluation of rows ``(step, input, t)`` (per chunk of inputs where their outputs are many, with the same
plans: :mod:`~explaind.kernel.adaptive_chunks`). The adaptive rule's groups hold at most
:data:`ADAPTIVE_GROUP_STEPS` steps whether or not a progress bar is shown, so its plans do not depend
on the bar, and its groups are cut at multiples of that size counted from step 0 (:func:`step_groups`),
so a window plans the steps of every group wholly inside it as the whole run does; the fixed rules'
plans do not depend on the grouping, and their groups shrink so that a
bar moves at least :data:`BAR_UPDATES` times.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import warn_at_caller
from . import adaptive
from . import dense as _dense
from .adaptive_chunks import adaptive_group, cap
from .adaptive_jobs import FLOOR
from .casts import sites_text
from .dense import DENSE_REL
from .evaluate import STACK_BYTES, Grid, StepStack
from .explained import Explained
from .jumps import (
    INFERENCE,
    NO_GRAD,
    SOFTPLUS_JUMP,
    function_sites,
    grad_off_sites,
    hook_sites,
    no_derivative_hint,
    no_derivative_sites,
    singular_sites,
    softplus_jump,
    stop_sites,
)
from .paths import progress_bar
from .quadrature import DEFAULT_NODES, NodePlan, fixed_plan, rule_nodes

__all__ = ["window_plans", "step_groups", "CostNotice", "EVALS_NOTICE"]

logger = logging.getLogger(__name__)


def window_plans(engine: Any, X: Tensor, explained: Explained, window: tuple[int, int], rule: str,
                 nodes: int | None, tol: float, with_estimate: bool,
                 coarsen: bool = False) -> tuple[Tensor, Tensor, list[NodePlan], Tensor | None]:
    r"""Node plans of the window's steps.

    Parameters
    ----------
    engine : PathEngine
    X : Tensor
        Test inputs ``(T, ...)``.
    explained : Explained
    window : (int, int)
        Steps ``start .. stop-1``.
    rule : {"adaptive", "gauss-legendre", "midpoint", "left"}
    nodes : int or None
        Nodes per step or panel (``None``: the rule's default).
    tol : float
        Relative tolerance of the adaptive rule.
    with_estimate : bool
        Fill ``estimate`` for the fixed rules too (the adaptive rule always does).
    coarsen : bool
        Merge smooth panels of the adaptive rule (fewer nodes for plans reused by many
        decompositions; docs/engine.md).

    Returns
    -------
    g_start, g_stop : Tensor
        :math:`g(\theta_{start})` and :math:`g(\theta_{stop})`, shape ``(T, O)``.
    plans : list of NodePlan
        One per step ``start .. stop-1``; the exact difference of step ``s`` is
        :math:`g(\theta_{s+1}, \beta_s) - g(\theta_s, \beta_s)` (buffers held along the segment).
    buffers : Tensor or None
        The buffers terms :math:`g(\theta_{s+1}, \beta_{s+1}) - g(\theta_{s+1}, \beta_s)`, ``(T, S, O)``;
        ``None`` when no buffer changed (docs/maths.md, "Buffers").
    """
    start, stop = window
    n = DEFAULT_NODES[rule] if nodes is None else int(nodes)
    elem = torch.finfo(engine.dtype).bits // 8
    stacked = rule == "adaptive" or with_estimate
    group = max(1, STACK_BYTES // max(1, 2 * elem * engine.layout.size)) if stacked else 1
    if rule == "adaptive":  # the same groups with or without a bar: the rule decides some things per group
        group = min(group, ADAPTIVE_GROUP_STEPS)
    elif engine.progress:  # the bar (and its estimate of the time left) moves at least BAR_UPDATES times
        group = min(group, max(1, -(-(stop - start) // BAR_UPDATES)))
    g_prev = engine.values_at(start, X, explained)
    g_start = g_prev
    plans: list[NodePlan] = []
    # counted in steps: a group of stacked steps advances the bar by its size
    bar = progress_bar(engine.progress, "quadrature", stop - start)
    kinks = _kinks_hint(engine)
    inexact = InexactUnits(tol, _casts_hint(engine), _jumps_hint(engine), kinks, cap=cap(engine))
    cost = CostNotice(tol, stop - start, kinks=kinks)
    buffers: list[Tensor] = []
    ends_all: list[tuple[Tensor, Tensor]] = []
    for lo, hi in step_groups(start, stop, group, aligned=rule == "adaptive"):
        # a stacked group holds theta_lo .. theta_hi from here on: each step's file is read once
        points = [engine.params(s) for s in range(lo, hi + 1)] if stacked else None
        nexts = [engine.values_at(s + 1, X, explained, None if points is None else points[s + 1 - lo])
                 for s in range(lo, hi)]
        ends = ([engine.values_at(s, X, explained, engine.end_params(s)) for s in range(lo, hi)]
                if engine.buffer_names else nexts)
        begins = [g_prev, *nexts[:-1]]
        buffers.extend(b - e for b, e in zip(nexts, ends))
        if with_estimate and rule != "adaptive":
            ends_all.extend(zip(begins, ends))
        if rule == "adaptive":
            plans.extend(_adaptive_group(engine, engine.stack(lo, hi, X, explained, points), begins, ends, n, tol,
                                         coarsen, inexact))
            cost.add(plans[lo - start:], bar)
        else:
            stack = engine.stack(lo, hi, X, explained, points) if with_estimate else None
            plans.extend(_fixed_group(engine, stack, begins, ends, rule, n))
        g_prev = nexts[-1]
        bar.update(hi - lo)
    bar.close()
    inexact.warn()
    if with_estimate and rule not in ("adaptive", "left"):  # "left" (TracIn) is first order by design
        _warn_fixed(plans, rule, n, tol, ends_all)
    return g_start, g_prev, plans, torch.stack(buffers, dim=1) if engine.buffer_names else None


def step_groups(start: int, stop: int, size: int, *, aligned: bool) -> list[tuple[int, int]]:
    """Steps ``start .. stop-1`` cut into groups ``[lo, hi)`` of at most ``size`` steps.

    With ``aligned``, the cuts fall on multiples of ``size`` counted from step 0, not from ``start``: a window
    shares every group that lies wholly inside it with the whole run (and with any other window), so the adaptive
    rule, which decides some things per group, plans those steps the same whichever window is replicated.

    Examples
    --------
    >>> step_groups(5, 40, 16, aligned=True)
    [(5, 16), (16, 32), (32, 40)]
    >>> step_groups(5, 40, 16, aligned=False)
    [(5, 21), (21, 37), (37, 40)]
    """
    cuts = [start]
    while cuts[-1] < stop:
        lo = cuts[-1]
        cuts.append(min(stop, (lo // size + 1) * size if aligned else lo + size))
    return list(zip(cuts[:-1], cuts[1:]))


#: With a progress bar, groups of stacked steps of the fixed rules hold at most this fraction of the window's steps.
BAR_UPDATES = 20
#: Steps the adaptive rule refines together, at most, with or without a progress bar. Its kink-dense test, probe and
#: shared budgets (:mod:`~explaind.kernel.dense`) are decided per group, so a group size that followed the bar would
#: make the plans depend on whether a bar is shown; the bar moves once per group. At least
#: :data:`~explaind.kernel.dense.SHARE_STEPS` steps per group let kink-dense steps share their budget.
ADAPTIVE_GROUP_STEPS = 16


def _rule(engine: Any, rule: str, n: int) -> tuple[Tensor, Tensor]:
    return tuple(torch.as_tensor(v, dtype=engine.dtype, device=engine.device) for v in rule_nodes(rule, n))


def _adaptive_group(engine: Any, stack: StepStack, begins: list[Tensor], ends: list[Tensor], n: int, tol: float,
                    coarsen: bool, inexact: InexactUnits) -> list[NodePlan]:
    """Adaptive plans of the stacked steps refined together, their inputs in chunks (:mod:`~.adaptive_chunks`)."""
    plan = adaptive_group(engine, stack, begins, ends, n, tol, coarsen)
    inexact.add(plan, torch.cat(begins), torch.cat(ends))
    return plan.split(stack.n_steps)


def _above(est: Tensor, exact: Tensor, g_a: Tensor, g_b: Tensor, tol: float) -> tuple[Tensor, float]:
    r"""Units ``(..., O)`` whose estimate misses :math:`\mathrm{tol} \max_o |\Delta g_o|` plus the rounding floor of
    :func:`~explaind.kernel.adaptive.adaptive_plan` (bool ``(...)``), and the largest relative error among them."""
    scale = exact.abs().amax(-1)
    floor = FLOOR * torch.finfo(scale.dtype).eps * (g_a.abs().amax(-1) + g_b.abs().amax(-1))
    err = (est - exact).abs().amax(-1)
    above = err > tol * scale + floor
    worst = float((err[above] / scale[above].clamp_min(torch.finfo(scale.dtype).tiny)).max()) if bool(above.any()) \
        else 0.0
    return above, worst



#: Evaluations per (step, input) on average above which the adaptive rule says what it costs (the 100-point
#: midpoint rule's count; docs/engine.md section 2, *The cost of kink-rich paths*).
EVALS_NOTICE = 100
#: A capped float64 unit's relative error below this, far below float32 rounding, is named as curvature, not casts.
CURVED_WORST = 1e-9


class CostNotice:
    """The adaptive rule's evaluations over a window: shown on the progress bar, said once when they run high.

    The count of a (step, input) pair is known only once its group of steps is refined. After each group
    :meth:`add` shows the mean so far on the bar, and the first time the mean passes :data:`EVALS_NOTICE`
    it logs one warning (``logging``, not :class:`~explaind.exceptions.ExplaindWarning`: the result is as
    exact as ``tol`` asks, what runs high is its price) naming the count, ``tol`` and the lever.
    """

    def __init__(self, tol: float, n_steps: int, level: float | None = None, kinks: str | None = None) -> None:
        self.tol, self.n_steps, self.kinks = tol, n_steps, kinks
        self.level = EVALS_NOTICE if level is None else level
        self.spent = self.units = self.steps = self.most = 0
        self.said = False

    def add(self, plans: list[NodePlan], bar: Any) -> None:
        """Count one group's plans (one per step); update ``bar`` and warn once above the level."""
        for plan in plans:
            self.spent += int(plan.evals.sum())
            self.units += plan.evals.numel()
            self.most = max(self.most, int(plan.evals.max())) if plan.evals.numel() else self.most
        self.steps += len(plans)
        mean = self.spent / max(1, self.units)
        postfix = getattr(bar, "set_postfix_str", None)
        if postfix is not None:
            postfix(f"{mean:.0f} evaluations per (step, input)")
        if self.said or mean <= self.level:
            return
        self.said = True
        left = self.n_steps - self.steps
        looser = self.tol * 100
        done = f"the first {self.steps} of {self.n_steps} steps ({left} left)" if left else f"all {self.steps} steps"
        if self.kinks is None:  # the model unknown (a bare notice): what kink-rich paths hold
            why = "the path crosses many activation kinks (LeakyReLU, ELU, MaxPool, ReLU6, Hardswish, ...), each " \
                  "located to tol"
        elif self.kinks:
            why = f"the path crosses activation kinks of {self.kinks}, each located to tol"
        else:
            why = (f"the model holds no module with a kink (ReLU-like activations, max pooling), so the count is "
                   f"what its curvature costs at tol={self.tol:g} (or kinks computed inside forward: F.relu, "
                   f"torch.maximum, clamp, the pixel crossings of F.grid_sample)")
        logger.warning(
            "the adaptive quadrature has spent %.0f evaluations per (step, input) on average (up to %d for one) over "
            "%s to reach tol=%g, %.1fx the 100 of the 100-point midpoint rule: %s. The lever is tol: tol=%g "
            "lets each (step, input) err by that fraction of its change and costs fewer evaluations (on a LeakyReLU "
            "CNN 142 instead of 250 per pair at tol 1e-5 instead of 1e-7, replica error 5.1e-06 instead of 4.5e-08; "
            "docs/engine.md section 2, 'The cost of kink-rich paths'); quadrature='midpoint' with nodes=N costs "
            "exactly N per pair at an error it reports.", mean, self.most, done, self.tol, mean / 100, why, looser)


class InexactUnits:
    """The (step, input) pairs of a window that the adaptive rule left above their tolerance, warned about once.

    Each group of steps adds its plan (:meth:`add`); :meth:`warn` then gives one warning for the whole window
    instead of one per group, with the counts and the worst relative error over all of its groups; ``casts_hint``
    (:func:`_casts_hint`) says why a float64 replay may stop at the cap; ``jumps_hint`` (:func:`_jumps_hint`) names
    the modules whose outputs jump, which no rule integrates across; ``kinks`` (:func:`_kinks_hint`) names the
    model's modules with kinks, the first cause of a cap when there are any (the generic float32 hint is then left
    out; a cast the replay found is still named); without any, an error left below :data:`CURVED_WORST` is named as
    curvature (:func:`_curved_hint`).
    """

    def __init__(self, tol: float, casts_hint: str = "", jumps_hint: str = "", kinks: str | None = None,
                 cap: int | None = None) -> None:
        self.tol, self.casts_hint, self.jumps_hint, self.kinks = tol, casts_hint, jumps_hint, kinks
        self.cap = adaptive.MAX_EVALS if cap is None else cap
        self.above = self.total = self.dense = self.capped = 0
        self.worst = 0.0
        self.float64 = False

    def add(self, plan: NodePlan, g_a: Tensor, g_b: Tensor) -> None:
        """Count the units of one group's plan above ``tol`` (``g_a, g_b``: the values at its steps' ends)."""
        above, worst = _above(plan.estimate, plan.exact, g_a, g_b, self.tol)
        self.total += above.numel()
        if not bool(above.any()):
            return
        capped = above & (plan.evals >= self.cap)
        self.above += int(above.sum())
        self.capped += int(capped.sum())
        self.dense += int((above & ~capped).sum())
        self.worst = max(self.worst, worst)
        self.float64 |= plan.exact.dtype == torch.float64

    def warn(self) -> None:
        """A loud warning when units ended above their tolerance: at the evaluation cap, or kink-dense."""
        if not self.above:
            return
        causes = [self.jumps_hint] if self.jumps_hint else []
        if self.dense:
            what = "kinks or the jumps named above" if self.jumps_hint else "activation kinks (a ReLU-dense path)"
            causes.append(f"{self.dense} crossed too many {what} to locate one by one: "
                          f"they were integrated on a grid per step, its cells cut at the kinks the node values locate "
                          f"(at most the midpoint rule's error on the same nodes), {_dense.GRID_EVALS} nodes per "
                          f"(step, input) on average where {_dense.SHARE_STEPS} steps or more took it "
                          f"({adaptive.DENSE_EVALS} on fewer), shared out over the steps by the error of their first "
                          f"estimate and grown up to {adaptive.DENSE_EVALS} where not expected to beat the "
                          f"{adaptive.DENSE_EVALS}-point midpoint rule, or stopped at {adaptive.DENSE_EVALS} "
                          f"evaluations below {DENSE_REL:g} of their change")
        if self.capped:
            causes.append(f"{self.capped} stopped at the cap of about {self.cap} evaluations")
            if self.kinks:  # the model's own kinks first: each one the path crosses is located to tol
                causes.append(f"their paths cross more kinks of {self.kinks} than the cap lets the rule locate to "
                              f"tol; a looser tol locates each with fewer evaluations")
            own = self.casts_hint.startswith("the model's")  # a cast the replay found, not the generic hint
            if self.float64 and self.casts_hint and (own or not (self.kinks or self.jumps_hint)):
                curved = not own and self.worst < CURVED_WORST  # far below float32 rounding: no cast explains it
                causes.append(_curved_hint(self.worst, self.tol) if curved else self.casts_hint)
        raise_cap = (f"raise the cap where pairs stopped at it (max_evals={4 * self.cap} on KernelReplica or "
                     f"InfluenceEstimator: up to that many evaluations a pair), " if self.capped else "")
        warn_at_caller(
            f"the adaptive quadrature left {self.above} of {self.total} (step, input) pairs above tol={self.tol:g}, "
            f"with relative error up to {self.worst:.2g}: {'; '.join(causes)}. The error left is reported as "
            f"quadrature_error (never hidden). For a smaller error {raise_cap}raise the budget "
            f"(quadrature='midpoint', nodes=... costs a known number of evaluations), or explain fewer steps.")


def _curved_hint(worst: float, tol: float) -> str:
    """Why a float64 replay without kinks, jumps or casts stops at the cap just above ``tol``: curvature."""
    looser = 10.0 ** math.ceil(math.log10(worst))
    return (f"the error left is far below float32 rounding (about 1e-7) and the model holds no kink, jump or cast "
            f"the replay found, so these paths are smooth but curve more than the cap resolves to tol={tol:g} "
            f"(an oscillating activation such as sin of large arguments in SIREN layers or Fourier features, or a "
            f"large step); tol={looser:g} accepts the error left, a tighter one needs quadrature='midpoint' with more "
            f"nodes")


def _jumps_hint(engine: Any) -> str:
    """Names what makes the model's output jump along a segment, or ``""`` when nothing was found: modules (max
    unpooling, ``Hardshrink``, ``Threshold``, ``Softplus`` with a low ``threshold``) and calls inside ``forward``
    found by :func:`~explaind.kernel.jumps.find_jumps` (``engine.jump_sites``)."""
    module = getattr(getattr(engine, "fm", None), "module", None)
    named = list(module.named_modules()) if module is not None else []
    unpool = [f"{name} ({type(m).__name__})" for name, m in named
              if isinstance(m, (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d))]
    steps = [f"{name} ({type(m).__name__})" for name, m in named
             if (isinstance(m, nn.Hardshrink) and m.lambd != 0)
             or (isinstance(m, nn.Threshold) and m.value != m.threshold)
             or (isinstance(m, nn.Softplus) and softplus_jump(m.beta, m.threshold) > SOFTPLUS_JUMP)]
    sites = getattr(engine, "jump_sites", ())
    stops, poles, frozen = stop_sites(sites), singular_sites(sites), grad_off_sites(sites, INFERENCE)
    off = {*frozen, *grad_off_sites(sites, NO_GRAD), *hook_sites(sites)}  # forward mode ignores both: no cause
    calls = [site for site in sites if site not in stops and site not in poles and site not in off
             and not any(f"({kind}): " in site for kind in ("Softplus", "Threshold", "Hardshrink"))]  # named above
    hints = [singular_hint(poles)] if poles else []
    functions = function_sites(sites)
    if functions:
        hints.append(f"the model's forward applies custom torch.autograd.Functions ({'; '.join(functions[:4])}): "
                     f"the path derivatives are their jvp, so a jvp that is not the derivative of their forward (one "
                     f"that mirrors a backward changing gradients on purpose, as -t for a gradient reversal layer) "
                     f"leaves the change its forward makes to quadrature_error. Fix: a jvp equal to the derivative "
                     f"of the forward (t for a gradient reversal layer's identity); the backward may stay as "
                     f"trained")
    if frozen:
        hints.append(f"the model's forward reads tensors that depend on the parameters under torch.inference_mode() "
                     f"({'; '.join(frozen[:4])}): its output moves with them, but no derivative, forward-mode "
                     f"included, passes through inference mode, so no quadrature rule reproduces that part of the "
                     f"change and it stays in quadrature_error. Fix: torch.no_grad() instead of "
                     f"torch.inference_mode() there: the same values and the same training gradients, and "
                     f"forward-mode derivatives run through no_grad, so the replica is exact")
    untaken = no_derivative_sites(stops)  # calls torch gives no derivative: a stop with a hint of its own
    hints, stops = hints + ([no_derivative_hint(untaken)] if untaken else []), [s for s in stops if s not in untaken]
    if stops:
        hints.append(f"the model's forward detaches tensors that depend on the parameters ({'; '.join(stops[:6])}): "
                     f"its output moves with them, but its gradient, which the path integral follows, does not (a "
                     f"weight divided by its norm taken under .detach(), a stop-gradient target), so no quadrature "
                     f"rule reproduces that part of the change and it stays in quadrature_error. Fix: no .detach() "
                     f"(nor .data, nor torch.no_grad()) on parameter-dependent values in the forward of the run you "
                     f"want explained (w / w.norm(dim=1, keepdim=True) instead of a detached norm)")
    if unpool:
        hints.append(f"the model holds {unpool}, whose output jumps where the maximum of a pooling window changes "
                     f"place (the value moves to another position): the gradient has no term for a jump, so no "
                     f"quadrature rule integrates across it and the jump stays in quadrature_error. Fix: upsample "
                     f"continuously (nn.Upsample, F.interpolate, nn.ConvTranspose2d) instead of unpooling by the "
                     f"indices")
    if steps:
        hints.append(f"the model holds {steps}, whose output jumps where an input crosses the threshold "
                     f"(Hardshrink(lambd) from 0 to +-lambd, Threshold(threshold, value) from value to threshold, "
                     f"Softplus(beta, threshold) by log(1 + exp(-threshold)) / beta where it switches to the "
                     f"identity): the gradient has no term for a jump, so no quadrature rule integrates across it and "
                     f"the jump stays in quadrature_error. Fix: a continuous activation (nn.Softshrink instead of "
                     f"nn.Hardshrink; nn.Threshold with value equal to threshold, or nn.ReLU; nn.Softplus with its "
                     f"default threshold=20)")
    if calls:
        shown = "; ".join(calls[:6]) + (f"; and {len(calls) - 6} more" if len(calls) > 6 else "")
        hints.append(f"the model's forward applies calls whose output can jump as the parameters move to tensors "
                     f"that depend on them ({shown}): rounding or signs (torch.sign, round, floor, a remainder "
                     f"h % c, a cast to an integer dtype h.long(), F.hardshrink, an angle torch.atan2(y, x) or "
                     f"torch.angle, which jumps by 2 pi where (x, y) crosses the negative x axis; also under a "
                     f"straight-through estimator x + (q(x) - x).detach(), whose gradient is not the derivative of "
                     f"the output), a selection by argmax or topk indices (a route that switches), or a comparison "
                     f"choosing between branches that do not meet (torch.where(h > 0, a, b)); the gradient has no "
                     f"term for a jump, so no quadrature rule integrates across it and the jump stays in "
                     f"quadrature_error (a comparison that only masks a continuous function, as h * (h > 0), is a "
                     f"kink, not a jump). Fix: a continuous forward (a soft relaxation: softmax weights over all "
                     f"experts, a sigmoid gate, branches that meet; for an angle its cosine and sine, x / r and y / r "
                     f"with r = torch.hypot(x, y)) for the run you want explained")
    return "; ".join(hints)


def singular_hint(poles: list[str]) -> str:
    """The cause and fix for log-determinants along a segment (:func:`~explaind.kernel.jumps.singular_sites`)."""
    return (f"the model's forward takes log|det| of matrices that depend on the parameters ({'; '.join(poles[:6])}), "
            f"which is -inf where a matrix turns singular: a step along which its determinant changes sign (a "
            f"normalizing flow's mixing matrix under a large learning rate) has no finite path integral, so no "
            f"quadrature rule or tol reaches that change and it stays in quadrature_error. Fix: keep the matrices "
            f"invertible along every step of the run you want explained (a smaller learning rate, or a "
            f"parametrization whose determinant cannot vanish, as Glow's W = P L (U + diag(exp(s))) with "
            f"log|det W| = sum(s))")


#: torch's modules whose output has a kink (a jump of its derivative, of a higher one for ELU and CELU) at a threshold.
_KINKED = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU,
           nn.CELU, nn.SELU, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _kinks_hint(engine: Any) -> str | None:
    """The model's modules with a kink (:data:`_KINKED`), as ``"n module(s) (Class at path, ...)"``, and the calls
    with a kink inside its forward outside those modules (``engine.kink_sites``, :data:`~.jumps.KINKED_CALLS`:
    ``F.relu``, ``clamp``), as ``"n call(s) in forward (path (Class): torch.nn.functional.relu, ...)"``; ``""``
    when it holds neither, ``None`` when the engine holds no model."""
    module = getattr(getattr(engine, "fm", None), "module", None)
    if module is None:
        return None
    found = [(name, type(m).__name__) for name, m in module.named_modules() if isinstance(m, _KINKED)]
    kinked = {cls.__name__ for cls in _KINKED}
    calls = [site for site in getattr(engine, "kink_sites", ()) if site.split(": ", 1)[0].rsplit(" (", 1)[-1][:-1]
             not in kinked]
    parts = []
    if found:
        shown = ", ".join(f"{cls} at {name or 'the model'}" for name, cls in found[:3])
        parts.append(f"{len(found)} module(s) ({shown}{', ...' if len(found) > 3 else ''})")
    if calls:
        parts.append(f"{len(calls)} call(s) in forward ({', '.join(calls[:3])}{', ...' if len(calls) > 3 else ''})")
    return " and ".join(parts)


def _casts_hint(engine: Any) -> str:
    """Why a float64 replay may stop at the cap: the parameter-dependent casts below its dtype kept as written."""
    moving = [s for s in (getattr(engine, "cast_sites", None) or ()) if s.moving]
    if moving and not engine.fm.keep_dtype:
        return (f"the model's forward rounds tensors that depend on the parameters below {engine.dtype} "
                f"({sites_text(tuple(moving))}) and casts='as_written' keeps that rounding, which makes the integrand "
                f"noisy at its level; casts='auto' evaluates them in {engine.dtype}")
    return ("in float64 a cap is often a model computing part of its forward in float32 whatever its dtype, whose "
            "rounding (about 1e-7) makes the integrand noisy; explaind evaluates the casts it intercepts (Tensor.to, "
            ".float(), dtype= arguments) in the replay dtype unless casts='as_written', so look for others "
            "(docs/guide_own_model.md, 'Layers and models beyond the built-in ones'). A relative error far above "
            "that rounding points to a forward whose output jumps as the parameters move: torch.round, floor, "
            "sign or an argmax selection, often under a straight-through estimator (x + (q - x).detach()), whose "
            "gradient is not the derivative of the output; no rule integrates across a jump. Fix: a continuous "
            "forward (a soft relaxation) for the run you want explained")


def _warn_fixed(plans: list[NodePlan], rule: str, n: int, tol: float, ends: list[tuple[Tensor, Tensor]]) -> None:
    """One loud warning where a fixed rule's estimates (known) miss their steps' changes by more than ``tol``."""
    g_a, g_b = (torch.stack(v) for v in zip(*ends))
    above, worst = _above(torch.stack([p.estimate for p in plans]), torch.stack([p.exact for p in plans]), g_a, g_b,
                          tol)
    if not bool(above.any()):
        return
    warn_at_caller(
        f"quadrature={rule!r} with {n} nodes left {int(above.sum())} of {above.numel()} (step, input) pairs above "
        f"tol={tol:g} of their change, with relative error up to {worst:.2g} (the path crosses activation kinks or "
        f"curves more than {n} nodes resolve). The error left is reported as quadrature_error (never hidden). For a "
        f"smaller error use quadrature='adaptive' (error-controlled) or more nodes.")


def _fixed_group(engine: Any, stack: StepStack | None, begins: list[Tensor], ends: list[Tensor], rule: str,
                 n: int) -> list[NodePlan]:
    """Fixed-rule plans of a group of steps; estimates (when ``stack`` is given) from one grid evaluation."""
    est = None
    if stack is not None:
        x, w = _rule(engine, rule, n)
        _, d = engine.evaluator.slopes(stack, Grid(x))
        est = torch.einsum("q,uqo->uo", w, d).reshape(stack.n_steps, stack.X.shape[0], -1)
    plans = []
    for j in range(len(begins)):
        plan = fixed_plan(rule, n, ends[j] - begins[j])
        plan.estimate = None if est is None else est[j]
        plans.append(plan)
    return plans
