"""Helpers shared by the first-party pruning strategies (public explaind API only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from explaind.pruning import PruningConfig

__all__ = ["LossConfig", "trainable", "chunks", "mean_loss_gradient"]


class LossConfig(PruningConfig):
    """Options of strategies that differentiate a loss on a scoring batch.

    Attributes
    ----------
    loss : str or callable
        A registered loss name (``"cross_entropy"``, ``"nll"``, ``"mse"``) or a callable
        ``(outputs, targets) -> mean loss``.
    batch_size : int or None
        Samples per forward pass (memory); the result equals one pass over the whole batch.
    """

    loss: str | Callable[..., Any] = "cross_entropy"
    batch_size: PositiveInt | None = None


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """Name -> trainable parameter, in ``named_parameters()`` order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def chunks(n: int, batch_size: int | None) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``batch_size`` elements."""
    size = n if batch_size is None else batch_size
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def mean_loss_gradient(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch_size: int | None,
    *,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    r"""Gradient of the mean loss over ``(X, y)``, accumulated over chunks.

    :math:`\nabla_\theta L = \sum_c \frac{|c|}{n} \nabla_\theta L_c` with :math:`L_c` the mean
    loss of chunk :math:`c`, which equals the gradient of the mean loss over the whole batch.
    Outputs are divided by ``temperature`` before the loss (GraSP's softened logits).
    """
    params = trainable(model)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    n = X.shape[0]
    for sl in chunks(n, batch_size):
        loss = loss_fn(model(X[sl]) / temperature, y[sl]) * ((sl.stop - sl.start) / n)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, _), g in zip(params.items(), grads):
            if g is not None:
                total[k] += g
    return total
