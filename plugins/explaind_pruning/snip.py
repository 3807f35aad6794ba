r"""SNIP: connection sensitivity on a scoring batch (Lee et al., 2019).

.. math::

    S_p = \left| \theta_p \, \frac{\partial L}{\partial \theta_p} \right|,
    \qquad L = \frac{1}{n} \sum_{k=1}^{n} \ell(f(x_k; \theta), y_k),

the first-order change of the loss when coordinate :math:`p` is removed (the derivative of
:math:`L` with respect to a multiplicative mask at 1). The model is scored in eval mode on a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from explaind.pruning import PruningStrategy, as_batch, copy_model, resolve_loss

from ._common import LossConfig, mean_loss_gradient, trainable

__all__ = ["SnipConfig", "SnipPruning"]


class SnipConfig(LossConfig):
    """Options of :class:`SnipPruning` (shared options, ``loss`` and ``batch_size``)."""


class SnipPruning(PruningStrategy):
    r"""Connection sensitivity :math:`|\theta \odot \nabla_\theta L|` on the scoring batch ``data=(X, y)``.

    Parameters
    ----------
    loss : str or callable
        Registered loss name or ``(outputs, targets) -> mean loss``.
    batch_size : int or None
        Samples per forward pass; the scores do not depend on it.
    sparsity, scope, exclude, granularity, prune_biases, random_state
        See :class:`explaind.pruning.PruningConfig`.
    """

    _config_model = SnipConfig
    needs_data = True
    needs_targets = True

    def __init__(self, *, loss: str | Callable[..., Any] = "cross_entropy", batch_size: int | None = None,
                 sparsity: float = 0.9, scope: str = "global", exclude: Iterable[str] = (),
                 granularity: str = "unstructured", prune_biases: bool = False, random_state: int | None = None):
        self.loss = loss
        self.batch_size = batch_size
        self.sparsity = sparsity
        self.scope = scope
        self.exclude = exclude
        self.granularity = granularity
        self.prune_biases = prune_biases
        self.random_state = random_state

    def _score(self, cfg: SnipConfig, model: nn.Module, data: Any, trajectory: Any) -> dict[str, Tensor]:
        work = copy_model(model)
        first = next(iter(trainable(work).values()))
        X, y = as_batch(data, needs_targets=True, owner="SnipPruning.fit", device=first.device, dtype=first.dtype)
        grads = mean_loss_gradient(work, X, y, resolve_loss(cfg.loss, "SnipPruning"), cfg.batch_size)
        return {k: (p.detach() * grads[k]).abs() for k, p in trainable(work).items()}
