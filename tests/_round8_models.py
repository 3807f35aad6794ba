"""Models of the eighth round of cases (tests/_round8_cases.py), written as a new user would from docs/quickstart.md
and docs/guide_own_model.md, each small and float64-ready.

Inputs: ``XV`` (n, 4) vectors, ``XI`` (n, 1, 6, 6) images, ``XS`` (n, 6, 3) sequences, ``XT`` (n, 5) token ids below
7 (tests/_round5_kit.py), and tests/_round7_models.py's ``XW`` (n, 1, 3, 4, 4) clips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune


class LazyMLP(nn.Module):
    """``nn.LazyLinear`` layers (input sizes inferred at the first forward) with a tanh between."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LazyLinear(6), nn.LazyLinear(3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def lazy_after_dry_run() -> nn.Module:
    """:class:`LazyMLP` after the dry forward torch's documentation asks for before the optimizer is built."""
    model = LazyMLP()
    with torch.no_grad():
        model(torch.zeros(1, 4))
    return model


class LazyConv(nn.Module):
    """``nn.LazyConv2d`` and ``nn.LazyBatchNorm2d`` into a ``LazyLinear`` head, made concrete by a dry forward."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.head = nn.LazyConv2d(2, 3, padding=1), nn.LazyBatchNorm2d(), nn.LazyLinear(3)
        with torch.no_grad():
            self(torch.zeros(2, 1, 6, 6))

    def forward(self, x):
        return self.head(F.avg_pool2d(torch.tanh(self.bn(self.c(x))), 2).flatten(1))


class Pruned(nn.Module):
    """An MLP whose first layer is pruned by ``prune.l1_unstructured`` (``weight_orig`` times ``weight_mask`` in a
    forward pre-hook); :func:`prune_again` prunes it further between steps (iterative magnitude pruning)."""

    def __init__(self):
        super().__init__()
        self.a, self.relu, self.b = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)
        prune.l1_unstructured(self.a, "weight", amount=0.25)

    def forward(self, x):
        return self.b(self.relu(self.a(x)))


def prune_again(s: int, model: nn.Module) -> None:
    """After step 0, ``l1_unstructured`` again on the pruned layer: the mask buffer changes between steps."""
    if s == 0:
        prune.l1_unstructured(model.a, "weight", amount=0.25)


class HookSpectralNorm(nn.Module):
    """The hook-based ``torch.nn.utils.spectral_norm`` (``weight_orig``, ``weight_u``, ``weight_v``; one power
    iteration per training forward in a pre-hook) on the first layer of an MLP."""

    def __init__(self):
        super().__init__()
        self.a = nn.utils.spectral_norm(nn.Linear(4, 8))
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Clip3d(nn.Module):
    """A ``Conv3d`` clip classifier with ``Dropout3d`` (whole channels of a clip dropped), ``ELU``, a head."""

    def __init__(self):
        super().__init__()
        self.c, self.drop = nn.Conv3d(1, 3, (2, 3, 3), padding=(0, 1, 1)), nn.Dropout3d(0.3)
        self.act, self.head = nn.ELU(), nn.Linear(3 * 2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.act(self.drop(self.c(x))).flatten(1))


class InstanceNorm1dSeq(nn.Module):
    """``Conv1d`` over a sequence into ``InstanceNorm1d(affine=True, track_running_stats=True)``, ``Tanh``,
    ``AdaptiveAvgPool1d`` and a head."""

    def __init__(self):
        super().__init__()
        self.c, self.norm = nn.Conv1d(3, 4, 3, padding=1), nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.act, self.pool, self.head = nn.Tanh(), nn.AdaptiveAvgPool1d(2), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.pool(self.act(self.norm(self.c(x.transpose(1, 2))))).flatten(1))


class PoolsUpsample(nn.Module):
    """``AvgPool2d(ceil_mode=True, count_include_pad=False)``, ``nn.Upsample(scale_factor=2, mode="bilinear")``,
    ``AvgPool2d(divisor_override=3)``, ``SELU``, ``Hardtanh(-0.5, 0.5)`` and ``Softsign``."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.p1 = nn.AvgPool2d(4, stride=4, padding=1, ceil_mode=True, count_include_pad=False)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.p2 = nn.AvgPool2d(2, divisor_override=3)
        self.act, self.clip, self.soft = nn.SELU(), nn.Hardtanh(-0.5, 0.5), nn.Softsign()
        self.head = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        h = self.act(self.c(x))
        return self.head(self.soft(4 * self.clip(self.p2(self.up(self.p1(h))))).flatten(1))


class AttentionWeightsPooling(nn.Module):
    """``nn.MultiheadAttention(need_weights=True, average_attn_weights=False)`` whose per-head weights are used
    downstream: the head reads the outputs and the weights' entropy per head."""

    def __init__(self):
        super().__init__()
        self.proj, self.mha = nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        out, w = self.mha(h, h, h, need_weights=True, average_attn_weights=False)  # w (n, 2, L, L)
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1).mean(-1)  # (n, 2)
        return self.head(torch.cat([out.mean(1), ent], -1))


class EncoderLayerGelu(nn.Module):
    """``nn.TransformerEncoderLayer(activation="gelu", batch_first=True)`` (post-norm, dropout 0.1) over embedded
    tokens, token 0 as padding (``src_key_padding_mask``), the first position read by a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation="gelu", batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        pad = x == 0
        pad[:, 0] = False
        return self.head(self.layer(self.emb(x), src_key_padding_mask=pad)[:, 0])


class DecoderLayerPreNorm(nn.Module):
    """``nn.TransformerDecoderLayer(norm_first=True, activation=F.gelu)`` attending to a memory of the same tokens,
    ``memory_key_padding_mask`` from token 0, a causal ``tgt_mask``; the last position read by a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.1, activation=F.gelu, batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        e = self.emb(x)
        pad = x == 0
        pad[:, 0] = False
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=e.dtype)
        return self.head(self.layer(e, e, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True)[:, -1])


class RealNVP(nn.Module):
    """Two affine coupling layers (scale from ``tanh``, a learned permutation-free flip between them) and a learned
    invertible mixing matrix (Glow's 1x1 convolution on vectors) with ``torch.slogdet``. Returns ``(n, 5)``: the
    latent ``z`` (4) and ``log|det dz/dx|`` (1), for :func:`flow_nll`."""

    def __init__(self):
        super().__init__()
        self.s1, self.t1 = nn.Linear(2, 2), nn.Linear(2, 2)
        self.s2, self.t2 = nn.Linear(2, 2), nn.Linear(2, 2)
        self.mix = nn.Parameter(torch.eye(4) + 0.1 * torch.randn(4, 4))

    def forward(self, x):
        a, b = x[:, :2], x[:, 2:]
        s = torch.tanh(self.s1(a))
        b = b * s.exp() + self.t1(a)
        s2 = torch.tanh(self.s2(b))
        a = a * s2.exp() + self.t2(b)
        z = torch.cat([a, b], 1) @ self.mix.T
        logdet = s.sum(1) + s2.sum(1) + torch.slogdet(self.mix)[1]
        return torch.cat([z, logdet[:, None]], 1)


def flow_nll(out: Tensor, y: Tensor) -> Tensor:
    """The flow's negative log-likelihood under a standard normal prior (mean over the batch); ``y`` unused."""
    z, logdet = out[:, :4], out[:, 4]
    return (0.5 * (z ** 2).sum(1) - logdet).mean()


class MDN(nn.Module):
    """A mixture density network: 3 Gaussian components for a scalar target; ``(n, 9)`` = logits, means, log
    scales, for :func:`mdn_nll`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 9)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def mdn_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-log sum_k pi_k N(y; mu_k, sigma_k)`` through ``torch.distributions``, the batch mean."""
    logits, mu, log_sigma = out[:, :3], out[:, 3:6], out[:, 6:]
    comp = torch.distributions.Normal(mu, log_sigma.exp())
    return -torch.logsumexp(F.log_softmax(logits, -1) + comp.log_prob(y[:, None]), -1).mean()


class RK4ODE(nn.Module):
    """A neural ODE ``dh/dt = tanh(W h + b)`` integrated by four fixed steps of classical Runge-Kutta in ``forward``."""

    def __init__(self):
        super().__init__()
        self.enc, self.f, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h, dt = self.enc(x), 0.25
        for _ in range(4):
            k1 = torch.tanh(self.f(h))
            k2 = torch.tanh(self.f(h + dt / 2 * k1))
            k3 = torch.tanh(self.f(h + dt / 2 * k2))
            k4 = torch.tanh(self.f(h + dt * k3))
            h = h + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return self.head(h)


class SpectralConv1d(nn.Module):
    """An FNO-style layer over ``(n, 6, 3)`` sequences: ``rfft`` along time, the lowest 3 modes mixed by complex
    weights stored as real ``(..., 2)`` pairs (``torch.view_as_complex``), ``irfft`` back, plus a pointwise path."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(3, 3, 3, 2))
        self.point, self.head = nn.Conv1d(3, 3, 1), nn.Linear(3, 3)

    def forward(self, x):
        u = x.transpose(1, 2)  # (n, 3, 6)
        spec = torch.fft.rfft(u, dim=-1)  # (n, 3, 4)
        low = torch.einsum("nim,iom->nom", spec[..., :3], torch.view_as_complex(self.w))
        mixed = torch.fft.irfft(F.pad(low, (0, spec.shape[-1] - 3)), n=u.shape[-1], dim=-1)
        return self.head(F.gelu(mixed + self.point(u)).mean(-1))


class FixedPoint(nn.Module):
    """A deep-equilibrium layer: ``z = tanh(W z + U x)`` iterated until the update is below 1e-6 (at most 30 times),
    the iteration count read from the data."""

    def __init__(self):
        super().__init__()
        self.W, self.U, self.head = nn.Linear(5, 5, bias=False), nn.Linear(4, 5), nn.Linear(5, 3)
        with torch.no_grad():
            self.W.weight.mul_(0.3)

    def forward(self, x):
        u = self.U(x)
        z = torch.zeros_like(u)
        for _ in range(30):
            new = torch.tanh(self.W(z) + u)
            if (new - z).abs().max() < 1e-6:
                z = new
                break
            z = new
        return self.head(z)


class RidgeHead(nn.Module):
    """A differentiable solver layer: features ``h (n, 4)``, then ``z = (A A^T + I)^{-1} h`` by
    ``torch.linalg.solve`` with a learned ``A``."""

    def __init__(self):
        super().__init__()
        self.a, self.A, self.head = nn.Linear(4, 4), nn.Parameter(0.5 * torch.randn(4, 4)), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        M = self.A @ self.A.T + torch.eye(4, dtype=h.dtype)
        return self.head(torch.linalg.solve(M, h.T).T)


class Sawtooth(nn.Module):
    """A periodic feature ``torch.remainder(h, 1.0)`` of hidden units (a phase, as in periodic encodings)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.remainder(2 * self.a(x), 1.0))


class FunctionalHardshrink(nn.Module):
    """``F.hardshrink(h, 0.5)`` written as a function in ``forward`` (its output jumps from 0 to +-0.5)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(F.hardshrink(2 * self.a(x), 0.5))


class BucketEmbedding(nn.Module):
    """Hidden units bucketed by an integer cast, ``(h * 2).long().clamp(-3, 3) + 3``, into an embedding table."""

    def __init__(self):
        super().__init__()
        self.a, self.emb, self.b = nn.Linear(4, 2), nn.Embedding(7, 3), nn.Linear(2 + 2 * 3, 3)

    def forward(self, x):
        h = self.a(x)
        idx = (h * 2).long().clamp(-3, 3) + 3
        return self.b(torch.cat([h, self.emb(idx).flatten(1)], 1))


class MaxIndexRouter(nn.Module):
    """A mixture of two experts routed by ``torch.max(probs, dim=-1)``: the chosen expert scaled by its gate
    probability (the values), selected by the indices."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])

    def forward(self, x):
        prob, route = torch.max(self.gate(x).softmax(-1), dim=-1)
        outs = torch.stack([e(x) for e in self.experts], 1)  # (n, 2, 3)
        return outs.gather(1, route[:, None, None].expand(-1, 1, 3)).squeeze(1) * prob[:, None]


class ClampedOutput(nn.Module):
    """The logits clamped to ``[-1, 1]`` by ``torch.clamp`` (a kink where a logit reaches a bound)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return torch.clamp(self.b(torch.tanh(self.a(x))), -1.0, 1.0)


class SparseEmbedding(nn.Module):
    """``nn.Embedding(sparse=True)`` over the token ids (sparse gradients, which plain SGD accepts), mean-pooled."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4, sparse=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x).mean(1)))


class LowRank(nn.Module):
    """LoRA written with ``parametrize``: ``W0 + B A`` on a frozen base weight, ``A`` and ``B`` trainable."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.A = nn.Parameter(0.1 * torch.randn(2, base.in_features))
        self.B = nn.Parameter(0.1 * torch.randn(base.out_features, 2))

    def forward(self, W):
        return W + self.B @ self.A


class LoRAMLP(nn.Module):
    """An MLP whose layers' weights are frozen and adapted by :class:`LowRank` parametrizations (biases frozen)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        for lin in (self.a, self.b):
            parametrize.register_parametrization(lin, "weight", LowRank(lin))
            lin.parametrizations.weight.original.requires_grad_(False)
            lin.bias.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Antialiased(nn.Module):
    """``F.interpolate(mode="bilinear", antialias=True)`` down to 3x3 after a convolution."""

    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.head(F.interpolate(torch.tanh(self.c(x)), size=(3, 3), mode="bilinear", antialias=True).flatten(1))


class CrossMapLRN(nn.Module):
    """``nn.CrossMapLRN2d`` (AlexNet's cross-channel normalisation, torch's legacy module) after a convolution."""

    def __init__(self):
        super().__init__()
        self.c, self.lrn, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.CrossMapLRN2d(3), nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.head(F.avg_pool2d(self.lrn(torch.tanh(self.c(x))), 2).flatten(1))


class SegNet(nn.Module):
    """Per-pixel logits ``(n, 3, 6, 6)`` from two convolutions (a segmentation head)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))
