r"""Work split over the processes of ``torch.distributed``: test inputs × parameter blocks × step windows.

Every term of the decomposition (docs/maths.md §5) is a sum over steps ``s`` and coordinates
``p`` of per-input products :math:`\Phi_s(x)[o, p]\, v_s[p]`, and the recurrences of the update
model are diagonal per coordinate. So the work splits into exact *cells*:

* **test shards**: the rows of :math:`\Phi_s(x)`, the quadrature plans and the completeness terms
  of an input never involve another input;
* **parameter blocks** (Jacobian path): a block's coordinates need only the block's columns of
  :math:`\Phi_s`, the block's per-sample gradients and the block's optimizer coefficients;
* **step windows** (not for the ``train`` axis): a window ``lo .. hi-1`` needs its own steps'
  plans and the momentum buffers at ``lo``, which the process replays from
  :func:`~explaind.kernel.split.momentum_start` (one batch gradient per earlier step).

Each process fills the cell :class:`Cell` of its rank into zero-initialised result tensors of the
full shape; one summing all-reduce (:func:`all_sum_`) then gives every process the result. A
cell's contribution is zero outside it (``x + 0 = x``), so the result holds the same terms as one
process, summed axes adding them in another order, and smaller batched evaluations (a shorter
window's quadrature plans, a block's Jacobian columns) may round differently: the same numbers
to rounding (tests/test_distributed.py checks 1e-12 in float64). Launch
with ``torchrun`` (gloo on CPU, NCCL on GPU) and initialise the process group before
``transform`` / ``predict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["world", "shard_rows", "ShardLayout", "Cell", "choose_layout", "all_sum_", "all_max_"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_rows(n: int, rank: int, size: int) -> tuple[slice, list[int]]:
    """This rank's contiguous rows of ``n`` and every rank's row count (the first ``n % size`` get one more)."""
    counts = [n // size + (1 if r < n % size else 0) for r in range(size)]
    lo = sum(counts[:rank])
    return slice(lo, lo + counts[rank]), counts


@dataclass(frozen=True)
class Cell:
    """The share of one process.

    Attributes
    ----------
    rows : slice
        Test inputs (positions in the full result).
    window : (int, int)
        Steps ``lo .. hi-1`` (``lo == hi``: none).
    block : (int, int)
        ``(index, count)``: this process takes the ``index``-th of ``count`` contiguous runs of
        parameter blocks.
    lead : bool
        Whether this process writes the per-input quantities its block shard shares with the
        others (exact step differences, evaluation counts, :math:`g(\theta_{start})`, :math:`g(\theta_{stop})`).
    """

    rows: slice
    window: tuple[int, int]
    block: tuple[int, int]
    lead: bool

    @property
    def empty(self) -> bool:
        """Nothing to compute (more processes than inputs × steps)."""
        return self.rows.stop <= self.rows.start or self.window[1] <= self.window[0]

    def my_blocks(self, blocks: Sequence) -> list:
        """This process's contiguous run of ``blocks``."""
        index, count = self.block
        return list(blocks[shard_rows(len(blocks), index, count)[0]])


@dataclass(frozen=True)
class ShardLayout:
    """Processes arranged as ``tests × blocks × steps`` (the product is the world size)."""

    tests: int
    blocks: int
    steps: int

    def cell(self, rank: int, n_tests: int, window: tuple[int, int]) -> Cell:
        """The :class:`Cell` of process ``rank`` for ``n_tests`` inputs and the step ``window``."""
        t, rest = divmod(rank, self.blocks * self.steps)
        b, s = divmod(rest, self.steps)
        rows, _ = shard_rows(n_tests, t, self.tests)
        start, stop = window
        steps, _ = shard_rows(stop - start, s, self.steps)
        return Cell(rows, (start + steps.start, start + steps.stop), (b, self.blocks), b == 0)

    def describe(self) -> dict[str, int]:
        """``{"tests": ..., "blocks": ..., "steps": ...}`` (for ``meta``)."""
        return {"tests": self.tests, "blocks": self.blocks, "steps": self.steps}


def choose_layout(size: int, n_tests: int, n_steps: int, *, blocks: bool, steps: bool) -> ShardLayout:
    """Arrange ``size`` processes for ``n_tests`` inputs and ``n_steps`` steps.

    Test shards come first (no work is repeated): the largest divisor of ``size`` not above
    ``n_tests``. The remaining factor goes to step windows when ``steps`` is allowed and there are
    enough steps (each window replays only earlier batch gradients), else to parameter blocks
    when ``blocks`` is allowed (each block repeats the forward passes), else to step windows or
    test shards anyway (the surplus processes stay idle and contribute zeros).
    """
    tests = max(d for d in range(1, size + 1) if size % d == 0 and d <= max(1, n_tests))
    rest = size // tests
    if rest == 1:
        return ShardLayout(tests, 1, 1)
    if steps and n_steps >= rest:
        return ShardLayout(tests, 1, rest)
    if blocks:
        return ShardLayout(tests, rest, 1)
    if steps:
        return ShardLayout(tests, 1, rest)
    return ShardLayout(size, 1, 1)


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_(tensors: Sequence[Tensor], op: torch.distributed.ReduceOp) -> None:
    """Reduce ``tensors`` in place over the processes, one collective per dtype (flattened together)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    dev = _device()
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1).to(dev) for t in group])
        torch.distributed.all_reduce(flat, op=op)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_sum_(tensors: Sequence[Tensor]) -> None:
    """Replace every tensor by its sum over the processes (in place; one all-reduce per dtype)."""
    _reduce_(tensors, torch.distributed.ReduceOp.SUM)


def all_max_(tensors: Sequence[Tensor]) -> None:
    """Replace every tensor by its element-wise maximum over the processes (in place)."""
    _reduce_(tensors, torch.distributed.ReduceOp.MAX)
