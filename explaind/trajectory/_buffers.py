r"""Buffers that training changes (batch-norm running statistics), recorded per step (docs/recording.md).

The model's buffers :math:`\beta` are stored once at the start with the constants. Batch norm in
training mode updates its running mean and variance (and ``num_batches_tracked``) at every forward,
so the trained model is :math:`(\theta_N, \beta_N)`, not :math:`(\theta_N, \beta_0)`.
:class:`BufferTracker` compares the buffers with the last recorded values after every optimizer step
and hands back :math:`\beta_{s+1}` (every tracked buffer) when one of them changed by value, else
``None``. The engine then evaluates step ``s``'s segment at :math:`\beta_s` and adds the exact term
:math:`g(\theta_{s+1}, \beta_{s+1}) - g(\theta_{s+1}, \beta_s)` (docs/maths.md, "Buffers").

A buffer can also change *between* steps, outside any training forward: a validation forward in training mode
under ``torch.no_grad()`` (spectral norm's power iteration, batch-norm statistics) or a hand edit. Step ``s``'s
gradient is then taken at a value that is not :math:`\beta_s`. A forward pre-hook compares the buffers with
:math:`\beta_s` at the first gradient-enabled forward of every step (:meth:`BufferTracker.take_moved` names
those that moved), so the recorder can check that step's gradient or warn
(docs/recording.md, "Buffers changed between steps").

In a step file the buffers are ``buffer.<name>``; :class:`~explaind.trajectory.manifest.StepRecord`
``buffers`` says which steps hold them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ._common import FirstForward

__all__ = ["BufferTracker", "moved_message", "pack_buffers", "removed_message", "unpack_buffers", "PREFIX"]

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
        self._forward = FirstForward(model, self._first_forward)  # compares at the next gradient-enabled forward
        self._moved: tuple[str, ...] = ()

    def start(self) -> None:
        """Remember the buffers at the start (:math:`\\beta_0`, stored with the constants) and watch the forwards."""
        buffers = dict(self.model.named_buffers())
        self._last = {n: buffers[n].detach().clone() for n in self.names}
        self._moved = ()
        self._forward.arm()
        if self.names:
            self._forward.attach()

    def stop(self) -> None:
        """Remove the forward pre-hook."""
        self._forward.detach()

    def _first_forward(self) -> None:
        r"""At the first gradient-enabled forward since :math:`\beta_s` was recorded: which buffers differ from it."""
        self._moved = self.differing()

    def differing(self) -> tuple[str, ...]:
        """The tracked buffers whose values now differ from the last recorded ones."""
        buffers = self._present()
        return tuple(n for n in self.names if not torch.equal(buffers[n].detach(), self._last[n]))

    def _present(self) -> dict[str, Tensor]:
        """The model's buffers by name; a :class:`TrajectoryError` naming the tracked ones that are gone."""
        buffers = dict(self.model.named_buffers())
        gone = [n for n in self.names if n not in buffers]
        if gone:
            raise TrajectoryError(removed_message(gone))
        return buffers

    def take_moved(self) -> tuple[str, ...]:
        r"""The buffers that held other values than :math:`\beta_s` at the step's first gradient-enabled forward
        (changed between steps, outside a training forward); empty when none did. Resets the answer."""
        moved, self._moved = self._moved, ()
        return moved

    def recorded(self) -> dict[str, Tensor]:
        r""":math:`\beta_s`: the tracked buffers as last recorded (what the step's training forward started from)."""
        return dict(self._last)

    def changed(self) -> dict[str, Tensor] | None:
        r""":math:`\beta_{s+1}` (clones of every tracked buffer) when one changed since the last record, or ``None``."""
        if not self.names:
            return None
        self._moved = ()  # beta_{s+1} is settled: watch the next step's first forward
        self._forward.arm()
        buffers = self._present()
        now = {n: buffers[n].detach() for n in self.names}
        if all(torch.equal(now[n], self._last[n]) for n in self.names):
            return None
        self._last = {n: t.clone() for n, t in now.items()}
        return dict(self._last)


def moved_message(moved: Sequence[str], s: int, checked: bool) -> str:
    """Why buffers that changed between steps matter, and the fix: the gradient check's hint (``checked``) or a
    warning when step ``s`` cannot be checked."""
    where = "since recording started" if s == 0 else f"since step {s - 1}"
    text = (f"The buffers {list(moved)} changed {where} outside a training forward (a validation forward in "
            f"training mode under torch.no_grad(), or a hand edit), so step {s}'s forward read other values than "
            f"the recorded ones, which explaind recomputes its gradients at.")
    fix = (" Fix: run validation forwards under model.eval(), and change a buffer the forward reads only inside "
           "the forward (record with capture_random=True), not between steps.")
    masks = [n for n in moved if n.endswith("_mask")]
    if masks:  # torch.nn.utils.prune keeps its masks as buffers named <tensor>_mask
        fix += (f" {masks} look like torch.nn.utils.prune masks: pruning again between steps changes the model's "
                f"function outside training, which no step of the path explains; prune before recording (a model "
                f"pruned once and then trained is explained exactly), or record each pruning round as a run of its "
                f"own.")
    if checked:
        return " " + text + fix
    return (f"Step {s}: {text[0].lower()}{text[1:]} A buffer the training forward reads (spectral norm's "
            f"power-iteration vectors, a hand-set buffer) then leaves the data part inexact, seen only in the "
            f"estimators' residual share; one it only updates (batch-norm running statistics) is harmless. The "
            f"step is not checked (no train_data or check_gradients=False): pass train_data with check_gradients "
            f"on to have it checked.{fix}")


def removed_message(gone: Sequence[str]) -> str:
    """Why buffers removed from the model while recording are refused, and the fix (``prune.remove`` named for
    masks)."""
    text = (f"The buffers {list(gone)} were removed from the model while recording: the recorded run's function "
            f"reads them, and the steps that follow would be taken by another model than the one recorded.")
    masks = [n for n in gone if n.endswith("_mask")]
    if masks:  # torch.nn.utils.prune.remove deletes <tensor>_mask and <tensor>_orig, making <tensor> a new Parameter
        text += (f" {masks} look like torch.nn.utils.prune masks taken away by prune.remove, which also replaces "
                 f"'<name>_orig' by a new nn.Parameter '<name>' that the optimizer does not hold (it would stop "
                 f"training). Fix: keep the pruning reparametrization for the whole recorded run (explaind "
                 f"explains the pruned model as it is, weight_orig * weight_mask) and call prune.remove after "
                 f"explaining, or on a copy (copy.deepcopy(model)); or prune.remove before recording, with the "
                 f"optimizer built on the model's parameters after it.")
    else:
        text += " Fix: remove buffers before building the recorder, or after the recorded run."
    return text


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
