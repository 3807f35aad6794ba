"""Feed-forward factories: a multi-layer perceptron and a small convolutional network.

``mlp``
    ``x -> Linear -> act -> ... -> Linear`` on ``(n, in_features)`` inputs.
``cnn``
    Stages ``Conv2d(3x3, padding 1) -> ReLU -> MaxPool2d(2)`` and a linear head, for 8x8
    (digits) or 32x32 (CIFAR-like) images ``(n, C, S, S)``. There is no BatchNorm: batch
    statistics couple the samples of a batch, which breaks per-sample gradients and would show
    up as residual in the path-kernel decomposition.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor, nn

from .initialization import build_seeded, meta_count

__all__ = [
    "MLPConfig",
    "MLP",
    "build_mlp",
    "mlp_example_input",
    "mlp_parameter_count",
    "CNNConfig",
    "SmallCNN",
    "build_cnn",
    "cnn_example_input",
    "cnn_parameter_count",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLPConfig(BaseModel):
    """Configuration of :class:`MLP`.

    Attributes
    ----------
    in_features : int
        Input size ``d_in``; inputs have shape ``(n, d_in)``.
    hidden_sizes : tuple of int
        Width of each hidden layer (may be empty: a linear model).
    out_features : int
        Number of outputs ``O``.
    activation : {"relu", "tanh", "gelu"}
        Nonlinearity after every hidden layer. ``tanh`` and ``gelu`` are smooth, which makes
        the path-kernel quadrature converge fastest.
    bias : bool
        Whether the linear layers have biases.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_features: PositiveInt = 4
    hidden_sizes: tuple[PositiveInt, ...] = Field(default=(16, 16))
    out_features: PositiveInt = 3
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    bias: bool = True


class MLP(nn.Module):
    """Fully connected network mapping ``(n, in_features)`` to ``(n, out_features)``.

    Parameters are named ``net.<i>.weight`` / ``net.<i>.bias`` (``nn.Sequential`` indices,
    activations take the odd indices).
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        sizes = [config.in_features, *config.hidden_sizes, config.out_features]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out, bias=config.bias))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[config.activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, in_features) -> (n, out_features)``."""
        return self.net(x)


def build_mlp(config: MLPConfig, seed: int = 0) -> MLP:
    """Build an :class:`MLP` initialised from a local generator seeded with ``seed``."""
    return build_seeded(lambda: MLP(config), seed)


def mlp_parameter_count(config: MLPConfig) -> int:
    """Elements of an :class:`MLP`'s parameters, counted on the ``meta`` device."""
    return meta_count(lambda: MLP(config))


def mlp_example_input(config: MLPConfig, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Standard-normal inputs ``(n, in_features)`` and class indices ``(n,)`` in ``[0, out_features)``."""
    inputs = torch.randn(n, config.in_features, generator=generator)
    targets = torch.randint(0, config.out_features, (n,), generator=generator)
    return inputs, targets


# ------------------------------------------------------------------------------ convolutional
class CNNConfig(BaseModel):
    """Configuration of :class:`SmallCNN`.

    Attributes
    ----------
    in_channels : int
        Channels ``C`` of the input images ``(n, C, S, S)``: 1 for digits, 3 for CIFAR.
    image_size : int
        Side ``S`` of the square input images; must be divisible by ``2**len(channels)``.
    channels : tuple of int
        Output channels of each convolutional stage (at least one stage).
    out_features : int
        Number of classes ``O``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: PositiveInt = 1
    image_size: PositiveInt = 8
    channels: tuple[PositiveInt, ...] = Field(default=(8, 16), min_length=1)
    out_features: PositiveInt = 10

    @model_validator(mode="after")
    def _check_pooling(self) -> CNNConfig:
        factor = 2 ** len(self.channels)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2**len(channels)={factor}; every stage halves "
                f"the image. Use fewer stages or an image_size such as 8 or 32."
            )
        return self


class SmallCNN(nn.Module):
    """Convolutional classifier mapping ``(n, C, S, S)`` images to ``(n, out_features)`` logits."""

    def __init__(self, config: CNNConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for c_out in config.channels:
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.channels)
        self.head = nn.Linear(c_in * side * side, config.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``(n, C, S, S) -> (n, out_features)``."""
        return self.head(self.features(x).flatten(start_dim=1))


def build_cnn(config: CNNConfig, seed: int = 0) -> SmallCNN:
    """Build a :class:`SmallCNN` initialised from a local generator seeded with ``seed``."""
    return build_seeded(lambda: SmallCNN(config), seed)


def cnn_parameter_count(config: CNNConfig) -> int:
    """Elements of a :class:`SmallCNN`'s parameters, counted on the ``meta`` device."""
    return meta_count(lambda: SmallCNN(config))


def cnn_example_input(config: CNNConfig, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Standard-normal images ``(n, C, S, S)`` and class indices ``(n,)``."""
    shape = (n, config.in_channels, config.image_size, config.image_size)
    inputs = torch.randn(shape, generator=generator)
    targets = torch.randint(0, config.out_features, (n,), generator=generator)
    return inputs, targets
