"""Models of the sixth round of cases (tests/_round6_cases.py): forwards with jumps, and architectures copied from
tutorials and papers, written as a new user would, each small and float64-ready.

Inputs: ``XV`` (n, 4) vectors, ``XI`` (n, 1, 6, 6) images, ``XS`` (n, 6, 3) sets of six 3-D points or six nodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _round5_kit import head
from torch import Tensor, nn

#: A fixed ring with chords over the six nodes of an ``XS`` sample: (source, target) rows.
EDGES = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0], [0, 3], [1, 4],
                      [1, 0], [2, 1], [3, 2], [4, 3], [5, 4], [0, 5], [3, 0], [4, 1]])


def sign_features() -> nn.Module:
    """Hidden units read through ``torch.sign`` (a jump at 0; zero gradient elsewhere)."""
    return head(lambda m, h: torch.sign(h - 0.1))


def floor_quantised() -> nn.Module:
    """Activations quantised to quarters by ``torch.floor`` (no straight-through estimator)."""
    return head(lambda m, h: torch.floor(h * 4) / 4)


def where_branches() -> nn.Module:
    """``torch.where(h > 0, h + 0.5, 0.3 * h)``: two branches that do not meet at 0."""
    return head(lambda m, h: torch.where(h > 0, h + 0.5, 0.3 * h))


def softplus_threshold() -> nn.Module:
    """``nn.Softplus(beta=2, threshold=1)``: torch switches to the identity above ``beta x = threshold``."""
    sp = nn.Softplus(beta=2.0, threshold=1.0)
    return head(lambda m, h: sp(3 * h))


def gumbel_hard() -> nn.Module:
    """``F.gumbel_softmax(h, hard=True)`` in training: a one-hot forward with the soft sample's gradient."""
    return head(lambda m, h: h * F.gumbel_softmax(h, tau=0.5, hard=True) if m.training else h)


class Top1MoE(nn.Module):
    """A switch-transformer layer: a gate picks one of three tanh experts per sample by ``argmax``, the output is
    that expert's scaled by its softmax probability."""

    def __init__(self):
        super().__init__()
        self.a, self.gate = nn.Linear(4, 8), nn.Linear(8, 3)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        p = self.gate(h).softmax(-1)
        top = p.argmax(-1)
        outs = torch.stack([torch.tanh(e(h)) for e in self.experts], 1)  # (n, 3, 8)
        pick = outs[torch.arange(len(x)), top] * p.gather(1, top[:, None])
        return self.b(pick)


class Top2MoE(nn.Module):
    """Top-2 of four experts per sample, their gate logits renormalised by a softmax over the two."""

    def __init__(self):
        super().__init__()
        self.a, self.gate = nn.Linear(4, 8), nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        val, idx = self.gate(h).topk(2, -1)
        w = val.softmax(-1)  # (n, 2)
        outs = torch.stack([torch.tanh(e(h)) for e in self.experts], 1)  # (n, 4, 8)
        sel = outs.gather(1, idx[..., None].expand(-1, -1, 8))
        return self.b((w[..., None] * sel).sum(1))


class BinaryConnect(nn.Module):
    """A binarised hidden layer (BinaryConnect): the forward uses ``sign(W)``, the gradient passes straight through
    to the real-valued ``W`` (``W + (sign(W) - W).detach()``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        w = self.a.weight
        wb = w + (torch.sign(w) - w).detach()
        return self.b(torch.tanh(F.linear(x, wb, self.a.bias) / 2))


class FakeQuant(nn.Module):
    """Quantisation-aware training: activations through ``torch.fake_quantize_per_tensor_affine`` (8-bit, scale
    0.05), torch's own straight-through operation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.fake_quantize_per_tensor_affine(h, 0.05, 0, -128, 127))


class PointNet(nn.Module):
    """PointNet: a shared MLP (``Conv1d(kernel_size=1)``) over the six 3-D points, ReLU, max over points, a head."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv1d(3, 8, 1), nn.ReLU(), nn.Conv1d(8, 8, 1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.mlp(x.transpose(1, 2)).max(-1).values)


class MessagePassing(nn.Module):
    """Two rounds of message passing over :data:`EDGES` written by hand: messages ``W h_src`` summed into their
    targets with ``index_add_`` (``aggr="sum"``) or ``scatter_reduce(..., "amax")``, a ReLU update, mean pooling."""

    def __init__(self, aggr: str = "sum"):
        super().__init__()
        self.aggr = aggr
        self.inp = nn.Linear(3, 6)
        self.msg = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.upd = nn.ModuleList(nn.Linear(12, 6) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))  # (n, 6 nodes, 6)
        src, dst = EDGES[:, 0], EDGES[:, 1]
        for msg, upd in zip(self.msg, self.upd):
            m = msg(h[:, src])  # (n, E, 6)
            if self.aggr == "sum":
                agg = torch.zeros_like(h).index_add_(1, dst, m)
            else:
                index = dst[None, :, None].expand(len(x), -1, h.shape[-1])
                agg = torch.zeros_like(h).scatter_reduce(1, index, m, "amax", include_self=False)
            h = F.relu(upd(torch.cat([h, agg], -1)))
        return self.head(h.mean(1))


class Mixer(nn.Module):
    """One MLP-Mixer block over six tokens of three channels: token mixing and channel mixing MLPs (GELU), each
    after a LayerNorm with a skip connection, then a LayerNorm, global average pooling and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.n1, self.n2, self.n3 = nn.LayerNorm(4), nn.LayerNorm(4), nn.LayerNorm(4)
        self.tok = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))
        self.ch = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.embed(x)  # (n, 6, 4)
        h = h + self.tok(self.n1(h).transpose(1, 2)).transpose(1, 2)
        h = h + self.ch(self.n2(h))
        return self.head(self.n3(h).mean(1))


class ConvNeXtBlock(nn.Module):
    """A stem conv, one ConvNeXt block (depthwise 7x7 conv, channels-last permute + LayerNorm, inverted
    bottleneck with GELU, layer scale ``gamma``, residual), global average pooling and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 2, stride=2)  # (n, 4, 3, 3)
        self.dw = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.norm = nn.LayerNorm(4, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(4, 16), nn.Linear(16, 4)
        self.gamma = nn.Parameter(torch.full((4,), 0.5))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        y = self.dw(h).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(y))))
        h = h + y.permute(0, 3, 1, 2)
        return self.head(h.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """A conv layer with a squeeze-and-excitation gate (pool, reduce, ReLU, expand, sigmoid, rescale channels)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 4),
                                nn.Sigmoid())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.c(x))
        h = h * self.se(h)[:, :, None, None]
        return self.head(h.mean((2, 3)))


class WSConv2d(nn.Conv2d):
    """Weight standardisation: the kernel of each output channel standardised in ``forward``."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WeightStandardised(nn.Module):
    """Two weight-standardised convolutions with GroupNorm and ReLU (the BiT recipe), pooling, a head."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = WSConv2d(1, 4, 3, padding=1), WSConv2d(4, 4, 3, padding=1)
        self.g1, self.g2 = nn.GroupNorm(2, 4), nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.g1(self.c1(x)))
        h = F.relu(self.g2(self.c2(h)))
        return self.head(h.mean((2, 3)))


class HyperNet(nn.Module):
    """A hypernetwork: a learned code ``z`` passes through a linear generator that emits the weight and bias of the
    hidden layer of the main network, which has no weights of its own there."""

    def __init__(self):
        super().__init__()
        self.z = nn.Parameter(torch.randn(3))
        self.gen = nn.Linear(3, 8 * 4 + 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        p = self.gen(self.z)
        w, bias = p[:32].view(8, 4), p[32:]
        return self.b(torch.tanh(F.linear(x, w, bias)))


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """The capsule non-linearity ``|s|^2 / (1 + |s|^2) s / |s|``."""
    n2 = (s ** 2).sum(dim, keepdim=True)
    return n2 / (1 + n2) * s / (n2 + 1e-9).sqrt()


class Capsules(nn.Module):
    """Six primary capsules of size 4 from a linear layer, transformed to three class capsules of size 4, three
    iterations of dynamic routing by agreement; the logits are the class capsules' lengths."""

    def __init__(self):
        super().__init__()
        self.primary = nn.Linear(4, 24)
        self.W = nn.Parameter(0.3 * torch.randn(6, 3, 4, 4))

    def forward(self, x):
        u = squash(self.primary(x).view(-1, 6, 4))  # (n, 6, 4)
        uhat = torch.einsum("ijab,nib->nija", self.W, u)  # (n, 6, 3, 4)
        b = uhat.new_zeros(len(x), 6, 3)
        for it in range(3):
            c = b.softmax(-1)
            v = squash((c[..., None] * uhat).sum(1))  # (n, 3, 4)
            if it < 2:
                b = b + (uhat * v[:, None]).sum(-1)
        return (v ** 2).sum(-1).add(1e-9).sqrt() * 5


class EulerODE(nn.Module):
    """A neural ODE ``dh/dt = f(h)`` integrated by four fixed Euler steps of ``dt = 0.25`` between an encoder and a
    head."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.f = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))

    def forward(self, x):
        h = self.enc(x)
        for _ in range(4):
            h = h + 0.25 * self.f(h)
        return self.head(h)


class Siamese(nn.Module):
    """A Siamese pair classifier: one encoder applied to both members of a ``(n, 2, 4)`` pair, logits of
    ``same / different`` from ``|e1 - e2|`` and ``e1 * e2``."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
        self.head = nn.Linear(12, 2)

    def forward(self, pair):
        e1, e2 = self.enc(pair[:, 0]), self.enc(pair[:, 1])
        return self.head(torch.cat([(e1 - e2).abs(), e1 * e2], -1))


def celu_stack() -> nn.Module:
    """``nn.CELU(alpha=0.5)`` between two hidden layers."""
    return nn.Sequential(nn.Linear(4, 8), nn.CELU(0.5), nn.Linear(8, 8), nn.CELU(0.5), nn.Linear(8, 3))


class CumMax(nn.Module):
    """A running maximum over a sequence (``torch.cummax`` of per-step features), its last and mean values."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 6), nn.Linear(12, 3)

    def forward(self, x):
        c = torch.cummax(torch.tanh(self.a(x)), 1).values  # (n, 6, 6)
        return self.head(torch.cat([c[:, -1], c.mean(1)], -1))


class SortPool(nn.Module):
    """Sort pooling (SortPool / DGCNN readout): the six node features sorted by value along the nodes, flattened."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 4), nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.sort(torch.tanh(self.a(x)), dim=1).values.flatten(1))


class LogSumExpPool(nn.Module):
    """A smooth maximum over six tokens: ``logsumexp`` pooling of per-token features."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.logsumexp(3 * torch.tanh(self.a(x)), 1) / 3)
