r"""The copy of :math:`\theta_{s+1}` after a recorded step, made on the state copier's thread.

The recorder copies the parameters after every ``optimizer.step()`` (the trajectory's
:math:`\theta_{s+1}`, docs/maths.md §2; and the reference the next step's edit check compares the
live parameters with). :class:`ThetaCopy` hands the copies of contiguous CPU parameters to the
:class:`~explaind.trajectory._background.StateCopier` thread, so they run beside the loop thread's
bookkeeping of the step (the adapter's coefficients, the step record, the hand-over to the writer);
other parameters are cloned at once. The recorder waits for it (:meth:`ThetaCopy.wait`) before
anything reads the copies and, at the latest, before its post-step hook returns: after that the
loop may change a parameter (an edit the next step must find), and the copy must hold the values
the step left.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

from torch import Tensor, nn

from ._background import StateCopier

__all__ = ["ThetaCopy"]


def _copy(pairs: list[tuple[Tensor, Tensor]]) -> None:
    for dst, src in pairs:
        dst.copy_(src)


class ThetaCopy:
    r""":math:`\theta_{s+1}` of the recorded parameters, being copied.

    Parameters
    ----------
    params : dict of str to Parameter
        The recorded parameters, as the step left them.
    buffer : callable
        ``buffer(name, tensor)``: the memory to copy ``tensor`` into (contents undefined; same shape, strides
        and dtype), e.g. a pool buffer or ``torch.empty_like``.
    copier : StateCopier
        The thread that makes the copies of contiguous CPU parameters, after the jobs submitted before.
    """

    def __init__(self, params: dict[str, nn.Parameter], buffer: Callable[[str, Tensor], Tensor],
                 copier: StateCopier):
        pairs: list[tuple[Tensor, Tensor]] = []
        self.tensors: dict[str, Tensor] = {}  # name -> its copy (complete once wait() returned)
        for name, p in params.items():
            t = p.detach()
            if t.device.type == "cpu" and t.is_contiguous():
                self.tensors[name] = dst = buffer(name, t)
                pairs.append((dst, t))
            else:  # another device's tensors are copied on the loop's thread, in its stream
                self.tensors[name] = t.clone()
        self.future: Future | None = copier.run([lambda: _copy(pairs)]) if pairs else None

    def wait(self) -> dict[str, Tensor]:
        """The copies, once complete (a failed copy raises here)."""
        future, self.future = self.future, None
        if future is not None:
            future.result()
        return self.tensors
