"""Models and losses of the fifth round of cases (tests/_round5_cases.py): torch layers, parameter layouts and
loss callables a new user brings, each small and float64-ready.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _round5_kit import DT, KinkMarks, head
from torch import Tensor, nn


class RReLUNet(nn.Module):
    """``Linear - RReLU - Linear``: torch draws each unit's negative slope in training mode."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.RReLU(0.1, 0.3), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def mc_dropout() -> nn.Module:
    """Monte Carlo dropout: ``F.dropout(h, 0.2, training=True)``, random in evaluation mode too."""
    return head(lambda m, h: F.dropout(h, 0.2, training=True))


class ChannelDropout(nn.Module):
    """Conv1d over a ``(n, 6, 3)`` sequence (channels last in the data) with ``Dropout1d``, then
    ``FeatureAlphaDropout`` after SELU, a mean over time, a linear head."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 4, 3, padding=1)
        self.d1, self.selu, self.d2 = nn.Dropout1d(0.3), nn.SELU(), nn.FeatureAlphaDropout(0.2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.d1(torch.tanh(self.c(x.transpose(1, 2))))
        return self.head(self.d2(self.selu(h)).mean(-1))


def norms() -> nn.Module:
    """torch's ``nn.RMSNorm`` and a ``LayerNorm(bias=False)`` between tanh layers."""
    return nn.Sequential(nn.Linear(4, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8, bias=False),
                         nn.Tanh(), nn.Linear(8, 3))


class PaddedConvs(nn.Module):
    """``padding="same"`` dilated Conv2d with ``padding_mode="reflect"``, a strided ``"circular"`` Conv2d, a
    ``ConvTranspose2d`` with ``output_padding=1``, ``nn.Unfold`` patches and a head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding="same", dilation=2, padding_mode="reflect")
        self.c2 = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular")
        self.t = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.unfold = nn.Unfold(2, stride=2)
        self.head = nn.Linear(2 * 4 * 9, 3)

    def forward(self, x):
        h = torch.tanh(self.t(torch.tanh(self.c2(torch.tanh(self.c1(x))))))  # (n, 2, 6, 6)
        return self.head(self.unfold(h).flatten(1))


class SpatialTransformer(nn.Module):
    """A localisation net predicts an affine map near the identity; ``F.affine_grid`` and bilinear
    ``F.grid_sample`` resample the 6x6 image; a linear head. ``marks``: sin(pi u) of the sampling positions u in
    pixels, whose sign changes (integer u) are the kinks of the bilinear weights, for the slow reference."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Linear(36, 6)
        self.head = nn.Linear(36, 3)
        self.marks = KinkMarks()

    def forward(self, x):
        theta = torch.eye(2, 3, dtype=x.dtype) + 0.1 * torch.tanh(self.loc(x.flatten(1))).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        self.marks(torch.sin(math.pi * ((grid + 1) * 6 - 1) / 2))  # align_corners=False: u = ((g + 1) n - 1) / 2
        return self.head(F.grid_sample(x, grid, mode="bilinear", align_corners=False).flatten(1))


class CellLoop(nn.Module):
    """``nn.GRUCell`` and ``nn.LSTMCell`` stepped by a Python loop over the ``(n, 6, 3)`` sequence."""

    def __init__(self):
        super().__init__()
        self.gru, self.lstm, self.head = nn.GRUCell(3, 4), nn.LSTMCell(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = x.new_zeros(len(x), 4)
        hc = (x.new_zeros(len(x), 4), x.new_zeros(len(x), 4))
        for t in range(x.shape[1]):
            h = self.gru(x[:, t], h)
            hc = self.lstm(h, hc)
        return self.head(hc[0])


class PaddedAttention(nn.Module):
    """Token ids (0 is padding) -> embedding -> ``nn.MultiheadAttention(add_zero_attn=True)`` with the padding as
    ``key_padding_mask`` -> masked mean -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True, add_zero_attn=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        pad = x == 0
        e = self.emb(x)
        h, _ = self.att(e, e, e, key_padding_mask=pad, need_weights=False)
        keep = (~pad).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))


class AdaptiveSoftmax(nn.Module):
    """A tanh layer into ``nn.AdaptiveLogSoftmaxWithLoss`` (cut-off 2 of 5 classes); outputs its ``log_prob``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.out = nn.AdaptiveLogSoftmaxWithLoss(8, 5, cutoffs=[2], div_value=2.0)

    def forward(self, x):
        return self.out.log_prob(torch.tanh(self.a(x)))


class ComplexFilter(nn.Module):
    """A learnable complex128 weight: ``|x W|`` of the inputs seen as complex numbers, a real head."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6, dtype=torch.complex128) / 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh((x.to(torch.complex128) @ self.w).abs()))


class ComplexAsReal(nn.Module):
    """The fix the refusal names: the complex weight held as a real ``(4, 6, 2)`` parameter, read through
    ``torch.view_as_complex``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.view_as_real(torch.randn(4, 6, dtype=torch.complex128) / 2))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh((x.to(torch.complex128) @ torch.view_as_complex(self.w)).abs()))


class MixedDtype(nn.Module):
    """A float32 first layer inside a float64 model (its input cast down, its output cast up)."""

    keep_dtypes = True  # tests/_round5_kit.py seeded() leaves the float32 layer as it is

    def __init__(self, follow: bool = False):
        super().__init__()
        self.a, self.b, self.follow = nn.Linear(4, 8), nn.Linear(8, 3, dtype=DT), follow

    def forward(self, x):
        x = x.to(self.a.weight.dtype) if self.follow else x.float()
        return self.b(torch.tanh(self.a(x)).to(self.b.weight.dtype))


class CosineClassifier(nn.Module):
    """L2-normalised features against L2-normalised class weights, times a learned ``exp(logit_scale)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.w = nn.Parameter(torch.randn(3, 8))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))

    def forward(self, x):
        h = F.normalize(torch.tanh(self.a(x)), dim=-1)
        return self.logit_scale.exp() * h @ F.normalize(self.w, dim=-1).T


class TiedAutoencoder(nn.Module):
    """One weight used as the encoder ``W`` and the decoder ``W.T``; a head reads the reconstruction."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 4) / 2)
        self.b_enc, self.b_dec = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(x @ self.W.T + self.b_enc)
        return self.head(torch.tanh(h @ self.W + self.b_dec))


def pos_weighted_bce(out: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, y, pos_weight=torch.tensor([1.0, 3.0, 0.5], dtype=out.dtype))


def multilabel_soft_margin(out: Tensor, y: Tensor) -> Tensor:
    return F.multilabel_soft_margin_loss(out, y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=out.dtype))


def huber(out: Tensor, y: Tensor) -> Tensor:
    return F.huber_loss(out, y, delta=0.5)


def gaussian_nll(out: Tensor, y: Tensor) -> Tensor:
    """Mean and log-variance heads: ``out[:, 0]`` and ``out[:, 1]``, ``y`` a real target."""
    return F.gaussian_nll_loss(out[:, 0], y, out[:, 1].exp())


def poisson_nll(out: Tensor, y: Tensor) -> Tensor:
    return F.poisson_nll_loss(out, y, log_input=True)


def focal(out: Tensor, y: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss written by hand: ``-(1 - p_y)^gamma log p_y``, mean over the batch."""
    logp = F.log_softmax(out, -1).gather(1, y[:, None])[:, 0]
    return (-(1 - logp.exp()) ** gamma * logp).mean()


def multi_margin(out: Tensor, y: Tensor) -> Tensor:
    return F.multi_margin_loss(out, y, margin=1.0)


def triplet(out: Tensor, y: Tensor) -> Tensor:
    """``out (n, 3, e)``: anchor, positive and negative embeddings of each sample (``y`` unused)."""
    return F.triplet_margin_loss(out[:, 0], out[:, 1], out[:, 2], margin=1.0)


def cosine_pairs(out: Tensor, y: Tensor) -> Tensor:
    """``out (n, 2, e)``: the two embeddings of each pair; ``y`` is +1 (similar) or -1."""
    return F.cosine_embedding_loss(out[:, 0], out[:, 1], y, margin=0.2)


def distillation(out: Tensor, y: Tensor) -> Tensor:
    """``y (n, 4)``: the label in column 0, the teacher's log-probabilities after it; KL (log target) plus CE."""
    kl = F.kl_div(F.log_softmax(out, -1), y[:, 1:], reduction="batchmean", log_target=True)
    return 0.5 * kl + 0.5 * F.cross_entropy(out, y[:, 0].long())


def ctc(out: Tensor, y: Tensor) -> Tensor:
    """``out (n, T, 4)`` per-frame logits (class 0 is the blank), ``y (n, 2)`` each sample's two labels."""
    logp = F.log_softmax(out, -1).transpose(0, 1)  # (T, n, C), CTC's layout
    n, T = out.shape[0], out.shape[1]
    return F.ctc_loss(logp, y, torch.full((n,), T, dtype=torch.long), torch.full((n,), 2, dtype=torch.long))


def info_nce(out: Tensor, y: Tensor) -> Tensor:
    """In-batch InfoNCE of two views: ``out (n, 2, e)``, each first view against every second view of the batch."""
    a, b = F.normalize(out[:, 0], dim=-1), F.normalize(out[:, 1], dim=-1)
    return F.cross_entropy(a @ b.T / 0.5, torch.arange(len(out)))


class Views(nn.Module):
    """A shared tanh encoder applied to each of the ``k`` views of a sample: ``x (n, k, 4) -> (n, k, 3)``."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.enc(x)


class Uncertainty(nn.Module):
    """A classifier with a learned loss weight ``log_var`` (Kendall et al.'s uncertainty weighting) that only the
    loss reads: ``exp(-log_var) * CE + log_var``."""

    def __init__(self):
        super().__init__()
        self.net = head()
        self.log_var = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.net(x)


class UncertaintyInOutputs(nn.Module):
    """The fix the check names: ``log_var`` returned as a fourth output column, read there by the loss."""

    def __init__(self):
        super().__init__()
        self.net = head()
        self.log_var = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return torch.cat([self.net(x), self.log_var.expand(len(x), 1)], 1)


def uncertainty_in_outputs(out: Tensor, y: Tensor) -> Tensor:
    return (torch.exp(-out[:, 3]) * F.cross_entropy(out[:, :3], y, reduction="none") + out[:, 3]).mean()


def uncertainty_loss(model: Uncertainty) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(out: Tensor, y: Tensor) -> Tensor:
        return torch.exp(-model.log_var) * F.cross_entropy(out, y) + model.log_var
    return loss


def loss_data(kind: str) -> tuple[Tensor, Tensor]:
    """Inputs and targets of the loss cases: ``(14, 4)`` inputs (``(14, k, 4)`` for views) and targets of ``kind``."""
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(14, 4, generator=gen, dtype=DT)
    if kind == "multilabel":
        return X, (torch.rand(14, 3, generator=gen) < 0.4).to(DT)
    if kind == "real":
        return X, torch.randn(14, 3, generator=gen, dtype=DT)
    if kind == "scalar":
        return X, torch.randn(14, generator=gen, dtype=DT)
    if kind == "counts":
        return X, torch.randint(0, 5, (14, 3), generator=gen).to(DT)
    if kind == "triplet":
        return torch.randn(14, 3, 4, generator=gen, dtype=DT), torch.zeros(14, dtype=DT)
    if kind == "pairs":
        return torch.randn(14, 2, 4, generator=gen, dtype=DT), torch.randint(0, 2, (14,), generator=gen).to(DT) * 2 - 1
    if kind == "teacher":
        torch.manual_seed(3)
        teacher = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        with torch.no_grad():
            soft = F.log_softmax(teacher(X), -1)
        return X, torch.cat([torch.randint(0, 3, (14, 1), generator=gen).to(DT), soft], 1)
    return X, torch.randint(0, 3, (14,), generator=gen)


class FrameConv(nn.Module):
    """Conv1d over ``(n, 6, 3)`` frames to per-frame logits ``(n, 6, 4)`` (class 0 the CTC blank)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 6, 3, padding=1), nn.Conv1d(6, 4, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x.transpose(1, 2)))).transpose(1, 2)


class AuxRouter(nn.Module):
    """Two tanh experts mixed by a softmax gate; returns ``(logits, aux)`` with ``aux`` a load-balancing loss over
    the batch (the squared mean gate probability per expert, times 2), which the loop adds to its loss."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)) for _ in range(2)])

    def forward(self, x):
        g = self.gate(x).softmax(-1)
        out = (torch.stack([e(x) for e in self.experts], -1) * g[:, None]).sum(-1)
        return out, 2 * (g.mean(0) ** 2).sum()


class Uint8Images(nn.Module):
    """uint8 6x6 images scaled in the forward (``x.to(float64) / 255`` minus 0.5), a Conv2d, tanh, a head."""

    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(1, 2, 3), nn.Linear(2 * 16, 3)

    def forward(self, x):
        h = torch.tanh(self.c(x.to(self.c.weight.dtype) / 255 - 0.5))
        return self.head(h.flatten(1))


XU = (torch.rand(14, 1, 6, 6, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)


def hooked_output() -> nn.Module:
    """A forward hook on the first layer that rescales its output (``out * 2``): part of the model's function."""
    model = head()
    model.a.register_forward_hook(lambda m, inp, out: out * 2)
    return model


class RenormalisedHead(nn.Module):
    """A NormFace-style head that renormalises its weight rows in place in every forward (under ``no_grad``)."""

    def __init__(self):
        super().__init__()
        self.a, self.w = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        with torch.no_grad():
            self.w.div_(self.w.norm(dim=1, keepdim=True))
        return 5 * torch.tanh(self.a(x)) @ self.w.T


class TwoHeads(nn.Module):
    """Multi-task: a shared tanh trunk, a 3-class head and a 2-dimensional regression head, returned as a tuple, or
    concatenated into one ``(n, 5)`` output when ``concat``."""

    def __init__(self, concat: bool = False):
        super().__init__()
        self.trunk, self.cls, self.reg, self.concat = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 2), concat

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return torch.cat([self.cls(h), self.reg(h)], 1) if self.concat else (self.cls(h), self.reg(h))


REG = torch.randn(14, 2, generator=torch.Generator().manual_seed(8), dtype=DT)


def multi_task_loss(out: Tensor, y: Tensor) -> Tensor:
    """The fix: one output ``(n, 5)``, ``y (n, 3)`` holding the label and the two regression targets."""
    return F.cross_entropy(out[:, :3], y[:, 0].long()) + F.mse_loss(out[:, 3:], y[:, 1:])


class Prototypes(nn.Module):
    """A prototype classifier: negative squared ``torch.cdist`` distances of tanh features to 3 learned prototypes;
    ``by_hand``: the same distances as the refusal's fix writes them."""

    def __init__(self, by_hand: bool = False):
        super().__init__()
        self.a, self.protos, self.by_hand = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8)), by_hand

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.by_hand:
            return -((h[..., :, None, :] - self.protos[..., None, :, :]) ** 2).sum(-1)
        return -torch.cdist(h, self.protos) ** 2


class Reparameterised(nn.Module):
    """A VAE-style bottleneck: ``Normal(mu, softplus(s)).rsample()`` in training mode, ``mu`` in evaluation mode."""

    def __init__(self):
        super().__init__()
        self.a, self.mu, self.s, self.head = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        mu = self.mu(h)
        z = torch.distributions.Normal(mu, F.softplus(self.s(h))).rsample() if self.training else mu
        return self.head(z)


class StatefulGRU(nn.Module):
    """Truncated back-propagation through time: the GRU's last hidden state, detached, starts the next batch's
    sequences (kept as a plain tensor attribute); evaluation starts from zeros."""

    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)
        self.h = None

    def forward(self, x):
        h0 = self.h if (self.training and self.h is not None and self.h.shape[1] == len(x)) else None
        out, h = self.gru(x, h0)
        if self.training:
            self.h = h.detach()
        return self.head(out[:, -1])

