"""A third-party explaind plugin: one loss (``huber``) and one architecture (``linear``).

explaind discovers this module through the ``[project.entry-points.explaind]`` table of
``pyproject.toml`` and calls the two ``@explaind.hookimpl`` functions below. Only the public API
of explaind is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, PositiveInt
from torch import Tensor, nn

import explaind
from explaind.records import ArchitectureRecord, LossRecord

__version__ = "0.3.0"
__all__ = ["explaind_losses", "explaind_architectures", "huber", "LinearConfig", "build_linear"]


# ------------------------------------------------------------------------------------------ loss
def huber(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample Huber loss (delta = 1), averaged over each sample's outputs: shape ``(n,)``.

    Only shape-static tensor operations, so it runs under ``torch.func.vmap``/``grad``.
    """
    diff = (outputs - targets).abs()
    elementwise = torch.where(diff < 1.0, 0.5 * diff**2, diff - 0.5)
    return elementwise.reshape(outputs.shape[0], -1).mean(dim=1)


def huber_reference(outputs: Tensor, targets: Tensor) -> Tensor:
    """The batch loss torch trains with; the mean of :func:`huber` must equal it."""
    return F.huber_loss(outputs, targets, reduction="mean", delta=1.0)


def regression_example(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Outputs and targets ``(n, 2)`` with differences on both sides of delta."""
    return 2 * torch.randn(n, 2, generator=generator), torch.randn(n, 2, generator=generator)


# ---------------------------------------------------------------------------------- architecture
class LinearConfig(BaseModel):
    """Every field has a default (the conformance suite builds ``LinearConfig()``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_features: PositiveInt = 3
    out_features: PositiveInt = 2


def build_linear(config: LinearConfig, seed: int = 0) -> nn.Module:
    """A linear model ``(n, in) -> (n, out)`` drawn from a local generator (the global RNG is untouched)."""
    model = nn.Linear(config.in_features, config.out_features, device="meta").to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(config.in_features)
    with torch.no_grad():
        for param in (model.weight, model.bias):
            param.copy_((2 * torch.rand(param.shape, generator=generator) - 1) * bound)
    return model


def linear_parameter_count(config: LinearConfig) -> int:
    """Elements of the weight ``(out, in)`` and the bias ``(out,)``: known without building the model."""
    return config.out_features * config.in_features + config.out_features


def linear_example_input(config: LinearConfig, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs ``(n, in)`` and regression targets ``(n, out)``."""
    inputs = torch.randn(n, config.in_features, generator=generator)
    return inputs, torch.randn(n, config.out_features, generator=generator)


# ----------------------------------------------------------------------------------------- hooks
@explaind.hookimpl
def explaind_losses() -> list[LossRecord]:
    return [
        LossRecord(
            name="huber",
            implementation=huber,
            description="Huber loss (delta = 1) averaged over the outputs of each sample.",
            example=regression_example,
            reference=huber_reference,
        )
    ]


@explaind.hookimpl
def explaind_architectures() -> list[ArchitectureRecord]:
    return [
        ArchitectureRecord(
            name="linear",
            implementation=build_linear,
            config=LinearConfig,
            description="A single linear layer, trained with the Huber loss.",
            example_input=linear_example_input,
            loss="huber",
            parameter_count=linear_parameter_count,
        )
    ]
