r"""Flat coordinates of the trainable parameters.

The engine works on the parameter vector :math:`\theta \in \mathbb{R}^D` as the concatenation of
the named tensors (in ``param_names`` order, each flattened row-major). :class:`ParamLayout` maps
between the two views, labels coordinates (``"layer.weight[3,4]"``) and describes *blocks* of
whole tensors that the engine processes one at a time to bound memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

__all__ = ["ParamLayout"]


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a sequence of parameter tensors, flattened end to end.

    Attributes
    ----------
    names : tuple of str
        Tensor names, in flat order.
    shapes : tuple of tuple of int
        Their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], names: Sequence[str] | None = None) -> ParamLayout:
        """Layout of ``tensors`` (in ``names`` order when given)."""
        names = tuple(tensors) if names is None else tuple(names)
        return cls(names, tuple(tuple(int(d) for d in tensors[n].shape) for n in names))

    @cached_property
    def numels(self) -> tuple[int, ...]:
        """Number of coordinates of each tensor."""
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Flat offset of each tensor (length ``len(names) + 1``; the last entry is ``D``)."""
        out = [0]
        for n in self.numels:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def size(self) -> int:
        """``D``, the number of coordinates."""
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.names)

    def slices(self) -> list[tuple[str, slice]]:
        """``(name, slice of the flat vector)`` for each tensor."""
        return [(n, slice(self.offsets[i], self.offsets[i + 1])) for i, n in enumerate(self.names)]

    def flatten(self, tensors: Mapping[str, Tensor], lead: int = 0) -> Tensor:
        """Concatenate ``tensors`` into shape ``(*lead_dims, D)``; ``lead`` leading dims are kept."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:lead], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split ``vec`` of shape ``(..., D)`` into ``name -> (..., *shape)`` views."""
        lead = tuple(vec.shape[:-1])
        return {n: vec[..., sl].reshape(lead + shape) for (n, sl), shape in zip(self.slices(), self.shapes)}

    def sub(self, names: Sequence[str]) -> ParamLayout:
        """The layout of a subset of the tensors (kept in the given order)."""
        index = {n: i for i, n in enumerate(self.names)}
        return ParamLayout(tuple(names), tuple(self.shapes[index[n]] for n in names))

    def blocks(self, max_size: int | None) -> list[ParamLayout]:
        """Consecutive runs of whole tensors with at most ``max_size`` coordinates each.

        A tensor larger than ``max_size`` forms a block of its own; ``None`` gives one block.
        """
        if max_size is None or max_size >= self.size:
            return [self]
        out: list[list[str]] = [[]]
        count = 0
        for name, numel in zip(self.names, self.numels):
            if out[-1] and count + numel > max_size:
                out.append([])
                count = 0
            out[-1].append(name)
            count += numel
        return [self.sub(names) for names in out]

    def group_ids(self, device: Any = None) -> Tensor:
        """Index of the owning tensor for every coordinate, shape ``(D,)`` (int64)."""
        return torch.repeat_interleave(torch.arange(len(self.names), device=device),
                                       torch.tensor(self.numels, device=device))

    def label(self, i: int) -> str:
        """Human-readable name of flat coordinate ``i``, e.g. ``"0.weight[3,4]"``."""
        if not 0 <= i < self.size:
            raise IndexError(f"coordinate {i} is out of range 0..{self.size - 1}")
        g = next(j for j in range(len(self.names)) if self.offsets[j + 1] > i)
        local = i - self.offsets[g]
        idx = []
        for dim in reversed(self.shapes[g]):
            idx.append(local % dim)
            local //= dim
        inner = ",".join(str(v) for v in reversed(idx))
        return f"{self.names[g]}[{inner}]" if self.shapes[g] else self.names[g]

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable description (names, shapes, offsets)."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "offsets": list(self.offsets)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ParamLayout:
        """Inverse of :meth:`to_json`."""
        return cls(tuple(data["names"]), tuple(tuple(int(d) for d in s) for s in data["shapes"]))
