"""Models of the eleventh round (tests/_round11_cases.py): estimators whose gradient is not the derivative of their
forward (straight-through, vector quantisation), draws in training forwards, pruning, layers in one and three
dimensions, special functions and linear algebra torch users reach for, each small enough for the slow float64
reference of tests/replay_reference.py.

Inputs are tests/_round5_kit.py's: ``XV`` ``(n, 4)`` vectors, ``XS`` ``(n, 6, 3)`` sequences, ``XI``
``(n, 1, 6, 6)`` images. Where a kink is computed inside ``forward`` the model passes its pre-activations through a
:class:`KinkMarks` module so that tests/_round5_kit.py's ``KinkReference`` splits its panels there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _round5_kit import KinkMarks
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune


class TanhBase(nn.Module):
    """``x (n, 4) -> tanh(a x)`` (6 units) ``-> features(h) -> b``: the models below override :meth:`features`."""

    width = 6

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(self.width, 3)

    def features(self, h: Tensor) -> Tensor:
        return h

    def forward(self, x):
        return self.b(self.features(torch.tanh(self.a(x))))


class StraightThrough(TanhBase):
    """A categorical bottleneck of 3 codes read by a straight-through estimator: the one-hot of ``argmax`` (by
    ``Tensor.scatter``) in the forward, the softmax's gradient in the backward (``hard - soft.detach() + soft``).
    ``soft_in_eval``: the evaluation forward returns the softmax (the model explained), the training forward the
    one-hot."""

    width = 9

    def __init__(self, soft_in_eval: bool = True):
        super().__init__()
        self.q, self.soft_in_eval = nn.Linear(6, 3), soft_in_eval

    def features(self, h):
        soft = torch.softmax(2 * self.q(h), -1)
        if self.soft_in_eval and not self.training:
            code = soft
        else:
            hard = torch.zeros_like(soft).scatter(-1, soft.argmax(-1, keepdim=True), 1.0)
            code = hard - soft.detach() + soft
        return torch.cat([h, code], -1)


class VectorQuantiser(nn.Module):
    """A VQ-VAE bottleneck (van den Oord et al. 2017): the encoder's output ``z_e`` (2 units) snaps to its nearest of
    4 codebook rows (``argmin`` of the distances), passed on by the straight-through ``z_e + (e - z_e).detach()``;
    the outputs are 3 logits and, as a fourth column, the per-sample codebook and commitment terms
    ``|sg(z_e) - e|^2 + 0.25 |z_e - sg(e)|^2`` that :func:`vq_loss` adds to the cross entropy."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 2), nn.Linear(2, 3)
        self.codebook = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        z = torch.tanh(self.enc(x))
        e = self.codebook[((z[:, None, :] - self.codebook[None]) ** 2).sum(-1).argmin(-1)]
        commit = ((z.detach() - e) ** 2).sum(-1) + 0.25 * ((z - e.detach()) ** 2).sum(-1)
        return torch.cat([self.dec(z + (e - z).detach()), commit[:, None]], -1)


def vq_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross entropy of the first 3 columns plus the VQ terms of the fourth, a mean over the batch."""
    return F.cross_entropy(out[:, :3], y) + out[:, 3].mean()


class GumbelSoft(TanhBase):
    """``F.gumbel_softmax(q(h), tau=0.5, hard=False)`` in training (a relaxed sample), its softmax at ``tau`` in
    evaluation."""

    width = 9

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 3)

    def features(self, h):
        logits = self.q(h)
        code = F.gumbel_softmax(logits, tau=0.5) if self.training else torch.softmax(logits / 0.5, -1)
        return torch.cat([h, code], -1)


class SampledExpert(nn.Module):
    """Two tanh experts; in training each sample is routed to one drawn by ``torch.multinomial`` from the gate's
    probabilities, the chosen expert's output scaled by its probability; in evaluation the gate's mixture."""

    def __init__(self):
        super().__init__()
        self.gate, self.e0, self.e1, self.head = nn.Linear(4, 2), nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        p = torch.softmax(self.gate(x), -1)
        experts = torch.stack([torch.tanh(self.e0(x)), torch.tanh(self.e1(x))], 1)
        if self.training:
            pick = torch.multinomial(p, 1)
            h = experts.gather(1, pick[:, :, None].expand(-1, 1, 6))[:, 0] * p.gather(1, pick)
        else:
            h = (experts * p[:, :, None]).sum(1)
        return self.head(h)


class NoisyUnits(TanhBase):
    """Noise drawn in the training forward only: ``torch.normal(h, 0.1)`` (torch's derivative of the draw is 0 in
    its mean: the layers before learn through the second term alone) plus ``h`` times an exponential draw
    ``torch.empty_like(h).exponential_()`` scaled by 0.1."""

    def features(self, h):
        if not self.training:
            return 1.1 * h
        return 0.5 * torch.normal(h, 0.1) + 0.5 * h + 0.1 * h * torch.empty_like(h).exponential_()


class StochasticBinary(TanhBase):
    """Stochastic binary units: in training ``torch.bernoulli(sigmoid(q h))`` passed on by the straight-through
    ``b - p.detach() + p`` (Bengio et al. 2013), in evaluation their probabilities ``p``."""

    width = 9

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 3)

    def features(self, h):
        p = torch.sigmoid(self.q(h))
        return torch.cat([h, torch.bernoulli(p) - p.detach() + p if self.training else p], -1)


class PrunedConv(nn.Module):
    """A tanh CNN on ``XI`` pruned before training: its convolution by ``prune.ln_structured`` (one output channel
    of three, by L2 norm), its head by ``prune.random_unstructured`` (40 %): both keep ``weight_orig`` and a
    ``weight_mask`` buffer, the weight recomputed by a forward pre-hook."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 3, 3), nn.Linear(48, 3)
        prune.ln_structured(self.conv, "weight", amount=1, n=2, dim=0)
        prune.random_unstructured(self.head, "weight", amount=0.4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class SyncBN(nn.Module):
    """``nn.SyncBatchNorm`` between two linear layers, in one process on the CPU (torch runs it as batch norm)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 6), nn.SyncBatchNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.bn(self.a(x))))


class FunctionalBN(nn.Module):
    """Batch norm written as a call: ``F.batch_norm`` with the module's own running-statistics buffers and
    ``training=self.training`` (a model ported from a functional code base)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("mean", torch.zeros(6))
        self.register_buffer("var", torch.ones(6))
        self.gamma, self.beta = nn.Parameter(torch.ones(6)), nn.Parameter(torch.zeros(6))

    def forward(self, x):
        h = F.batch_norm(self.a(x), self.mean, self.var, self.gamma, self.beta, training=self.training, momentum=0.3)
        return self.b(torch.tanh(h))


class Sequence1d(nn.Module):
    """One-dimensional layers on ``XS`` ``(n, 6, 3)``: ``ConvTranspose1d(stride=2)``, ``LPPool1d(2, 2)``,
    ``AdaptiveMaxPool1d(2)``, ``F.channel_shuffle``, ReLU; the pooling's kinks marked."""

    def __init__(self):
        super().__init__()
        self.up, self.conv = nn.ConvTranspose1d(3, 4, 3, stride=2), nn.Conv1d(4, 4, 3)
        self.lp, self.pool, self.relu = nn.LPPool1d(2, 2), nn.AdaptiveMaxPool1d(2), nn.ReLU()
        self.head, self.marks = nn.Linear(8, 3), KinkMarks()

    def forward(self, x):
        h = torch.tanh(self.up(x.transpose(1, 2)))
        h = self.relu(self.conv(F.channel_shuffle(self.lp(h), 2)))
        self.marks(_window_ties(h.unsqueeze(-2), (1, 2)))  # AdaptiveMaxPool1d(2) of 4 steps: windows of 2
        return self.head(self.pool(h).flatten(1))


def _window_ties(h: Tensor, window: tuple[int, int]) -> Tensor:
    """The differences of every pair of entries inside each non-overlapping ``window`` of ``h`` ``(n, c, H, W)``: a
    max pool's kinks (two entries of a window tying), for ``KinkReference``."""
    cells = F.unfold(h, window, stride=window)  # (n, c * k, windows)
    k = window[0] * window[1]
    cells = cells.reshape(h.shape[0], h.shape[1], k, -1)
    return (cells[:, :, :, None] - cells[:, :, None, :]).flatten(1)


class Volume3d(nn.Module):
    """Three-dimensional layers on ``XI`` read as a ``(n, 1, 2, 3, 6)`` volume: ``ConvTranspose3d``,
    ``MaxPool3d``, ``F.interpolate(mode="trilinear")``, ``AdaptiveAvgPool3d``, ``nn.Softmax2d`` over the channels;
    the pooling's kinks marked."""

    def __init__(self):
        super().__init__()
        self.up, self.conv = nn.ConvTranspose3d(1, 2, 2), nn.Conv3d(2, 2, 2)
        self.pool, self.avg, self.head = nn.MaxPool3d((1, 2, 2)), nn.AdaptiveAvgPool3d((1, 2, 2)), nn.Linear(16, 3)
        self.soft, self.marks = nn.Softmax2d(), KinkMarks()

    def forward(self, x):
        h = torch.tanh(self.up(x.reshape(-1, 1, 2, 3, 6)))
        h = torch.tanh(self.conv(h))
        self.marks(_window_ties(h.flatten(1, 2), (2, 2)))  # MaxPool3d((1, 2, 2)): 2x2 windows of each slice
        h = self.pool(h)
        h = F.interpolate(h, size=(2, 3, 4), mode="trilinear", align_corners=False)
        s = self.soft(h.flatten(2, 3)).reshape(h.shape)
        return self.head(torch.cat([self.avg(h), self.avg(s)], 1).flatten(1))


class AntialiasShuffle(nn.Module):
    """Images downsampled by ``F.interpolate(mode="bicubic", antialias=True)``, up again by ``F.pixel_shuffle`` of a
    convolution, ``F.pixel_unshuffle`` into the head."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(36, 3)

    def forward(self, x):
        small = F.interpolate(x, size=(3, 3), mode="bicubic", antialias=True, align_corners=False)
        h = torch.tanh(F.pixel_shuffle(self.conv(small), 2))
        return self.head(F.pixel_unshuffle(h, 2).flatten(1))


class SpecialFunctions2(TanhBase):
    """``torch.special`` functions not met before: ``i0``, ``i1``, ``i1e``, ``erfcx``, ``log_ndtr``, ``ndtri`` of a
    sigmoid, ``polygamma(1, .)``, ``multigammaln``, ``entr``, and ``digamma`` of a parameter."""

    width = 10

    def __init__(self):
        super().__init__()
        self.shape = nn.Parameter(torch.tensor(1.5))

    def features(self, h):
        u = torch.sigmoid(2 * h)
        terms = [torch.special.i0(h).mean(-1), torch.special.i1(h).mean(-1), torch.special.i1e(h).mean(-1),
                 torch.special.erfcx(h).mean(-1), torch.special.log_ndtr(h).mean(-1),
                 torch.special.ndtri(0.1 + 0.8 * u).mean(-1), torch.polygamma(1, 1 + u).mean(-1),
                 torch.special.multigammaln(2 + u, 2).mean(-1), torch.special.entr(u).mean(-1),
                 torch.digamma(self.shape.abs() + 1 + u[:, 0])]
        return torch.stack(terms, -1)


class LinalgMore(TanhBase):
    """Per-sample 3x3 matrices ``M = I + 0.3 tanh(A x)`` into ``torch.linalg.matrix_exp``, ``inv``,
    ``solve_triangular``, ``lu_factor`` with ``lu_solve``, ``matrix_norm(ord="nuc")``, ``multi_dot`` (per sample by
    ``torch.func.vmap``), ``vecdot``,
    ``householder_product`` and ``torch.tensordot``."""

    width = 8

    def __init__(self):
        super().__init__()
        self.m, self.v = nn.Linear(6, 9), nn.Parameter(torch.randn(3, 2) * 0.3)

    def features(self, h):
        m = torch.eye(3, dtype=h.dtype) + 0.3 * torch.tanh(self.m(h)).reshape(-1, 3, 3)
        ones = torch.ones(m.shape[0], 3, 1, dtype=h.dtype)
        lu = torch.linalg.lu_factor(m)
        feats = [torch.linalg.matrix_exp(0.5 * m).diagonal(dim1=-2, dim2=-1).sum(-1),
                 torch.linalg.inv(m).sum((-1, -2)),
                 torch.linalg.solve_triangular(m.tril(), ones, upper=False).sum((-1, -2)),
                 torch.linalg.lu_solve(*lu, ones).sum((-1, -2)), torch.linalg.matrix_norm(m, ord="nuc"),
                 torch.func.vmap(lambda a: torch.linalg.multi_dot([a[0:1], a, a[:, 0:1]]))(m).flatten(),
                 torch.linalg.vecdot(m[:, 0], m[:, 1]),
                 torch.tensordot(torch.linalg.householder_product(self.v, torch.tensor([1.2, 0.8], dtype=h.dtype)),
                                 m[:, :, :2], dims=([0, 1], [1, 2]))]
        return torch.stack(feats, -1)


class ElementwiseMore(TanhBase):
    """``torch.logaddexp``, ``cummin`` (values), ``ldexp``, ``quantile``, ``nanmedian`` (values), ``trapezoid``,
    ``cumulative_trapezoid`` and ``nan_to_num`` of hidden units; the kinks of ``cummin``, ``quantile`` and
    ``nanmedian`` (pairs of units crossing) marked."""

    width = 7

    def __init__(self):
        super().__init__()
        self.marks = KinkMarks()

    def features(self, h):
        self.marks((h[:, :, None] - h[:, None, :]).flatten(1))
        two = torch.full_like(h, 2).long()
        return torch.stack([torch.logaddexp(h[:, 0], h[:, 1]), torch.cummin(h, -1).values[:, -1],
                            torch.ldexp(h, two).mean(-1), torch.quantile(h, 0.3, dim=-1),
                            torch.nanmedian(h, -1).values, torch.trapezoid(h, dx=0.5),
                            torch.cumulative_trapezoid(h).mean(-1) + torch.nan_to_num(h).mean(-1)], -1)


class PackedProjLSTM(nn.Module):
    """``nn.LSTM(proj_size=2)`` on ``pack_padded_sequence`` (``enforce_sorted=False``), read through ``h_n``.
    ``lengths``: ``"position"`` takes each row's length from its position in the batch, ``3 + arange(n) % 4`` (a
    sample's output depends on where its batch put it); ``"padding"`` from the input's own zero padding, ``(x !=
    0).any(-1).sum(1)``."""

    def __init__(self, lengths: str = "padding"):
        super().__init__()
        self.rnn, self.head, self.lengths = nn.LSTM(3, 4, proj_size=2, batch_first=True), nn.Linear(2, 3), lengths

    def forward(self, x):
        if self.lengths == "position":
            lengths = 3 + torch.arange(x.shape[0]) % 4
        else:
            lengths = (x != 0).any(-1).sum(1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


def padded(x: Tensor) -> Tensor:
    """``x`` ``(n, 6, 3)`` with row ``i`` zeroed after its first ``3 + i % 4`` steps."""
    keep = torch.arange(x.shape[1])[None, :] < (3 + torch.arange(x.shape[0]) % 4)[:, None]
    return x * keep[..., None]


class MixupInForward(TanhBase):
    """Mixup written inside the model: in training mode each row's hidden units mixed with the next row's,
    ``0.7 h_i + 0.3 h_(i+1)`` (a roll over the batch); in evaluation mode none."""

    def features(self, h):
        return 0.7 * h + 0.3 * h.roll(1, 0) if self.training else h


class _Factorised(nn.Module):
    """A parametrization of a ``(6, 4)`` weight as ``U V`` from one ``(6 + 4, 2)`` tensor (``unsafe=True``: the
    original's shape differs), with ``right_inverse`` from a weight (its rank-2 SVD factors)."""

    def forward(self, uv: Tensor) -> Tensor:
        return uv[:6] @ uv[6:].T

    def right_inverse(self, w: Tensor) -> Tensor:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return torch.cat([u[:, :2] * s[:2].sqrt(), vh[:2].T * s[:2].sqrt()], 0)


class FactorisedLinear(nn.Module):
    """The first layer's weight through :class:`_Factorised` (``parametrize.register_parametrization(...,
    unsafe=True)``), a tanh MLP otherwise."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        parametrize.register_parametrization(self.a, "weight", _Factorised(), unsafe=True)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class ChebyshevCdist(TanhBase):
    """Distances from hidden units to 3 learned prototypes by ``torch.cdist(p=inf)`` (the largest coordinate
    difference: a kink where two coordinates tie, marked)."""

    width = 9

    def __init__(self):
        super().__init__()
        self.protos, self.marks = nn.Parameter(torch.randn(3, 6) * 0.5), KinkMarks()

    def features(self, h):
        diff = (h[:, None, :] - self.protos[None]).abs()
        self.marks(torch.cat([diff.flatten(1), (diff[..., :, None] - diff[..., None, :]).flatten(1)], 1))
        return torch.cat([h, torch.cdist(h, self.protos, p=float("inf"))], -1)


class BesselFeatures(TanhBase):
    """``torch.special.bessel_j0`` and ``modified_bessel_k0`` of hidden units next to the units: torch gives these
    functions no derivative (their outputs do not require grad), so the gradient stops there while the output
    moves."""

    width = 8

    def features(self, h):
        return torch.stack([*h.unbind(-1), torch.special.bessel_j0(3 * h).mean(-1),
                            torch.special.modified_bessel_k0(h ** 2 + 0.5).mean(-1)], -1)


class BesselFixed(TanhBase):
    """:class:`BesselFeatures` with the fix: ``J0`` by its integral form ``(1/pi) int_0^pi cos(x sin t) dt`` on 64
    Gauss-Legendre nodes, ``K0`` by ``int_0^inf exp(-x cosh t) dt`` on 64 nodes of ``[0, 6]`` (float64 accurate at
    these arguments), both differentiable torch operations."""

    width = 8

    def features(self, h):
        nodes, weights = (torch.as_tensor(a, dtype=h.dtype) for a in _legendre(64))
        t = (nodes + 1) * torch.pi / 2
        j0 = (torch.cos(3 * h[..., None] * torch.sin(t)) * weights).sum(-1) / 2
        u = (nodes + 1) * 3
        k0 = (torch.exp(-(h ** 2 + 0.5)[..., None] * torch.cosh(u)) * weights).sum(-1) * 3
        return torch.stack([*h.unbind(-1), j0.mean(-1), k0.mean(-1)], -1)


def _legendre(n: int) -> tuple[list[float], list[float]]:
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    return nodes.tolist(), weights.tolist()


class NoForwardDerivative(TanhBase):
    """A call torch gives no forward-mode derivative, on hidden units: ``torch.special.zeta(3, 1 + h^2)`` (the
    Hurwitz zeta function in its second argument: backward has a derivative, forward mode none)."""

    width = 7

    def features(self, h):
        extra = torch.special.zeta(torch.full_like(h, 3.0), 1 + h ** 2).mean(-1)
        return torch.cat([h, extra[:, None]], -1)


class SavedTensorHooks(TanhBase):
    """A forward that wraps its middle layer in ``torch.autograd.graph.saved_tensors_hooks`` (packing saved
    activations, as activation-offloading code does)."""

    def __init__(self):
        super().__init__()
        self.mid = nn.Linear(6, 6)

    def features(self, h):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            return torch.tanh(self.mid(h))


def relu_bn_cnn(bias: bool = True) -> nn.Module:
    """A ReLU CNN with ``BatchNorm2d`` on ``XI``: two 3x3 convolutions, ``MaxPool2d(2)``, a head; ``bias``: whether
    the convolution before the batch norm has a bias (whose gradient the batch norm cancels)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))


def relu_dropout_mlp() -> nn.Module:
    """A ReLU MLP ``4 -> 16 -> 16 -> 3`` with ``Dropout(0.2)`` after each hidden layer."""
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 3))
