"""First-party explaind plugin: model factories (uses only the public API of explaind).

Registers three architectures, each built deterministically from a seed with a local
``torch.Generator`` (the global RNG is neither used nor advanced):

``mlp``
    Fully connected network on ``(n, in_features)`` inputs.
``cnn``
    Small convolutional network on ``(n, C, S, S)`` images (8x8 digits, 32x32 CIFAR).
``modular_transformer``
    One-layer transformer on ``(n, 4)`` token sequences ``[a, p, b, p + 1]`` returning the
    logits ``(n, p)`` of ``(a + b) mod p`` (see :mod:`explaind_architectures.transformer`).

Build one with ``explaind.build_model(name, config, seed=...)``.
"""

from __future__ import annotations

import explaind
from explaind.records import ArchitectureRecord

from .feedforward import (
    MLP,
    CNNConfig,
    MLPConfig,
    SmallCNN,
    build_cnn,
    build_mlp,
    cnn_example_input,
    cnn_parameter_count,
    mlp_example_input,
    mlp_parameter_count,
)
from .transformer import (
    ModularTransformer,
    ModularTransformerConfig,
    build_modular_transformer,
    modular_arithmetic_dataset,
    modular_example_input,
    modular_transformer_parameter_count,
)

__all__ = [
    "explaind_architectures",
    "MLP",
    "MLPConfig",
    "SmallCNN",
    "CNNConfig",
    "ModularTransformer",
    "ModularTransformerConfig",
    "modular_arithmetic_dataset",
]


@explaind.hookimpl
def explaind_architectures() -> list[ArchitectureRecord]:
    """Register the built-in architectures."""
    return [
        ArchitectureRecord(
            name="mlp",
            implementation=build_mlp,
            config=MLPConfig,
            description="Fully connected network with relu, tanh or gelu activations.",
            example_input=mlp_example_input,
            loss="cross_entropy",
            parameter_count=mlp_parameter_count,
        ),
        ArchitectureRecord(
            name="cnn",
            implementation=build_cnn,
            config=CNNConfig,
            description="Small convolutional network (conv, ReLU, max-pool stages and a linear head) for 8x8 "
            "or 32x32 images.",
            example_input=cnn_example_input,
            loss="cross_entropy",
            parameter_count=cnn_parameter_count,
        ),
        ArchitectureRecord(
            name="modular_transformer",
            implementation=build_modular_transformer,
            config=ModularTransformerConfig,
            description="One-layer transformer for modular addition: tokens [a, '+', b, '='] to logits of "
            "(a + b) mod p.",
            example_input=modular_example_input,
            loss="cross_entropy",
            parameter_count=modular_transformer_parameter_count,
        ),
    ]
