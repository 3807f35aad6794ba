r"""Random draws from torch's generators in a training forward that ``capture_random="auto"`` does not capture.

``capture_random="auto"`` captures the random state of each training forward when a module of the model shows
that it draws (a dropout layer with ``p > 0``, batch norm, a private generator: :mod:`~explaind.trajectory._random`).
A forward may draw with no such module: ``F.dropout`` or ``F.scaled_dot_product_attention(dropout_p > 0)`` called
in ``forward`` (the attention code of many Hugging Face models passes the config's ``attention_dropout`` there, and
``F.dropout`` for residual or embedding dropout), or ``torch.rand``. Those masks are then not replayed: explaind
recomputes the step's gradients without them, and the split of every step over samples is inexact (the gradient
check fails at step 0; with the check off, the residual holds it).

:class:`TorchDrawProbe` is a pair of forward hooks on the root module, attached only while nothing is captured under
``"auto"``: before a training forward with gradients it copies the CPU generator's state (5,056 bytes) and each
initialised CUDA device's, after it compares them. The first forward that moved one warns
(:class:`~explaind.exceptions.ExplaindWarning`) naming the model, the calls that draw so, and the fix,
``capture_random=True``; later forwards are not probed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..exceptions import warn_at_caller
from ._common import ModelHook

__all__ = ["TorchDrawProbe"]


def _states() -> list[torch.Tensor]:
    cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] \
        if torch.cuda.is_initialized() else []
    return [torch.get_rng_state(), *cuda]


class TorchDrawProbe:
    """Warn once at a training forward that draws from torch's global generators while none is captured.

    Parameters
    ----------
    model : nn.Module
        The recorded model.
    active : callable
        ``active()`` says whether the recorder watches this forward (not one of its own checks).
    """

    def __init__(self, model: nn.Module, active: Callable[[], bool]):
        self.model = model
        self.active = active
        self.warned = False
        self._before: list[torch.Tensor] | None = None
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Register the two hooks (not again once it has warned)."""
        if not self._handles and not self.warned:
            self._handles = [self.model.register_forward_pre_hook(ModelHook(self._pre)),
                             self.model.register_forward_hook(ModelHook(self._post))]

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: Any) -> None:
        watched = not self.warned and module.training and torch.is_grad_enabled() and self.active()
        self._before = _states() if watched else None

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        after = _states()
        if len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after)):
            return
        self.warned = True
        self.detach()
        warn_at_caller(
            f"A training forward of the recorded model ({type(module).__name__}) drew random numbers from torch's "
            f"generator, but none of its modules is a dropout layer with p > 0, batch norm or a held "
            f"torch.Generator, so capture_random='auto' captures no random state: the draws are made in forward "
            f"itself (F.dropout, F.scaled_dot_product_attention(dropout_p > 0) as Hugging Face attention passes the "
            f"config's attention dropout, torch.rand, torch.bernoulli), and without their states explaind "
            f"recomputes the gradients without those masks, so the split of each step over samples is inexact (the "
            f"gradient check fails at step 0; with it off, the residual holds the difference). Fix: "
            f"TrajectoryRecorder(..., capture_random=True), which replays every training forward with its recorded "
            f"state; or set those dropout probabilities to 0.")
