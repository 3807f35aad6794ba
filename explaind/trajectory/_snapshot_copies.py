r"""The raw-gradient snapshots of :class:`~explaind.trajectory._gradients.GradientTap`, made beside ``backward()``.

The tap copies every recorded parameter's gradient right after ``backward()`` accumulated it, so that
the step can compare what the optimizer sees with what ``backward()`` produced (docs/recording.md,
"Recording overhead"). On the CPU those copies, and the finiteness check of each copy that
``log_batch`` reads, are memory passes over every gradient on the training loop's thread.
:class:`SnapshotCopies` hands them to the recorder's
:class:`~explaind.trajectory._background.StateCopier` thread as each gradient is finished, while
``backward()`` goes on computing the gradients of the layers before it, and makes ``backward()``
wait for all of them before it returns (a callback queued on the autograd engine, which runs once
the engine has finished the backward pass, on the thread that called it). So when the loop's code
after ``backward()`` runs (a clipping, ``GradScaler.unscale_``, a hand edit), every snapshot holds
the gradient as ``backward()`` left it, as with copies made in the hook itself.

A copy is made in the hook itself, on the loop's thread, when the gradient is small (fewer than
:data:`INLINE_BELOW` elements) or when it cannot be made beside the backward pass safely: the
gradient is not a contiguous CPU tensor, a recorded parameter carries a
post-accumulate-grad hook of someone else (which may change a gradient in place after the tap's
hook ran: the copy must hold the value before it), or no callback can be queued (a hook called
outside the autograd engine's backward).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import Tensor, nn

from ._background import StateCopier

__all__ = ["INLINE_BELOW", "SnapshotCopies"]

#: Gradients of fewer elements are copied in the hook: their copy costs less than handing it to the thread.
INLINE_BELOW = 2 ** 15


class SnapshotCopies:
    """Snapshot copies made on a :class:`StateCopier` thread during ``backward()``, all finished before it returns.

    Parameters
    ----------
    params : dict of str to Parameter
        The recorded parameters (whose post-accumulate-grad hooks are looked at).
    copier : StateCopier
        The thread that makes the copies, after the jobs submitted to it before.
    """

    def __init__(self, params: dict[str, nn.Parameter], copier: StateCopier):
        self._params = tuple(params.values())
        self._copier = copier
        self._futures: list[Future] = []
        self._queued = False  # the callback that waits for them is queued for the running backward
        self._inline = False  # this backward makes its copies in the hooks (a foreign hook was found)

    def submit(self, p: Tensor, g: Tensor, job: Callable[[], None]) -> bool:
        """Run ``job`` (the copy of gradient ``g`` of parameter ``p``) on the thread; ``False``: run it inline.

        The first call of a backward pass queues the callback that waits for every job of the pass.
        """
        if g.numel() < INLINE_BELOW or g.device.type != "cpu" or g.layout != torch.strided or not g.is_contiguous():
            return False
        if not self._queued:
            self._inline = any(len(getattr(q, "_post_accumulate_grad_hooks", None) or ()) > 1 for q in self._params)
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self.settle)
            except RuntimeError:  # not inside the engine's backward
                return False
            self._queued = True
        if self._inline:
            return False
        self._futures.append(self._copier.run([job]))
        return True

    def settle(self) -> None:
        """Wait for every copy of the backward pass (the engine's callback); a failed copy raises here."""
        futures, self._futures, self._queued = self._futures, [], False
        for future in futures:
            future.result()
