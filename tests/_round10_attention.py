"""Attention models of the tenth round (tests/_round10_cases.py): rotary embeddings as complex numbers, scaled
dot-product attention with every option, set pooling, Perceiver cross attention, ``nn.MultiheadAttention`` and
``nn.Transformer`` with all their masks. Inputs as in tests/_round10_models.py (``XS`` sequences, ``XT`` token ids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RotaryComplex(nn.Module):
    """Token embeddings rotated by position as complex numbers (``torch.view_as_complex`` of ``(..., 2)`` pairs
    times ``torch.polar`` factors, Llama's original rotary code), back by ``torch.view_as_real``, one attention
    layer, mean pooling and a head."""

    def __init__(self, vocab: int = 7, dim: int = 4, length: int = 5, real_buffer: bool = True):
        super().__init__()
        self.emb, self.qk, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, 3)
        angles = torch.outer(torch.arange(length, dtype=torch.float64), 1.0 / 10 ** torch.arange(0, 1, 2 / dim))
        freqs = torch.polar(torch.ones_like(angles), angles)
        self.register_buffer("freqs", torch.view_as_real(freqs) if real_buffer else freqs)

    def rotate(self, t: Tensor) -> Tensor:
        z = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous())
        freqs = self.freqs if self.freqs.is_complex() else torch.view_as_complex(self.freqs)
        return torch.view_as_real(z * freqs).flatten(-2)

    def forward(self, ids):
        h = self.emb(ids)
        q, k = self.rotate(self.qk(h)[..., :4]), self.rotate(self.qk(h)[..., 4:])
        att = torch.softmax(q @ k.transpose(-1, -2) / 2, -1)
        return self.head((att @ h).mean(-2))


class SDPAScaled(nn.Module):
    """``F.scaled_dot_product_attention`` with a boolean mask, ``dropout_p=0.2`` in training and an explicit
    ``scale=0.3`` over ``XS`` sequences."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(3, 12), nn.Linear(4, 3)
        self.register_buffer("mask", torch.ones(6, 6, dtype=torch.bool).tril(1))

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 1, 4)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=0.2 if self.training else 0.0,
                                           scale=0.3)
        return self.head(o.squeeze(1).mean(1))


class SetPooling(nn.Module):
    """A Set Transformer's pooling by multihead attention (a learned seed query over the set's elements, ``XS`` as
    sets of 6 points in 3-D), next to a DeepSets sum, into a head."""

    def __init__(self):
        super().__init__()
        self.phi = nn.Linear(3, 4)
        self.seed = nn.Parameter(torch.randn(1, 1, 4) * 0.5)
        self.pma = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.phi(x))
        pooled, _ = self.pma(self.seed.expand(x.shape[0], -1, -1), h, h, need_weights=False)
        return self.head(torch.cat([pooled.squeeze(1), h.sum(1) / 6], 1))


class Perceiver(nn.Module):
    """Perceiver-style cross attention: two learned latents attend to the inputs through
    ``nn.MultiheadAttention(kdim=3, vdim=3)``, then self-attention over the latents."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(2, 4) * 0.5)
        self.cross = nn.MultiheadAttention(4, 1, kdim=3, vdim=3, batch_first=True)
        self.self_att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        z = self.latents.expand(x.shape[0], -1, -1)
        z = z + self.cross(z, x, x, need_weights=False)[0]
        z = z + self.self_att(z, z, z, need_weights=False)[0]
        return self.head(z.mean(1))


class AllOptionsAttention(nn.Module):
    """``nn.MultiheadAttention(batch_first=True, add_bias_kv=True, add_zero_attn=True, kdim=3, vdim=2)`` with a
    ``key_padding_mask`` from the inputs (a step is padding where its first feature is below -1) and per-head
    weights (``average_attn_weights=False``) read by the head."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(3, 4)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True, kdim=3, vdim=2)
        self.head = nn.Linear(4 + 2 * 8, 3)

    def forward(self, x):
        pad = x[..., 0] < -1
        out, weights = self.att(self.q(x[:, :1]), x, x[..., 1:], key_padding_mask=pad, average_attn_weights=False)
        return self.head(torch.cat([out[:, 0], weights[:, :, 0].flatten(1)], 1))


class FullMaskTransformer(nn.Module):
    """``nn.Transformer(batch_first=True, dropout=0.1, activation="gelu")``, one encoder and one decoder layer, with
    a boolean causal ``tgt_mask``, ``src_key_padding_mask``, ``tgt_key_padding_mask`` and ``memory_key_padding_mask``
    (padding where the first feature is below -1, the first step never), the decoder reading the sequence
    reversed."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.net = nn.Transformer(4, 2, 1, 1, 8, dropout=0.1, activation="gelu", batch_first=True)
        self.head = nn.Linear(4, 3)
        self.register_buffer("causal", torch.ones(6, 6, dtype=torch.bool).triu(1))

    def forward(self, x):
        pad = (x[..., 0] < -1) & (torch.arange(6) > 0)
        src = self.inp(x)
        out = self.net(src, src.flip(1), tgt_mask=self.causal, src_key_padding_mask=pad,
                       tgt_key_padding_mask=pad.flip(1), memory_key_padding_mask=pad)
        return self.head(out[:, 0])
