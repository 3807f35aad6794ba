"""Models and losses of the seventh round of cases (tests/_round7_cases.py), written as a new user would from
docs/quickstart.md and docs/guide_own_model.md, each small and float64-ready.

Inputs: ``XV`` (n, 4) vectors, ``XI`` (n, 1, 6, 6) images, ``XT`` (n, 5) token ids below 7, and this module's
``XA`` (n, 1, 12) audio frames and ``XW`` (n, 1, 3, 4, 4) video clips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _round5_kit import head
from hard_models_kit import data
from torch import Tensor, nn
from torch.nn.utils import parametrize

XA, YA = data(14, (1, 12), 21)
XW, YW = data(14, (1, 3, 4, 4), 22)


class DilatedAudio(nn.Module):
    """A WaveNet-style ``Conv1d`` stack: ``padding="same"`` with dilations 2 and 4 (the second replicate-padded), GELU,
    mean over time, a head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 3, 3, padding="same", dilation=2)
        self.c2 = nn.Conv1d(3, 3, 3, padding="same", dilation=4, padding_mode="replicate")
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.gelu(self.c1(x))
        return self.head((h + F.gelu(self.c2(h))).mean(-1))


class VideoNet(nn.Module):
    """A ``Conv3d`` clip classifier: (2, 3, 3) kernels over (time, height, width), ReLU, ``AvgPool3d``, a head."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(1, 2, (2, 3, 3), padding=(0, 1, 1))
        self.relu, self.pool = nn.ReLU(), nn.AvgPool3d((1, 2, 2))
        self.head = nn.Linear(2 * 2 * 2 * 2, 3)

    def forward(self, x):
        return self.head(self.pool(self.relu(self.c(x))).flatten(1))


class TinyUNet(nn.Module):
    """A two-level U-Net: a strided convolution down, ``F.interpolate`` back up (``mode`` and ``align_corners`` as
    given), the skip concatenated, a convolution and a head."""

    def __init__(self, mode: str = "bilinear", align: bool | None = None):
        super().__init__()
        self.mode, self.align = mode, align
        self.enc = nn.Conv2d(1, 2, 3, padding=1)
        self.down = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.dec = nn.Conv2d(5, 2, 3, padding=1)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        skip = torch.tanh(self.enc(x))
        low = torch.tanh(self.down(skip))  # (n, 3, 3, 3)
        up = F.interpolate(low, size=(6, 6), mode=self.mode, align_corners=self.align)
        return self.head(torch.tanh(self.dec(torch.cat([up, skip], 1))).flatten(1))


class ConvAutoencoder(nn.Module):
    """A convolutional autoencoder: strided ``Conv2d`` down, ``ConvTranspose2d`` up, the image itself as output
    (36 outputs per sample, trained with MSE against the input)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(3, 1, 4, stride=2, padding=1)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of ``x (..., L, d)``: pairs ``(x1, x2)`` of the two halves rotated by the angles."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class TinyDecoder(nn.Module):
    """A Llama-style block by hand: token embeddings tied to the head, ``nn.RMSNorm``, rotary embeddings from
    sin/cos buffers, causal SDPA (``is_causal=True``) with ``heads`` query heads over ``kv_heads`` key/value heads
    (``enable_gqa=True`` when they differ), a SwiGLU MLP; the last position's logits over the 7 tokens."""

    def __init__(self, heads: int = 2, kv_heads: int = 2, alibi: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.alibi, d, hd = heads, kv_heads, alibi, 8, 4
        self.emb = nn.Embedding(7, d)
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.kv = nn.Linear(d, heads * hd, bias=False), nn.Linear(d, 2 * kv_heads * hd, bias=False)
        self.o = nn.Linear(heads * hd, d, bias=False)
        self.gate, self.up, self.down = nn.Linear(d, 12, bias=False), nn.Linear(d, 12, bias=False), nn.Linear(12, d)
        angles = torch.arange(5)[:, None] * (10000.0 ** (-torch.arange(hd // 2) / (hd // 2)))[None]
        self.register_buffer("cos", angles.cos().repeat(1, 1))
        self.register_buffer("sin", angles.sin())
        pos = torch.arange(5)
        slopes = 2.0 ** (-8.0 * (torch.arange(heads) + 1) / heads)
        distance = (pos[:, None] - pos[None]).clamp(min=0)
        self.register_buffer("bias", (-slopes[:, None, None] * distance).masked_fill(pos[None] > pos[:, None],
                                                                                   float("-inf")))

    def forward(self, tokens):
        n, L = tokens.shape
        h = self.emb(tokens)
        a = self.n1(h)
        q = self.q(a).view(n, L, self.heads, -1).transpose(1, 2)
        k, v = self.kv(a).view(n, L, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        if self.alibi:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.to(q.dtype))
        else:
            q, k = rope(q, self.cos, self.sin), rope(k, self.cos, self.sin)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        h = h + self.o(att.transpose(1, 2).reshape(n, L, -1))
        b = self.n2(h)
        h = h + self.down(F.silu(self.gate(b)) * self.up(b))
        return h[:, -1] @ self.emb.weight.T


class MaxNormEmbedding(nn.Module):
    """``nn.Embedding(max_norm=1.0)`` (torch renormalises the looked-up rows in place at every forward), mean over
    the sequence, a head."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4, max_norm=1.0), nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens).mean(1)))


class Symmetric(nn.Module):
    """A custom parametrization: the symmetric part of a square weight, ``triu(W) + triu(W, 1).T``."""

    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def symmetric_weights() -> nn.Module:
    """A tanh MLP whose square middle layer is symmetric through ``parametrize.register_parametrization``."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    parametrize.register_parametrization(model[2], "weight", Symmetric())
    return model


class FunctionalInside(nn.Module):
    """A user calling ``torch.func.functional_call`` inside ``forward``: the body is run with its weights scaled by a
    learned gain (a fast-weights / meta-learning style update)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.gain = nn.Parameter(torch.tensor(0.8))

    def forward(self, x):
        params = {n: p * self.gain if n.endswith("weight") else p for n, p in self.body.named_parameters()}
        return torch.func.functional_call(self.body, params, (x,))


class DictOutput(nn.Module):
    """A forward that returns a plain ``dict`` with ``"logits"`` and an embedding."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return {"logits": self.b(h), "embedding": h}


def deep_relu(depth: int = 30, width: int = 6) -> nn.Module:
    """A ``depth``-layer plain ReLU MLP (kink-dense: ``depth - 1`` ReLU layers)."""
    layers: list[nn.Module] = [nn.Linear(4, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


class FractionalPool(nn.Module):
    """``nn.FractionalMaxPool2d``: its pooling regions are drawn at random at every forward, in evaluation mode
    too (``adaptive``: the fix, ``nn.AdaptiveMaxPool2d`` to the same size)."""

    def __init__(self, adaptive: bool = False):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d((3, 3)) if adaptive else nn.FractionalMaxPool2d(2, output_size=(3, 3))
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.head(self.pool(torch.tanh(self.c(x))).flatten(1))


class ShuffledPads(nn.Module):
    """``ReflectionPad2d``, ``PixelUnshuffle(2)``, ``ChannelShuffle(2)``, ``LPPool2d(2)`` of a softplus, ``nn.Fold``
    of unfolded patches, ``ZeroPad2d``, a head."""

    def __init__(self):
        super().__init__()
        self.pad, self.c = nn.ReflectionPad2d(1), nn.Conv2d(1, 2, 3)
        self.unshuffle, self.shuffle = nn.PixelUnshuffle(2), nn.ChannelShuffle(2)
        self.lp, self.zpad = nn.LPPool2d(2, 2), nn.ZeroPad2d((1, 0, 1, 0))
        self.unfold, self.fold = nn.Unfold(2), nn.Fold((3, 3), 2)
        self.head = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        h = self.shuffle(self.unshuffle(torch.tanh(self.c(self.pad(x)))))  # (n, 8, 3, 3)
        h = self.fold(self.unfold(h) * 0.5) + F.softplus(h)
        return self.head(self.zpad(self.lp(F.pad(h, (1, 0, 1, 0)) + 0.1)).flatten(1))


class PairDistances(nn.Module):
    """A Siamese model on pairs ``x (n, 2, 4)``: ``nn.CosineSimilarity`` and ``nn.PairwiseDistance`` of the two
    embeddings, and the ``Softmin`` / ``LogSigmoid`` / ``Tanhshrink`` / ``GLU`` modules on the way."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 12), nn.GLU(), nn.Tanhshrink(), nn.Linear(6, 5), nn.LogSigmoid())
        self.cos, self.dist, self.softmin = nn.CosineSimilarity(-1), nn.PairwiseDistance(), nn.Softmin(-1)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        a, b = self.enc(x[:, 0]), self.enc(x[:, 1])
        return self.head(torch.cat([self.cos(a, b)[:, None], self.dist(a, b)[:, None], self.softmin(a - b)], 1))


class Recurrent(nn.Module):
    """A bidirectional ``LSTM(proj_size=2)`` and a bidirectional two-layer GRU over ``x (n, 6, 3)``."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True, bidirectional=True, proj_size=2)
        self.gru = nn.GRU(4, 3, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.head(h[:, -1])


class VAEKLAttribute(nn.Module):
    """A VAE-style classifier that keeps its KL term in ``self.kl`` for the loop to add to the loss (a pattern of
    many VAE tutorials); the bottleneck is the mean in evaluation mode, ``mu + sigma * randn_like`` in training."""

    def __init__(self):
        super().__init__()
        self.enc, self.mu, self.logvar, self.dec = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2), nn.Linear(2, 3)
        self.kl = None

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        self.kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1).mean()
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.dec(z)


class FrozenStatsBN(nn.Module):
    """A tanh MLP with ``BatchNorm1d`` between its layers (the loop freezes its statistics mid-run)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.bn(self.a(x))))


class DropoutHead(nn.Module):
    """A tanh MLP with ``nn.Dropout(0.3)``."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


# losses ---------------------------------------------------------------------------------------------------------------

QUANTILES = (0.1, 0.5, 0.9)


def pinball(out: Tensor, y: Tensor) -> Tensor:
    """The quantile (pinball) loss of three quantile heads against a scalar target."""
    q = torch.tensor(QUANTILES, dtype=out.dtype)
    e = y[:, None] - out
    return torch.maximum(q * e, (q - 1) * e).sum(1).mean()


def margin_ranking(out: Tensor, y: Tensor) -> Tensor:
    """``F.margin_ranking_loss`` of the first output of each of a pair's two views, ``y`` in {-1, 1}."""
    return F.margin_ranking_loss(out[:, 0, 0], out[:, 1, 0], y, margin=0.5)


def hinge_embedding(out: Tensor, y: Tensor) -> Tensor:
    """``F.hinge_embedding_loss`` of the distance of a pair's two views, ``y`` in {-1, 1}."""
    return F.hinge_embedding_loss((out[:, 0] - out[:, 1]).norm(dim=-1), y, margin=1.0)


def soft_margin(out: Tensor, y: Tensor) -> Tensor:
    """``F.soft_margin_loss`` of the first output against ``y`` in {-1, 1}."""
    return F.soft_margin_loss(out[:, 0, 0], y)


def smooth_l1_small_beta(out: Tensor, y: Tensor) -> Tensor:
    """``F.smooth_l1_loss`` with ``beta=0.01`` (Huber with a small delta: nearly L1)."""
    return F.smooth_l1_loss(out, y, beta=0.01)


def bce_of_sigmoid(out: Tensor, y: Tensor) -> Tensor:
    """``F.binary_cross_entropy`` of ``sigmoid(out)`` (probabilities, not logits), multi-label targets."""
    return F.binary_cross_entropy(torch.sigmoid(out), y)


def nll_class_weighted_ignore(out: Tensor, y: Tensor) -> Tensor:
    """``F.nll_loss`` of ``log_softmax`` with class weights and ``ignore_index=2``: a weighted mean over the batch's
    counted samples."""
    return F.nll_loss(F.log_softmax(out, -1), y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=out.dtype),
                      ignore_index=2)


def batch_hard_triplet(out: Tensor, y: Tensor) -> Tensor:
    """A triplet loss with in-batch hard mining: for each anchor its farthest same-label and nearest other-label
    sample of the batch."""
    d = torch.cdist(out, out)
    same = y[:, None] == y[None]
    pos = (d * same).amax(1)
    neg = d.masked_fill(same, float("inf")).amin(1)
    return F.relu(pos - neg + 0.5).mean()


def supcon(out: Tensor, y: Tensor, tau: float = 0.5) -> Tensor:
    """Supervised contrastive loss (Khosla et al.): for each anchor, the mean log-probability of its same-label
    samples among all other samples of the batch."""
    z = F.normalize(out, dim=-1)
    logits = (z @ z.T / tau).fill_diagonal_(-1e9)
    pos = (y[:, None] == y[None]).to(out.dtype).fill_diagonal_(0)
    logp = logits.log_softmax(1)
    return -((pos * logp).sum(1) / pos.sum(1).clamp(min=1)).mean()


def soft_f1(out: Tensor, y: Tensor) -> Tensor:
    """``1 - soft F1`` over the batch, macro over the classes (a batch-level metric as the loss)."""
    p, t = out.softmax(-1), F.one_hot(y, out.shape[-1]).to(out.dtype)
    tp, fp, fn = (p * t).sum(0), (p * (1 - t)).sum(0), ((1 - p) * t).sum(0)
    return 1 - (2 * tp / (2 * tp + fp + fn + 1e-8)).mean()


def ohem(out: Tensor, y: Tensor, k: int = 2) -> Tensor:
    """Online hard example mining: the mean of the ``k`` largest per-sample cross entropies of the batch."""
    return F.cross_entropy(out, y, reduction="none").topk(k).values.mean()


def pairs_views() -> nn.Module:
    """A shared tanh encoder over each of a sample's views, ``x (n, k, 4) -> (n, k, 3)``."""
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def quantile_heads() -> nn.Module:
    return head(out=3)


class DetachedNorm(nn.Module):
    """A cosine head whose weight rows are divided by their norms taken under ``.detach()`` (a stop-gradient
    normaliser): the output moves with the norms, the gradient does not see them."""

    def __init__(self):
        super().__init__()
        self.a, self.w = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        w = self.w / self.w.norm(dim=1, keepdim=True).detach()
        return torch.tanh(self.a(x)) @ w.T * 3


class ProbabilitiesInEval(nn.Module):
    """Logits in training mode, ``softmax`` probabilities in evaluation mode (a common inference convenience)."""

    def __init__(self):
        super().__init__()
        self.net = head()

    def forward(self, x):
        out = self.net(x)
        return out if self.training else out.softmax(-1)


class FrozenCenter(nn.Module):
    """A running centre of the hidden units kept as ``nn.Parameter(requires_grad=False)`` (or a plain tensor
    attribute) and moved in place by every training forward, as EMA codebooks of VQ-VAEs are."""

    def __init__(self, as_parameter: bool = True):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        center = torch.zeros(8)
        self.center = nn.Parameter(center, requires_grad=False) if as_parameter else center

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.training:
            with torch.no_grad():
                self.center.mul_(0.5).add_(0.5 * h.mean(0))
        return self.b(h - self.center)


class BatchStatsInEval(nn.Module):
    """``BatchNorm1d(track_running_stats=False)``: batch statistics in evaluation mode too (``momentum=None`` with
    ``cumulative=True``: the cumulative average of ``BatchNorm1d(momentum=None)`` instead)."""

    def __init__(self, cumulative: bool = False):
        super().__init__()
        bn = nn.BatchNorm1d(8, momentum=None) if cumulative else nn.BatchNorm1d(8, track_running_stats=False)
        self.a, self.bn, self.b = nn.Linear(4, 8), bn, nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.bn(self.a(x))))


class DropoutLSTM(nn.Module):
    """A two-layer ``nn.LSTM(dropout=0.3)`` (dropout between its layers, drawn inside torch's LSTM) or GRU."""

    def __init__(self, kind: str = "lstm"):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(3, 4, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class ParameterContainers(nn.Module):
    """Weights held in ``nn.ParameterList`` and ``nn.ParameterDict``, layers in ``nn.ModuleDict``."""

    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(4, 6) / 2), nn.Parameter(torch.randn(6, 6) / 3)])
        self.bs = nn.ParameterDict({"first": nn.Parameter(torch.zeros(6)), "second": nn.Parameter(torch.zeros(6))})
        self.heads = nn.ModuleDict({"out": nn.Linear(6, 3)})

    def forward(self, x):
        h = torch.tanh(x @ self.ws[0] + self.bs["first"])
        h = torch.tanh(h @ self.ws[1] + self.bs["second"])
        return self.heads["out"](h)


class VAEKLColumn(VAEKLAttribute):
    """The fix the check names: the per-sample KL term returned as a fourth output column."""

    def forward(self, x):
        logits = super().forward(x)
        h = torch.tanh(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)
        return torch.cat([logits, kl[:, None]], 1)


def ce_plus_kl_column(out: Tensor, y: Tensor) -> Tensor:
    """Cross entropy of the first three columns plus 0.1 times the mean of the KL column."""
    return F.cross_entropy(out[:, :3], y) + 0.1 * out[:, 3].mean()
