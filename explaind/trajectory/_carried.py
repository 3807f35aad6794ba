r"""Gradients carried over from the previous step: ``optimizer.zero_grad()`` left out before a step's ``backward()``.

A loop that forgets ``optimizer.zero_grad()`` for one step accumulates that step's gradient onto the previous
step's, so the optimizer steps with :math:`g_s(\theta_s) + g_{s-1}(\theta_{s-1})`: no gradient of the logged batch
at :math:`\theta_s`. Unless the gradient check runs at that step (``check_gradients="auto"`` checks only some), the
run is recorded and the difference is left in the residual, which the estimators warn about without naming it.

:class:`CarriedGradients` sees it without touching values. After each step it keeps, per parameter, a weak
reference to ``p.grad`` and the gradient's version counter; at the step's first ``backward`` that reaches the
parameter it compares: the same tensor whose counter moved exactly once (by the accumulation itself) was neither
set to ``None`` (``zero_grad()``'s default makes a new tensor) nor zeroed in place (``zero_grad(set_to_none=False)``
moves the counter once more). The recorder then checks that step's gradient (the check names the habit when it
fails), or warns when no check can run. A gradient zeroed through ``p.grad.data.zero_()``, which the counter does
not see, only costs that step a check that passes.
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn

__all__ = ["CarriedGradients", "carried_message"]


class CarriedGradients:
    """The parameters whose gradient at the step's first ``backward`` was the previous step's, accumulated into."""

    def __init__(self) -> None:
        self._left: dict[str, tuple[weakref.ref, int]] = {}
        self.names: list[str] = []

    def after_step(self, params: dict[str, nn.Parameter]) -> None:
        """Remember each gradient the finished step leaves (a weak reference and its version counter)."""
        self._left = {n: (weakref.ref(p.grad), p.grad._version) for n, p in params.items() if p.grad is not None}
        self.names = []

    def first_backward(self, name: str, grad: Tensor) -> None:
        """At the step's first ``backward`` reaching ``name``: note it if ``grad`` is the left gradient, moved once."""
        left = self._left.get(name)
        if left is not None and left[0]() is grad and grad._version == left[1] + 1:
            self.names.append(name)


def carried_message(s: int, names: list[str], checked: bool) -> str:
    """Names the parameters whose step-``s`` gradient was accumulated onto the previous step's.

    Parameters
    ----------
    s : int
        The step.
    names : list of str
        The parameters (at most five are shown).
    checked : bool
        ``True``: the sentence that leads a failed gradient check's hint; ``False``: a warning that no check runs.

    Returns
    -------
    str
    """
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    head = f" At step {s} the gradient" if checked else f"Step {s}: the gradient"
    tail = "" if checked else ("; no gradient check can run here (check_gradients off or no train_data), so the "
                               "carried gradient is left in the residual")
    return (f"{head} of {shown} was accumulated onto the one step {s - 1} left: p.grad was neither set to None nor "
            f"zeroed between step {s - 1}'s optimizer.step() and this step's backward() (optimizer.zero_grad() left "
            f"out), so the optimizer stepped with this batch's gradient plus the previous one's, which is no "
            f"gradient of the logged batch at the step's parameters{tail}. Fix: call optimizer.zero_grad() before "
            f"every step's backward(); to accumulate several batches into one step on purpose, log each as a "
            f"micro-batch of that step (rec.log_batch per micro-batch, one optimizer.step()), recorded exactly.")
