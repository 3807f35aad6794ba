"""Seeded, global-RNG-free construction of modules.

torch's layers initialise their weights from the global random generator when constructed.
The factories of this plugin instead build the module on the ``meta`` device (no memory, no
random draws), allocate it on the CPU and then fill every parameter from a local
``torch.Generator`` seeded by the caller. The result depends on the seed only, never on the
global RNG state, and building a model leaves the global state untouched.

Draws are made in float64 and copied into the parameter, so a float32 and a float64 build from
the same seed agree up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["build_seeded", "meta_count", "uniform_", "normal_", "default_init"]


def uniform_(tensor: Tensor, bound: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` with draws from ``U(-bound, bound)``."""
    draw = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        tensor.copy_((2.0 * draw - 1.0) * bound)


def normal_(tensor: Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` with draws from ``N(0, std^2)``."""
    draw = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        tensor.copy_(draw * std)


def default_init(module: nn.Module, generator: torch.Generator) -> bool:
    """Initialise the parameters a standard layer owns directly, as torch's defaults would.

    ``Linear`` and ``Conv2d``: weight and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``;
    ``LayerNorm``: weight 1, bias 0; ``Embedding``: ``N(0, 1/d)`` with ``d`` the embedding size.

    Returns
    -------
    bool
        ``True`` when ``module`` is one of these layers.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        fan_in = module.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        uniform_(module.weight, bound, generator)
        if module.bias is not None:
            uniform_(module.bias, bound, generator)
        return True
    if isinstance(module, nn.LayerNorm):
        with torch.no_grad():
            if module.weight is not None:
                module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
        return True
    if isinstance(module, nn.Embedding):
        normal_(module.weight, 1.0 / math.sqrt(module.embedding_dim), generator)
        return True
    return False


def meta_count(factory: Callable[[], nn.Module]) -> int:
    """Elements of the parameters and buffers of ``factory()``, built on the ``meta`` device (nothing allocated).

    The ``parameter_count`` of the architecture records: ``explaind.build_model`` compares it with
    its size limit before building.
    """
    with torch.device("meta"):
        module = factory()
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


def build_seeded(
    factory: Callable[[], nn.Module],
    seed: int,
    extra_init: Callable[[nn.Module, torch.Generator], None] | None = None,
) -> nn.Module:
    """Construct ``factory()`` and initialise it from ``torch.Generator().manual_seed(seed)``.

    Parameters
    ----------
    factory : callable
        Returns the module; called under ``torch.device("meta")``.
    seed : int
        Seed of the local generator.
    extra_init : callable, optional
        ``extra_init(module, generator)`` fills parameters that are not owned by a standard
        layer (e.g. a positional embedding stored as a bare ``nn.Parameter``). Called after the
        standard layers, in a fixed order.

    Returns
    -------
    nn.Module
        On the CPU, float32, in training mode.
    """
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    for sub in module.modules():
        default_init(sub, generator)
    if extra_init is not None:
        extra_init(module, generator)
    for name, buf in module.named_buffers():  # the factories register no buffers; guard against garbage
        raise RuntimeError(f"build_seeded cannot initialise buffer {name!r} of shape {tuple(buf.shape)}")
    return module
