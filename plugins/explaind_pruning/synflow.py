r"""SynFlow: iterative synaptic flow pruning without data (Tanaka et al., 2020).

The network is linearised: every parameter and floating buffer is replaced by its absolute
value and the input by a single all-ones example :math:`\mathbb{1}`. With the current masks
:math:`m`, the synaptic flow is :math:`R = \mathbb{1}^\top f(\mathbb{1}; |\theta| \odot m)`
and the score of a coordinate is its synaptic saliency

.. math::

    S_p = \left| \frac{\partial R}{\partial \theta_p} \, \theta_p \right|
    \quad (\theta = |\theta| \odot m).

For ReLU networks the saliency is *conserved*: the scores entering a hidden neuron (weights and
bias) sum to the scores leaving it, so no layer can be scored away as a whole in one round.
Pruning is iterative: over ``n_iterations`` rounds the sparsity follows the exponential schedule
:math:`\rho_j = 1 - (1 - \rho)^{j / J}`, re-scoring after each round. Because the result depends
on the target sparsity, :meth:`SynflowPruning.masks` re-runs the schedule for each sparsity;
``scores_`` holds the saliencies of the last round at the configured sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import PositiveInt
from torch import Tensor, nn
from torch.func import functional_call

from explaind.exceptions import ConfigError
from explaind.pruning import PruningConfig, PruningStrategy, copy_model, scores_to_masks

from ._common import trainable

__all__ = ["SynflowConfig", "SynflowPruning"]


class SynflowConfig(PruningConfig):
    """Options of :class:`SynflowPruning`.

    Attributes
    ----------
    n_iterations : int
        Rounds of scoring and pruning (100 in the paper).
    input_shape : tuple of int or None
        Shape of one input (without the batch dimension). Default: taken from ``data`` when
        given, else ``(in_features,)`` of a leading ``nn.Linear``.
    """

    n_iterations: PositiveInt = 100
    input_shape: tuple[PositiveInt, ...] | None = None


class SynflowPruning(PruningStrategy):
    r"""Iterative, data-free synaptic-flow scores :math:`|\theta \odot \partial R / \partial \theta|`.

    Parameters
    ----------
    n_iterations : int
        Number of prune-and-rescore rounds.
    input_shape : tuple of int, optional
        Shape of one input; needed for models not starting with ``nn.Linear`` when no data is given.
    sparsity, scope, exclude, granularity, prune_biases, random_state
        See :class:`explaind.pruning.PruningConfig` (``random_state`` is unused: SynFlow is
        deterministic).
    """

    _config_model = SynflowConfig
    needs_data = False

    def __init__(self, *, n_iterations: int = 100, input_shape: tuple[int, ...] | None = None,
                 sparsity: float = 0.9, scope: str = "global", exclude: Iterable[str] = (),
                 granularity: str = "unstructured", prune_biases: bool = False, random_state: int | None = None):
        self.n_iterations = n_iterations
        self.input_shape = input_shape
        self.sparsity = sparsity
        self.scope = scope
        self.exclude = exclude
        self.granularity = granularity
        self.prune_biases = prune_biases
        self.random_state = random_state

    # ------------------------------------------------------------------ scoring
    def _score(self, cfg: SynflowConfig, model: nn.Module, data: Any, trajectory: Any) -> dict[str, Tensor]:
        linear = copy_model(model, torch.float64)
        with torch.no_grad():
            for tensor in list(linear.parameters()) + list(linear.buffers()):
                if tensor.is_floating_point():
                    tensor.abs_()
        self._flow_model = linear
        self._flow_input = torch.ones((1, *self._input_shape(cfg, model, data)), dtype=torch.float64,
                                      device=next(iter(trainable(linear).values())).device)
        self._flow_config = cfg
        masks, scores = self._iterate(cfg.sparsity)
        self._mask_cache = {float(cfg.sparsity): masks}
        return scores

    def _masks_at(self, sparsity: float) -> dict[str, Tensor]:
        key = float(sparsity)
        if key not in self._mask_cache:
            self._mask_cache[key] = self._iterate(key)[0]
        return {k: v.clone() for k, v in self._mask_cache[key].items()}

    def saliency(self, masks: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        r"""Synaptic saliencies :math:`|\partial R/\partial\theta \odot \theta|` under ``masks`` (float64, CPU).

        Parameters
        ----------
        masks : dict of str to Tensor, optional
            Boolean masks of the linearised parameters (default: nothing removed).
        """
        if not hasattr(self, "_flow_model"):
            self._check_fitted()
        base = trainable(self._flow_model)
        params = {}
        for name, p in base.items():
            value = p.detach()
            if masks is not None and name in masks:
                value = value * masks[name].to(device=value.device, dtype=value.dtype)
            params[name] = value.clone().requires_grad_(True)
        flow = functional_call(self._flow_model, params, (self._flow_input,)).sum()
        grads = torch.autograd.grad(flow, list(params.values()), allow_unused=True)
        out = {}
        for (name, value), g in zip(params.items(), grads):
            s = torch.zeros_like(value) if g is None else (g * value).abs()
            out[name] = s.detach().cpu()
        return out

    def _iterate(self, sparsity: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cfg = self._flow_config
        names = list(trainable(self._flow_model))
        masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in trainable(self._flow_model).items()}
        scores = self.saliency(masks)
        for j in range(1, cfg.n_iterations + 1):
            if j > 1:
                scores = self.saliency(masks)
            target = 1.0 - (1.0 - sparsity) ** (j / cfg.n_iterations)
            # removed coordinates stay removed: they rank below every kept one
            ranked = {n: torch.where(masks[n], scores[n], torch.tensor(-math.inf, dtype=scores[n].dtype))
                      for n in names}
            masks = scores_to_masks(ranked, target, scope=cfg.scope, exclude=cfg.exclude,
                                    granularity=cfg.granularity, prune_biases=cfg.prune_biases)
        return masks, scores

    @staticmethod
    def _input_shape(cfg: SynflowConfig, model: nn.Module, data: Any) -> tuple[int, ...]:
        if cfg.input_shape is not None:
            return tuple(cfg.input_shape)
        if data is not None:
            X = data[0] if isinstance(data, (tuple, list)) else data
            return tuple(X.shape[1:])
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                if isinstance(module, nn.Linear):
                    return (module.in_features,)
                break
        raise ConfigError(
            "SynflowPruning cannot infer the input shape of this model (it does not start with nn.Linear). "
            "Pass input_shape=(C, H, W) (one example, without the batch dimension) or data=X."
        )
