r"""Buffers that training changes (batch-norm running statistics), recorded per step (docs/recording.md).

The model's buffers :math:`\beta` are stored once at the start with the constants. Batch norm in
training mode updates its running mean and variance (and ``num_batches_tracked``) at every forward,
so the trained model is :math:`(\theta_N, \beta_N)`, not :math:`(\theta_N, \beta_0)`.
:class:`BufferTracker` compares the buffers with the last recorded values after every optimizer step
and hands back :math:`\beta_{s+1}` (every tracked buffer) when one of them changed by value, else
``None``. The engine then evaluates step ``s``'s segment at :math:`\beta_s` and adds the exact term
:math:`g(\theta_{s+1}, \beta_{s+1}) - g(\theta_{s+1}, \beta_s)` (docs/maths.md, "Buffers").

In a step file the buffers are ``buffer.<name>``; :class:`~explaind.trajectory.manifest.StepRecord`
``buffers`` says which steps hold them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError

__all__ = ["BufferTracker", "pack_buffers", "unpack_buffers", "PREFIX"]

PREFIX = "buffer."


class BufferTracker:
    """The model's buffers (not frozen parameters) and their last recorded values.

    Parameters
    ----------
    model : nn.Module
    names : sequence of str
        The constants' names; the buffers among them are tracked.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        buffers = dict(model.named_buffers())
        self.model = model
        self.names = tuple(n for n in names if n in buffers)
        self._last: dict[str, Tensor] = {}

    def start(self) -> None:
        """Remember the buffers at the start (:math:`\\beta_0`, stored with the constants)."""
        buffers = dict(self.model.named_buffers())
        self._last = {n: buffers[n].detach().clone() for n in self.names}

    def recorded(self) -> dict[str, Tensor]:
        r""":math:`\beta_s`: the tracked buffers as last recorded (what the step's training forward started from)."""
        return dict(self._last)

    def changed(self) -> dict[str, Tensor] | None:
        r""":math:`\beta_{s+1}` (clones of every tracked buffer) when one changed since the last record, or ``None``."""
        if not self.names:
            return None
        buffers = dict(self.model.named_buffers())
        now = {n: buffers[n].detach() for n in self.names}
        if all(torch.equal(now[n], self._last[n]) for n in self.names):
            return None
        self._last = {n: t.clone() for n, t in now.items()}
        return dict(self._last)


def pack_buffers(buffers: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Step-file tensors of :math:`\\beta_{s+1}` (none when unchanged)."""
    return {} if buffers is None else {PREFIX + n: t for n, t in buffers.items()}


def unpack_buffers(tensors: dict[str, Tensor], names: Sequence[str], where: str) -> dict[str, Tensor]:
    """Inverse of :func:`pack_buffers` for the recorded ``names``."""
    missing = [n for n in names if PREFIX + n not in tensors]
    if missing:
        raise TrajectoryError(f"Trajectory file {where} lacks the buffers {missing} its record says it holds. The "
                              f"store is corrupted; re-record the run.")
    return {n: tensors[PREFIX + n] for n in names}
