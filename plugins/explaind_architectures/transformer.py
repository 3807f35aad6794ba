r"""The one-layer transformer of the modular-arithmetic (grokking) experiments.

Input format
------------
A batch of token sequences ``(n, 4)`` (int64) reading ``a + b =``: tokens ``0 .. p-1`` are the
numbers, token ``p`` is ``'+'`` and token ``p + 1`` is ``'='``. The model returns the logits of
the last position (``'='``) over the ``p`` possible results, shape ``(n, p)``; the target of
``a + b =`` is ``(a + b) mod p``. :func:`modular_arithmetic_dataset` builds all ``p**2`` pairs.

Architecture
------------
With ``x`` the residual stream ``(n, 4, d)``:

.. math::

    x &= W_E[\text{tokens}] + W_{pos} \\
    x &= x + \mathrm{Attn}(x) \qquad \text{(causal, } H \text{ heads of size } d/H\text{, no biases)} \\
    x &= x + W_{out}\,\mathrm{ReLU}(W_{in} x + b_{in}) + b_{out} \\
    \text{logits} &= W_U x_{[:, -1]}

The attention is written with plain tensor operations (no ``nn.MultiheadAttention``), so the
model works under ``torch.func.functional_call``, ``vmap``, ``grad`` and ``jvp``. LayerNorm is
off by default (``layer_norm=True`` adds pre-norms before attention, MLP and unembedding).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor, nn

from .initialization import build_seeded, meta_count, normal_

__all__ = [
    "ModularTransformerConfig",
    "ModularTransformer",
    "build_modular_transformer",
    "modular_example_input",
    "modular_transformer_parameter_count",
    "modular_arithmetic_dataset",
    "SEQUENCE_LENGTH",
]

#: Tokens per example: ``a``, ``'+'``, ``b``, ``'='``.
SEQUENCE_LENGTH = 4


class ModularTransformerConfig(BaseModel):
    """Configuration of :class:`ModularTransformer`.

    Attributes
    ----------
    p : int
        The modulus (prime in the grokking experiments); ``p + 2`` tokens, ``p`` classes.
    d_model : int
        Width ``d`` of the residual stream.
    n_heads : int
        Attention heads ``H``; must divide ``d_model``.
    d_mlp : int
        Hidden width of the MLP.
    layer_norm : bool
        Add pre-LayerNorms (off by default, as in the grokking experiments).
    activation : {"relu", "gelu"}
        Nonlinearity of the MLP block: ``"relu"`` (default, as in the grokking experiments) or the
        smooth ``"gelu"`` (exact erf form), for which the path integrand has no kinks.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    p: int = Field(default=113, ge=2)
    d_model: PositiveInt = 128
    n_heads: PositiveInt = 4
    d_mlp: PositiveInt = 512
    layer_norm: bool = False
    activation: Literal["relu", "gelu"] = "relu"

    @model_validator(mode="after")
    def _check_heads(self) -> ModularTransformerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; choose d_model as a multiple "
                f"of n_heads (e.g. d_model=128, n_heads=4)."
            )
        return self


class ModularTransformer(nn.Module):
    """One attention layer and one MLP on a residual stream; logits ``(n, p)`` at the last position."""

    def __init__(self, config: ModularTransformerConfig):
        super().__init__()
        d, p = config.d_model, config.p
        self.n_heads = config.n_heads
        self.embed = nn.Embedding(p + 2, d)
        self.pos_embed = nn.Embedding(SEQUENCE_LENGTH, d)
        self.W_Q = nn.Linear(d, d, bias=False)
        self.W_K = nn.Linear(d, d, bias=False)
        self.W_V = nn.Linear(d, d, bias=False)
        self.W_O = nn.Linear(d, d, bias=False)
        self.mlp_in = nn.Linear(d, config.d_mlp)
        self.mlp_out = nn.Linear(config.d_mlp, d)
        self.unembed = nn.Linear(d, p, bias=False)
        norm = (lambda: nn.LayerNorm(d)) if config.layer_norm else nn.Identity
        self.ln_attn, self.ln_mlp, self.ln_final = norm(), norm(), norm()
        self.activation = torch.relu if config.activation == "relu" else F.gelu

    def _split_heads(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        return x.reshape(n, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (n, H, t, d/H)

    def attention(self, x: Tensor) -> Tensor:
        """Causal multi-head self-attention ``(n, t, d) -> (n, t, d)``."""
        n, t, d = x.shape
        q, k, v = self._split_heads(self.W_Q(x)), self._split_heads(self.W_K(x)), self._split_heads(self.W_V(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.n_heads)  # (n, H, t, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        z = torch.softmax(scores, dim=-1) @ v  # (n, H, t, d/H)
        return self.W_O(z.transpose(1, 2).reshape(n, t, d))

    def forward(self, tokens: Tensor) -> Tensor:
        """``(n, 4)`` int64 tokens ``[a, p, b, p + 1]`` -> logits ``(n, p)`` of ``(a + b) mod p``."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed(tokens) + self.pos_embed(positions)
        x = x + self.attention(self.ln_attn(x))
        x = x + self.mlp_out(self.activation(self.mlp_in(self.ln_mlp(x))))
        return self.unembed(self.ln_final(x[:, -1]))


def _init_positions(module: nn.Module, generator: torch.Generator) -> None:
    normal_(module.pos_embed.weight, 1.0 / math.sqrt(module.pos_embed.weight.shape[1]), generator)


def build_modular_transformer(config: ModularTransformerConfig, seed: int = 0) -> ModularTransformer:
    """Build a :class:`ModularTransformer` initialised from a local generator seeded with ``seed``."""
    return build_seeded(lambda: ModularTransformer(config), seed, extra_init=_init_positions)


def modular_transformer_parameter_count(config: ModularTransformerConfig) -> int:
    """Elements of a :class:`ModularTransformer`'s parameters, counted on the ``meta`` device."""
    return meta_count(lambda: ModularTransformer(config))


def _encode(a: Tensor, b: Tensor, p: int) -> tuple[Tensor, Tensor]:
    plus = torch.full_like(a, p)
    equals = torch.full_like(a, p + 1)
    return torch.stack([a, plus, b, equals], dim=1), (a + b) % p


def modular_arithmetic_dataset(p: int) -> tuple[Tensor, Tensor]:
    """Every example ``a + b = (a + b) mod p`` for ``0 <= a, b < p``.

    Returns
    -------
    inputs : Tensor of int64, shape (p**2, 4)
        Rows ``[a, p, b, p + 1]`` ordered by ``a`` then ``b``.
    targets : Tensor of int64, shape (p**2,)
    """
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    return _encode(a, b, p)


def modular_example_input(
    config: ModularTransformerConfig, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` random pairs ``(a, b)`` encoded as ``[a, p, b, p + 1]`` with targets ``(a + b) mod p``."""
    a = torch.randint(0, config.p, (n,), generator=generator)
    b = torch.randint(0, config.p, (n,), generator=generator)
    return _encode(a, b, config.p)
