r"""The adaptive rule's output-sized state per (step, input) pair, bounded: accepted panels and a level's work.

The rule (:func:`~explaind.kernel.adaptive.adaptive_plan`) explains all the outputs of a unit at once, so every
value it keeps of a panel is an output-sized vector: for a causal language model ``sequence x vocabulary`` values
(65,536 at 64 tokens of 1,024, 512 KiB in float64). Two parts of its state grew with the panels of a unit, however
few units a chunk held (``docs/engine.md``, section 2, *What a batch is*):

* **Accepted panels** kept their estimate and :math:`h` at their ends (three vectors each), though only the sum of
  the estimates per unit is read afterwards. :class:`Accepted` adds each accepted panel's estimate to a running sum
  per unit at once and keeps of it only its scalars, in the same order as the sum over all panels the plan took
  before (the same additions, the same result); only a plan that merges smooth panels afterwards (``coarsen``),
  which reads them, keeps the vectors.
* **A refinement level** took copies of every open panel (its halves, the samples graded beside them) and
  :math:`h, h'` at all their nodes at once: about :data:`LEVEL_PANEL_COPIES` output-sized vectors an open panel,
  so that one unit refined at a tight tolerance, with hundreds of open panels, passed any budget alone.
  :class:`Groups` keeps the open panels in groups of :func:`level_rows` rows, and a level takes one group at a
  time. A level's panels are refined independently of each other (each has its own share of the unit's
  tolerance; what couples the panels of a unit, the summed error that stops it, is read between levels), so the
  groups take the same steps; only the order in which accepted panels are summed, and the rows of each
  evaluation, differ (rounding).
* **Between levels** the open panels kept 13 vectors each, most of them the same vector twice (adjacent panels'
  common end, side samples at the ends): :class:`Groups` keeps them packed (:mod:`~explaind.kernel.adaptive_pool`),
  each distinct value once, and gives them back bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .adaptive_jobs import Jobs, Rows
from .adaptive_pool import Packed, Pool, ends, pack, unpack

__all__ = ["LEVEL_BYTES", "LEVEL_PANEL_COPIES", "PANEL_VECTORS", "Panels", "Accepted", "level_rows", "Groups"]

logger = logging.getLogger(__name__)

#: Bytes of output-sized state one refinement level may take for a group of open panels: a quarter of the rule's
#: budget (``RULE_BYTES`` of :mod:`~explaind.kernel.adaptive_chunks`), an eighth of an estimator's ``memory_budget``
#: where one is given (:func:`~explaind.kernel.evaluate.budgets`), as much as one evaluation's outputs.
LEVEL_BYTES = 2**28
#: Output-sized vectors one open panel takes at the peak of a level: the panel and its copies (13 vectors each:
#: its ends, the samples beside them, its bracket, its estimate), its two halves, :math:`h, h'` at their nodes and
#: at its probes, the samples the grading stacks beside them, the graded halves' copies, and a margin.
LEVEL_PANEL_COPIES = 160
#: Output-sized vectors an open panel holds unpacked: :math:`h, h'` at its ends, at the samples beside them and at its
#: bracket's ends, and its estimate (:class:`~explaind.kernel.adaptive_jobs.Jobs`); packed between levels, at most
#: these (:mod:`~explaind.kernel.adaptive_pool`).
PANEL_VECTORS = 13


@dataclass
class Panels(Rows):
    """Accepted panels ``[a, b]``: kind, unit, ends, estimate ``(R, O)``, error, ``h`` at the ends, tolerance.

    ``est``, ``f_a`` and ``f_b`` have no columns (``(R, 0)``) where :class:`Accepted` sums the estimates at once."""

    kind: Tensor
    unit: Tensor
    a: Tensor
    b: Tensor
    est: Tensor
    err: Tensor
    f_a: Tensor
    f_b: Tensor
    tol: Tensor


class Accepted:
    """Accepted panels, collected level by level; the summed error ``err (U,)`` and estimate ``est (U, O)`` of
    each unit's.

    Parameters
    ----------
    err : Tensor
        Zeros ``(U,)``: the summed error of each unit's accepted panels.
    n_outputs : int
        Outputs of a unit.
    keep : bool
        Keep each panel's estimate and :math:`h` at its ends (for a pass that reads them, as ``coarsen``); by
        default only their sums per unit.
    """

    def __init__(self, err: Tensor, n_outputs: int, keep: bool = False) -> None:
        self.parts: list[Panels] = []
        self.err, self.keep = err, keep
        self.est = err.new_zeros(err.numel(), n_outputs)

    def add(self, jobs: Jobs | Panels) -> None:
        """Accept the tested panels ``jobs`` (or finished panels): their estimates summed per unit at once."""
        if jobs.unit.numel():
            p = jobs if isinstance(jobs, Panels) else Panels(jobs.kind, jobs.unit, jobs.A, jobs.B, jobs.est, jobs.err,
                                                             jobs.f_A, jobs.f_B, jobs.tol)
            self.est.index_add_(0, p.unit, p.est)
            if not self.keep:
                none = p.est.new_empty(p.est.shape[0], 0)  # not a view, which would keep the estimates alive
                p = Panels(p.kind, p.unit, p.a, p.b, none, p.err, none, none, p.tol)
            self.parts.append(p)
            self.err.index_add_(0, p.unit, p.err)

    def drop(self, units: Tensor) -> None:
        """Forget the accepted panels of the units marked in ``units (U,)`` (bool)."""
        self.parts = [p.take(~units[p.unit]) for p in self.parts]
        self.err[units] = 0
        self.est[units] = 0

    def panels(self) -> Panels | None:
        """All accepted panels (``None`` when there are none)."""
        return Panels.cat(self.parts) if self.parts else None


def level_rows(n_outputs: int, dtype: torch.dtype, budget: int | None = None) -> int:
    """Open panels a refinement level takes at once: :data:`LEVEL_PANEL_COPIES` vectors of ``n_outputs`` values a
    panel within ``budget`` bytes (default :data:`LEVEL_BYTES`); at least one.

    Examples
    --------
    >>> level_rows(64 * 1024, torch.float64)  # a GPT-2 of 64 tokens of 1,024: 512 KiB a vector
    3
    >>> level_rows(10, torch.float64) > 10**4  # a classifier: its panels at once
    True
    """
    elem = torch.finfo(dtype).bits // 8
    return max(1, (LEVEL_BYTES if budget is None else budget) // max(1, LEVEL_PANEL_COPIES * elem * n_outputs))


class Groups:
    """The open panels of a batch between refinement levels, in groups of at most ``rows`` panels.

    A level (:meth:`level`) takes one group at a time and frees it before the next, so that what it holds beyond the
    open panels themselves is one group's work; the panels that stop (:meth:`stop`) leave group by group, in order.
    Between levels the open panels are packed (:mod:`~explaind.kernel.adaptive_pool`): each distinct output-sized
    value of a level once, with each panel's estimate, at most :data:`PANEL_VECTORS` vectors a panel and commonly about
    half of them. Where they pass ``limit`` bytes (the rule's budget) a level logs a warning once, naming the fix.
    """

    def __init__(self, jobs: Jobs, rows: int, limit: int | None = None, tol: float | None = None) -> None:
        self.rows, self.limit, self.tol, self.warned = rows, limit, tol, False
        self.pool = Pool()
        self.parts = self._split(jobs)
        self.peak = self.held()  # the most bytes the open panels held between two levels

    def _split(self, jobs: Jobs) -> list[Packed]:
        n = jobs.unit.numel()
        if n == 0:
            return []
        packed = pack(jobs, self.pool)  # one chunk, shared by the groups of these panels
        if n <= self.rows:
            parts = [packed]
        else:
            index = torch.arange(n, device=jobs.unit.device)
            parts = [packed.take(index[lo:lo + self.rows]) for lo in range(0, n, self.rows)]
        for p in parts:
            self.pool.hold(p.chunks)
        return parts

    def held(self) -> int:
        """Bytes of output-sized state the open panels hold: the pool's values and the panels' estimates."""
        return self.pool.nbytes() + sum(p.nbytes() for p in self.parts)

    @property
    def unit(self) -> Tensor:
        """The unit of each open panel, in order."""
        return torch.cat([p.unit for p in self.parts]) if self.parts else torch.zeros(0, dtype=torch.long)

    @property
    def err(self) -> Tensor:
        """The error of each open panel's last test, in order."""
        return torch.cat([p.err for p in self.parts])

    def _keep(self, parts: list[Packed]) -> None:
        """Keep the non-empty ``parts``; release the pool's chunks of those left out."""
        self.parts = []
        for p in parts:
            if p.unit.numel():
                self.parts.append(p)
            else:
                self.pool.release(p.chunks)

    def drop(self, units: Tensor) -> None:
        """Forget the open panels of the units marked in ``units (U,)`` (bool)."""
        self._keep([p.take(~units[p.unit]) for p in self.parts])

    def stop(self, done: Tensor, acc: Accepted) -> None:
        """Accept into ``acc`` the open panels of the units marked in ``done (U,)`` (bool)."""
        kept = []
        for p in self.parts:
            stop = done[p.unit]
            if bool(stop.any()):
                q = p.take(stop)
                j = q.jobs
                none = q.est.new_empty(q.est.shape[0], 0)
                f_a, f_b = ends(q, self.pool) if acc.keep else (none, none)  # read by a pass after the plan
                acc.add(Panels(j.kind, j.unit, j.A, j.B, q.est, j.err, f_a, f_b, j.tol))
            kept.append(p.take(~stop))
        self._keep(kept)

    def level(self, refine: Callable[[Jobs], Jobs]) -> None:
        """One refinement level, ``refine`` (open panels -> the panels left open) a group at a time."""
        old, self.pool, new = self.pool, Pool(), []
        while self.parts:
            p = self.parts.pop(0)
            jobs = unpack(p, old)
            old.release(p.chunks)
            del p
            new += self._split(refine(jobs))
            del jobs
        self.parts = new
        held = self.held()
        self.peak = max(self.peak, held)
        if self.limit is not None and not self.warned and new:
            n, f = sum(p.unit.numel() for p in new), new[0].est
            if held > self.limit:
                self.warned = True
                logger.warning("the adaptive quadrature holds %d open panels of %d outputs between two refinement "
                               "levels (%.0f MB, each distinct output-sized vector once, %.1f a panel), past the "
                               "budget of its state (%.0f MB: RULE_BYTES, or half of memory_budget): its (step, input) "
                               "pairs at tol=%g cross many kinks or curve strongly. The plan is unchanged. Fix: a "
                               "looser tol, fewer outputs (InfluenceEstimator(target=...)), or a larger memory_budget "
                               "if the machine has it free.", n, f.shape[1], held / 1e6,
                               held / (n * f.element_size() * max(1, f.shape[1])), self.limit / 1e6,
                               self.tol if self.tol is not None else float("nan"))
