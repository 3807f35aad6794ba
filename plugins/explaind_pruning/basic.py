r"""Data-free baselines: random pruning (seeded) and magnitude pruning.

* ``random``: :math:`S_p \sim U(0, 1)` drawn from a generator seeded with ``random_state``, so
  with a global threshold every set of :math:`k` prunable coordinates is equally likely.
* ``magnitude``: :math:`S_p = |\theta_p|` (the criterion the ExPLAIND paper compared against).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from explaind.pruning import PruningConfig, PruningStrategy

from ._common import trainable

__all__ = ["RandomConfig", "RandomPruning", "MagnitudeConfig", "MagnitudePruning"]


class RandomConfig(PruningConfig):
    """Options of :class:`RandomPruning` (the shared options only)."""


class MagnitudeConfig(PruningConfig):
    """Options of :class:`MagnitudePruning` (the shared options only)."""


class RandomPruning(PruningStrategy):
    """Uniformly random scores; the chance baseline.

    Parameters
    ----------
    sparsity, scope, exclude, granularity, prune_biases, random_state
        See :class:`explaind.pruning.PruningConfig`. With ``random_state=None`` every fit draws
        fresh scores.
    """

    _config_model = RandomConfig

    def __init__(self, *, sparsity: float = 0.9, scope: str = "global", exclude: Iterable[str] = (),
                 granularity: str = "unstructured", prune_biases: bool = False, random_state: int | None = None):
        self.sparsity = sparsity
        self.scope = scope
        self.exclude = exclude
        self.granularity = granularity
        self.prune_biases = prune_biases
        self.random_state = random_state

    def _score(self, cfg: RandomConfig, model: nn.Module, data: object, trajectory: object) -> dict[str, Tensor]:
        gen = torch.Generator()
        if cfg.random_state is None:
            gen.seed()
        else:
            gen.manual_seed(cfg.random_state)
        return {k: torch.rand(p.shape, generator=gen, dtype=torch.float64) for k, p in trainable(model).items()}


class MagnitudePruning(PruningStrategy):
    r"""Scores :math:`S_p = |\theta_p|`: small weights are removed first.

    Parameters
    ----------
    sparsity, scope, exclude, granularity, prune_biases, random_state
        See :class:`explaind.pruning.PruningConfig` (``random_state`` is unused).
    """

    _config_model = MagnitudeConfig

    def __init__(self, *, sparsity: float = 0.9, scope: str = "global", exclude: Iterable[str] = (),
                 granularity: str = "unstructured", prune_biases: bool = False, random_state: int | None = None):
        self.sparsity = sparsity
        self.scope = scope
        self.exclude = exclude
        self.granularity = granularity
        self.prune_biases = prune_biases
        self.random_state = random_state

    def _score(self, cfg: MagnitudeConfig, model: nn.Module, data: object, trajectory: object) -> dict[str, Tensor]:
        return {k: p.detach().abs().to(torch.float64).cpu() for k, p in trainable(model).items()}
