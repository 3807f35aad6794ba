r"""Test inputs split over the processes of ``torch.distributed``: exact, one gather at the end.

Every decomposition is independent per test input (docs/maths.md §5): the rows of :math:`\Phi_s(x)`,
the quadrature plan, the contractions and the completeness terms of input :math:`x` never involve
another test input. So the test inputs are split into contiguous shards, one per process, each
process explains its shard with the whole trajectory, and the results are gathered along the
test axis — the same numbers as one process, to rounding of the identical arithmetic. Launch with
``torchrun`` (gloo on CPU, NCCL on GPU) and initialise the process group before ``transform``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["world", "shard_rows", "gather_rows", "all_sum"]


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


def _device() -> torch.device:
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(t: Tensor, counts: list[int]) -> Tensor:
    """Every rank's ``t`` (``counts[rank]`` rows along dim 0, other dims equal), concatenated in rank order."""
    dist = torch.distributed
    dev = _device()
    rows = max(counts)
    padded = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def all_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over the ranks (every rank gets it)."""
    dist = torch.distributed
    out = t.to(_device()).clone()
    dist.all_reduce(out)
    return out.to(t.device)
