r"""GraSP: gradient signal preservation (Wang et al., 2020).

With :math:`L_T` the mean loss of the logits divided by a temperature :math:`T`,
:math:`g = \nabla_\theta L_T` and :math:`H = \nabla^2_\theta L_T`, GraSP removes the
coordinates whose removal reduces the gradient norm :math:`g^\top g` the least, i.e. those
with the largest :math:`-\theta_p (Hg)_p`. In explaind's convention (higher = kept) the score is

.. math::

    S_p = \theta_p \, (H g)_p ,

a *signed* score: coordinates are ranked by value, not by magnitude. :math:`Hg` is the
gradient of :math:`g_{\text{detached}}^\top \nabla_\theta L_T` (one Hessian-vector product,
double backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import PositiveFloat
from torch import Tensor, nn

from explaind.pruning import PruningStrategy, as_batch, copy_model, resolve_loss

from ._common import LossConfig, chunks, mean_loss_gradient, trainable

__all__ = ["GraspConfig", "GraspPruning"]


class GraspConfig(LossConfig):
    """Options of :class:`GraspPruning`.

    Attributes
    ----------
    temperature : float
        Logits are divided by it before the loss (200 in the GraSP paper, to keep gradients
        from vanishing on confident predictions).
    """

    temperature: PositiveFloat = 200.0


class GraspPruning(PruningStrategy):
    r"""Gradient-flow preservation scores :math:`\theta \odot Hg` on the scoring batch ``data=(X, y)``.

    Parameters
    ----------
    temperature : float
        Logit temperature :math:`T` (default 200 as in the paper).
    loss : str or callable
        Registered loss name or ``(outputs, targets) -> mean loss``.
    batch_size : int or None
        Samples per forward pass; the scores do not depend on it.
    sparsity, scope, exclude, granularity, prune_biases, random_state
        See :class:`explaind.pruning.PruningConfig`.
    """

    _config_model = GraspConfig
    needs_data = True
    needs_targets = True

    def __init__(self, *, temperature: float = 200.0, loss: str | Callable[..., Any] = "cross_entropy",
                 batch_size: int | None = None, sparsity: float = 0.9, scope: str = "global",
                 exclude: Iterable[str] = (), granularity: str = "unstructured", prune_biases: bool = False,
                 random_state: int | None = None):
        self.temperature = temperature
        self.loss = loss
        self.batch_size = batch_size
        self.sparsity = sparsity
        self.scope = scope
        self.exclude = exclude
        self.granularity = granularity
        self.prune_biases = prune_biases
        self.random_state = random_state

    def _score(self, cfg: GraspConfig, model: nn.Module, data: Any, trajectory: Any) -> dict[str, Tensor]:
        work = copy_model(model)
        params = trainable(work)
        first = next(iter(params.values()))
        X, y = as_batch(data, needs_targets=True, owner="GraspPruning.fit", device=first.device, dtype=first.dtype)
        loss_fn = resolve_loss(cfg.loss, "GraspPruning")
        g = mean_loss_gradient(work, X, y, loss_fn, cfg.batch_size, temperature=cfg.temperature)
        hg = {k: torch.zeros_like(p) for k, p in params.items()}
        n = X.shape[0]
        for sl in chunks(n, cfg.batch_size):
            loss = loss_fn(work(X[sl]) / cfg.temperature, y[sl]) * ((sl.stop - sl.start) / n)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
            dot = sum((gr * g[k]).sum() for (k, _), gr in zip(params.items(), grads) if gr is not None)
            if not isinstance(dot, Tensor) or not dot.requires_grad:
                continue  # a chunk with a loss that is linear in every parameter has H = 0
            second = torch.autograd.grad(dot, list(params.values()), allow_unused=True)
            for (k, _), h in zip(params.items(), second):
                if h is not None:
                    hg[k] += h
        return {k: p.detach() * hg[k] for k, p in params.items()}
