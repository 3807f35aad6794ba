"""Step-file tensors of a step's micro-batches and the random states of their training forwards.

:func:`pack_micro_batches` writes each :class:`~explaind.trajectory._random.MicroBatch` of a step (its size,
forward counts and :class:`~explaind.trajectory._random.RandomState`) as safetensors entries of the step file;
:func:`unpack_micro_batches` reads them back (docs/recording.md, "Dropout and batch norm").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..exceptions import TrajectoryError
from ._random import MicroBatch, RandomState

__all__ = ["pack_micro_batches", "unpack_micro_batches"]


def pack_micro_batches(micro: Sequence[MicroBatch]) -> dict[str, Tensor]:
    """Step-file tensors of the micro-batches (their merged indices and weights are stored as the batch).

    ``micro.sizes``, ``micro.forwards`` and ``micro.eval_forwards`` (int64 ``(M,)``), and per captured
    micro-batch ``m``
    ``micro.{m}.cpu`` and ``micro.{m}.cuda`` (``(n_devices, 16)``); the state's device type is
    ``micro.{m}.on_cuda`` (a 0-d bool); private generator ``g``'s state is ``micro.{m}.gen.{g}`` and
    their device types ``micro.{m}.gen_cuda`` (bool ``(G,)``); NumPy's state is ``micro.{m}.numpy``.
    """
    out = {"micro.sizes": torch.tensor([int(m.indices.shape[0]) for m in micro], dtype=torch.long),
           "micro.forwards": torch.tensor([m.forwards for m in micro], dtype=torch.long),
           "micro.eval_forwards": torch.tensor([m.eval_forwards for m in micro], dtype=torch.long)}
    for i, m in enumerate(micro):
        if m.state is not None:
            out[f"micro.{i}.cpu"] = m.state.cpu
            out[f"micro.{i}.on_cuda"] = torch.tensor(m.state.device == "cuda")
            if m.state.numpy is not None:
                out[f"micro.{i}.numpy"] = m.state.numpy
            if m.state.cuda:
                out[f"micro.{i}.cuda"] = torch.stack(list(m.state.cuda))
            if m.state.private:
                out[f"micro.{i}.gen_cuda"] = torch.tensor([d == "cuda" for d in m.state.private_devices])
                out.update({f"micro.{i}.gen.{g}": t for g, t in enumerate(m.state.private)})
    return out


def unpack_micro_batches(tensors: dict[str, Tensor], indices: Tensor, weights: Tensor,
                         where: str) -> list[MicroBatch]:
    """Inverse of :func:`pack_micro_batches` (one uncaptured micro-batch when the file holds none)."""
    if "micro.sizes" not in tensors:
        return [MicroBatch(indices, weights)]
    sizes, forwards = tensors["micro.sizes"].tolist(), tensors.get("micro.forwards")
    if forwards is None or sum(sizes) != indices.shape[0] or len(forwards) != len(sizes) or min(sizes) < 0:
        raise TrajectoryError(f"Trajectory file {where}: its micro-batch sizes {sizes} do not add up to the batch of "
                              f"{indices.shape[0]} samples. The store is corrupted; re-record the run.")
    evals = tensors.get("micro.eval_forwards", torch.zeros(len(sizes), dtype=torch.long)).tolist()
    out, lo = [], 0
    for i, (n, f) in enumerate(zip(sizes, forwards.tolist())):
        state = None
        if f"micro.{i}.cpu" in tensors:
            cuda = tensors.get(f"micro.{i}.cuda")
            on_cuda = bool(tensors.get(f"micro.{i}.on_cuda", torch.tensor(False)))
            kinds = tensors.get(f"micro.{i}.gen_cuda", torch.zeros(0, dtype=torch.bool)).tolist()
            missing = [f"micro.{i}.gen.{g}" for g in range(len(kinds)) if f"micro.{i}.gen.{g}" not in tensors]
            if missing:
                raise TrajectoryError(f"Trajectory file {where} lacks the private generator states {missing} its "
                                      f"micro-batch {i} records. The store is corrupted; re-record the run.")
            private = tuple(tensors[f"micro.{i}.gen.{g}"] for g in range(len(kinds)))
            state = RandomState(tensors[f"micro.{i}.cpu"], tuple(cuda) if cuda is not None else (),
                                "cuda" if on_cuda else "cpu", private, tuple("cuda" if k else "cpu" for k in kinds),
                                tensors.get(f"micro.{i}.numpy"))
        out.append(MicroBatch(indices[lo:lo + n], weights[lo:lo + n], int(f), state, int(evals[i])))
        lo += n
    return out
