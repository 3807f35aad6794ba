"""Models of the ninth round of cases (tests/_round9_cases.py), written as a new user would from docs/quickstart.md
and docs/guide_own_model.md, each small and float64-ready (those that take or change gradients in ``forward`` are in
tests/_round9_functions.py).

Inputs: ``XV`` (n, 4) vectors, ``XI`` (n, 1, 6, 6) images, ``XS`` (n, 6, 3) sequences (read as 6 graph nodes by
tests/_round9_graphs.py), ``XT`` (n, 5) token ids below 7 (tests/_round5_kit.py), and tests/_round7_models.py's
``XA`` (n, 1, 12) signals.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from _round5_kit import KinkMarks
from torch import Tensor, nn


class SelectiveScan(nn.Module):
    """A Mamba-style selective state space block by hand: input-dependent step ``softplus``, ``A = -exp(A_log)``,
    the decays ``exp(cumsum_t - cumsum_s)`` of the lower triangle (``masked_fill(-inf)`` above it), the state read by
    an input-dependent ``C``, plus a skip; mean over time."""

    def __init__(self, d: int = 4, n: int = 2):
        super().__init__()
        self.inp, self.dt, self.B, self.C = nn.Linear(3, d), nn.Linear(d, d), nn.Linear(d, n), nn.Linear(d, n)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.skip, self.head = nn.Parameter(torch.ones(d)), nn.Linear(d, 3)

    def forward(self, x):
        u = torch.tanh(self.inp(x))                                        # (n, L, d)
        delta = F.softplus(self.dt(u))
        cum = torch.cumsum(delta[..., None] * -torch.exp(self.A_log), dim=1)  # (n, L, d, N)
        seg = cum[:, :, None] - cum[:, None, :]                            # (n, t, s, d, N)
        L = x.shape[1]
        upper = ~torch.ones(L, L, dtype=torch.bool).tril()
        decay = torch.exp(seg.masked_fill(upper[:, :, None, None], float("-inf")))
        drive = (delta * u)[..., None] * self.B(u)[:, :, None, :]          # (n, L, d, N)
        state = (decay * drive[:, None]).sum(2)                            # (n, t, d, N)
        y = (state * self.C(u)[:, :, None, :]).sum(-1) + self.skip * u
        return self.head(y.mean(1))


class RNNCellLoop(nn.Module):
    """``nn.RNNCell(nonlinearity="relu")`` unrolled over the sequence by hand, a Linear head on the last state; the
    cell's pre-activations go through ``marks`` (tests/_round5_kit.py ``KinkMarks``) for the reference's panels."""

    def __init__(self):
        super().__init__()
        self.cell, self.head, self.marks = nn.RNNCell(3, 5, nonlinearity="relu"), nn.Linear(5, 3), KinkMarks()

    def forward(self, x):
        h = x.new_zeros(len(x), 5)
        c = self.cell
        for t in range(x.shape[1]):
            self.marks(F.linear(x[:, t], c.weight_ih, c.bias_ih) + F.linear(h, c.weight_hh, c.bias_hh))
            h = c(x[:, t], h)
        return self.head(h)


class FNO2d(nn.Module):
    """A Fourier neural operator layer as the FNO repository writes it: ``rfft2``, the low modes times complex
    weights (``torch.complex`` of real pairs) written into a zero spectrum by slice assignment, ``irfft2(s=...)``,
    plus a 1x1 convolution; GELU, mean over the pixels. With ``slices=False`` the spectrum is padded out of place by
    ``F.pad`` (the fix its refusal names)."""

    def __init__(self, width: int = 2, modes: tuple[int, int] = (3, 2), slices: bool = True):
        super().__init__()
        self.slices = slices
        self.lift, self.w, self.head, self.modes = nn.Conv2d(1, width, 1), nn.Conv2d(width, width, 1), \
            nn.Linear(width, 3), modes
        self.wr = nn.Parameter(torch.randn(width, width, *modes) * 0.3)
        self.wi = nn.Parameter(torch.randn(width, width, *modes) * 0.3)

    def forward(self, x):
        h = self.lift(x)
        spec = torch.fft.rfft2(h)
        mx, my = self.modes
        mixed = torch.einsum("bixy,ioxy->boxy", spec[:, :, :mx, :my], torch.complex(self.wr, self.wi))
        if self.slices:
            out = torch.zeros(*spec.shape, dtype=spec.dtype)
            out[:, :, :mx, :my] = mixed
        else:
            out = F.pad(mixed, (0, spec.shape[-1] - my, 0, spec.shape[-2] - mx))
        y = torch.fft.irfft2(out, s=h.shape[-2:])
        return self.head(F.gelu(y + self.w(h)).mean((2, 3)))


class UnfoldFold(nn.Module):
    """A convolution written as ``F.unfold`` and a matrix product, ReLU, and a transposed convolution written as a
    matrix product and ``F.fold`` (overlap-add); a Linear head on the image."""

    def __init__(self):
        super().__init__()
        self.w, self.v = nn.Parameter(torch.randn(3, 9) * 0.4), nn.Parameter(torch.randn(9, 3) * 0.4)
        self.relu, self.head = nn.ReLU(), nn.Linear(36, 3)

    def forward(self, x):
        h = self.relu(self.w @ F.unfold(x, 3, padding=1))                  # (n, 3, 36)
        y = F.fold(self.v @ h, (6, 6), 3, padding=1)                        # (n, 1, 6, 6)
        return self.head(torch.tanh(y).flatten(1))


class WhereUnusedNaN(nn.Module):
    """``torch.where(h > 0, sqrt(1 + h) - 1, 0.5 h)``: the unused branch is NaN where ``h < -1``, so its gradient is
    ``0 * NaN``; with ``safe`` the where is applied to ``sqrt``'s input too (the double-where idiom)."""

    def __init__(self, safe: bool = False):
        super().__init__()
        self.a, self.b, self.safe, self.marks = nn.Linear(4, 8), nn.Linear(8, 3), safe, KinkMarks()

    def forward(self, x):
        h = self.marks(2 * self.a(x))
        inner = torch.where(h > 0, h, torch.zeros_like(h)) if self.safe else h
        return self.b(torch.where(h > 0, torch.sqrt(1 + inner) - 1, 0.5 * h))


class QRProjection(nn.Module):
    """Hidden units projected on the orthonormal columns ``Q`` of ``torch.linalg.qr`` of a learned ``(6, 3)``."""

    def __init__(self):
        super().__init__()
        self.a, self.m, self.head = nn.Linear(4, 6), nn.Parameter(torch.randn(6, 3)), nn.Linear(3, 3)

    def forward(self, x):
        q, _ = torch.linalg.qr(self.m)
        return self.head(torch.tanh(self.a(x)) @ q)


class SpectralPool(nn.Module):
    """Per-sequence second moments of projected steps, ``(3, 3)``, pooled by ``torch.linalg.eigvalsh`` (log of the
    eigenvalues) and by ``torch.linalg.svdvals`` of the projected sequence."""

    def __init__(self):
        super().__init__()
        self.p, self.head = nn.Linear(3, 3), nn.Linear(6, 3)

    def forward(self, x):
        z = torch.tanh(self.p(x))                                           # (n, 6, 3)
        cov = z.transpose(1, 2) @ z / z.shape[1] + 0.1 * torch.eye(3, dtype=z.dtype)
        return self.head(torch.cat([torch.linalg.eigvalsh(cov).log(), torch.linalg.svdvals(z)], 1))


class CholeskyKernelHead(nn.Module):
    """A kernel head: RBF similarities to 5 learned inducing points, whitened by ``torch.cholesky_solve`` with the
    ``torch.linalg.cholesky`` factor of their Gram matrix plus jitter."""

    def __init__(self):
        super().__init__()
        self.z, self.log_ls, self.head = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.zeros(())), \
            nn.Linear(5, 3)

    def rbf(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * self.log_ls.exp() ** 2))

    def forward(self, x):
        gram = self.rbf(self.z, self.z) + 0.1 * torch.eye(5, dtype=x.dtype)
        chol = torch.linalg.cholesky(gram)
        return self.head(torch.cholesky_solve(self.rbf(x, self.z).T, chol).T)


class LstsqHead(nn.Module):
    """Hidden units fitted by least squares on a learned basis: ``torch.linalg.lstsq(A, h.T).solution``."""

    def __init__(self):
        super().__init__()
        self.a, self.basis, self.head = nn.Linear(4, 6), nn.Parameter(torch.randn(6, 3)), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(torch.linalg.lstsq(self.basis, h.T).solution.T)


class PinvHead(nn.Module):
    """The same least-squares fit written with ``torch.linalg.pinv``."""

    def __init__(self):
        super().__init__()
        self.a, self.basis, self.head = nn.Linear(4, 6), nn.Parameter(torch.randn(6, 3)), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) @ torch.linalg.pinv(self.basis).T)


class KronLinear(nn.Module):
    """A Kronecker-factored layer, ``W = torch.kron(A, B)`` of shape (6, 4), tanh, Linear head."""

    def __init__(self):
        super().__init__()
        self.A, self.B = nn.Parameter(torch.randn(2, 2) * 0.7), nn.Parameter(torch.randn(3, 2) * 0.7)
        self.bias, self.head = nn.Parameter(torch.zeros(6)), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ torch.kron(self.A, self.B).T + self.bias))


def _member() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


class VmapEnsemble(nn.Module):
    """torch's model-ensembling tutorial inside one module: 3 members' weights stacked by
    ``torch.func.stack_module_state`` (held as Parameters), run by ``torch.func.vmap`` of ``functional_call`` on a
    ``meta`` copy of a member; the members' logits averaged."""

    def __init__(self, k: int = 3):
        super().__init__()
        members = [_member() for _ in range(k)]
        stacked, _ = torch.func.stack_module_state(members)
        self.names = list(stacked)
        self.stacked = nn.ParameterList([nn.Parameter(stacked[n].detach().clone()) for n in self.names])
        self.base = (copy.deepcopy(members[0]).to("meta"),)   # a tuple: not registered as a submodule

    def forward(self, x):
        def one(*weights):
            return torch.func.functional_call(self.base[0], dict(zip(self.names, weights)), (x,))
        return torch.func.vmap(one)(*self.stacked).mean(0)


class BucketizeEmbedding(nn.Module):
    """A hidden unit cut into 4 buckets by ``torch.bucketize`` whose ids index an embedding added to the features."""

    def __init__(self):
        super().__init__()
        self.a, self.emb, self.b = nn.Linear(4, 6), nn.Embedding(4, 6), nn.Linear(6, 3)
        self.register_buffer("edges", torch.tensor([-0.5, 0.0, 0.5]))

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h) + self.emb(torch.bucketize(h[:, 0].contiguous(), self.edges)))


class PolarFeatures(nn.Module):
    """Pairs of hidden units as polar coordinates: ``torch.hypot`` and the angle ``torch.atan2`` (which jumps by
    ``2 pi`` where a pair crosses the negative x axis)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.cat([torch.hypot(h[:, :3], h[:, 3:]), torch.atan2(h[:, 3:], h[:, :3])], 1))


class LogCumSumExp(nn.Module):
    """``torch.logcumsumexp`` over time (a soft running maximum), its last and mean steps to a Linear head."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(3, 4), nn.Linear(8, 3)

    def forward(self, x):
        c = torch.logcumsumexp(self.a(x), dim=1)
        return self.head(torch.cat([c[:, -1], c.mean(1)], 1))


class StickBreaking(nn.Module):
    """Stick-breaking mixture weights, ``v_k prod_{j<k} (1 - v_j)`` with ``torch.cumprod``, over 4 learned logit
    prototypes."""

    def __init__(self):
        super().__init__()
        self.a, self.protos = nn.Linear(4, 3), nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        v = torch.sigmoid(self.a(x))                                        # (n, 3)
        rest = torch.cumprod(1 - v, dim=1)
        weights = torch.cat([v[:, :1], v[:, 1:] * rest[:, :-1], rest[:, -1:]], 1)   # (n, 4), sums to 1
        return weights @ self.protos


class Pads(nn.Module):
    """``nn.CircularPad2d``, ``nn.ReplicationPad2d`` and ``nn.ReflectionPad2d`` before unpadded 3x3 convolutions,
    ReLU; a Linear head."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.CircularPad2d(1), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.ReplicationPad2d(1),
                                 nn.Conv2d(2, 2, 3), nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(2, 1, 3))
        self.head = nn.Linear(36, 3)

    def forward(self, x):
        return self.head(self.net(x).flatten(1))


class MaskTokens(nn.Module):
    """Tokens of id 0 replaced by a learned mask vector with ``Tensor.masked_scatter`` (as masked-autoencoder code
    does), mean over positions, Linear head."""

    def __init__(self):
        super().__init__()
        self.emb, self.mask_vec, self.head = nn.Embedding(7, 4), nn.Parameter(torch.randn(4)), nn.Linear(4, 3)

    def forward(self, t):
        e = self.emb(t)
        mask = (t == 0)[..., None].expand_as(e)
        return self.head(torch.tanh(e.masked_scatter(mask, self.mask_vec.expand_as(e))).mean(1))


class GroupedDilatedTranspose(nn.Module):
    """``ConvTranspose2d(stride=2, groups=2, dilation=2, output_padding=1)`` after a 3x3 convolution, ReLU, average
    pooling, Linear head."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.t = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
        self.relu, self.head = nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.relu(self.t(torch.tanh(self.c(x)))).mean((2, 3)))


class SpectrogramFilter(nn.Module):
    """``torch.stft`` of the raw signal, a learned complex gain per frequency (``torch.complex`` of real pairs),
    ``torch.istft`` back to 12 samples, tanh, Linear head."""

    def __init__(self):
        super().__init__()
        self.gr, self.gi = nn.Parameter(torch.ones(3, 1)), nn.Parameter(torch.zeros(3, 1))
        self.head = nn.Linear(12, 3)
        self.register_buffer("window", torch.hann_window(4))

    def forward(self, x):
        kw = {"n_fft": 4, "hop_length": 2, "window": self.window}
        spec = torch.stft(x[:, 0], return_complex=True, **kw)
        y = torch.istft(spec * torch.complex(self.gr, self.gi), length=x.shape[-1], **kw)
        return self.head(torch.tanh(y))


class CumulativeBatchNorm(nn.Module):
    """``BatchNorm1d(momentum=None)``: running statistics as a cumulative average, whose factor
    ``1 / num_batches_tracked`` reads the integer buffer the forward counts up."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=None), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.bn(self.a(x))))


class CondBranch(nn.Module):
    """``torch.cond`` on a learned gate's sign choosing between a tanh and a sine branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.gate = nn.Linear(4, 6), nn.Linear(6, 3), nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.b(torch.cond(self.gate > 0, lambda t: torch.tanh(t), lambda t: torch.sin(t), (self.a(x),)))


class NumpyRoundTrip(nn.Module):
    """Hidden units divided by a sum of exponentials computed in NumPy (``h.detach().numpy()``, back by
    ``torch.from_numpy``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h / torch.from_numpy(np.exp(h.detach().cpu().numpy()).sum(1, keepdims=True)))


class ComplexLogits(nn.Module):
    """Complex outputs: the first 3 coefficients of ``torch.fft.rfft`` of the hidden units (a loss on their
    magnitudes)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)

    def forward(self, x):
        return torch.fft.rfft(torch.tanh(self.a(x)))[:, :3]


class KAN(nn.Module):
    """A Kolmogorov-Arnold network 4-5-3: on every edge a cubic B-spline of ``tanh(x)`` on a uniform grid of 5
    cells (bases by the Cox-de Boor recursion from the comparisons ``t_i <= x < t_{i+1}``), plus a SiLU base
    layer."""

    def __init__(self, dims: tuple[int, ...] = (4, 5, 3), grid: int = 5, k: int = 3):
        super().__init__()
        self.register_buffer("t", torch.arange(-k, grid + k + 1) * (2.0 / grid) - 1.0)
        self.k = k
        self.coef = nn.ParameterList([nn.Parameter(torch.randn(o, i, grid + k) * 0.1)
                                      for i, o in zip(dims, dims[1:])])
        self.base = nn.ModuleList([nn.Linear(i, o) for i, o in zip(dims, dims[1:])])

    def bases(self, x: Tensor) -> Tensor:
        """``(n, i) -> (n, i, grid + k)``: the B-spline bases of degree ``k`` at ``x``."""
        t, x = self.t, x[..., None]
        b = ((x >= t[:-1]) & (x < t[1:])).to(x.dtype)
        for p in range(1, self.k + 1):
            b = ((x - t[:-(p + 1)]) / (t[p:-1] - t[:-(p + 1)]) * b[..., :-1]
                 + (t[p + 1:] - x) / (t[p + 1:] - t[1:-p]) * b[..., 1:])
        return b

    def forward(self, x):
        for coef, base in zip(self.coef, self.base):
            x = base(F.silu(x)) + torch.einsum("nib,oib->no", self.bases(torch.tanh(x)), coef)
        return x


class PACT(nn.Module):
    """PACT quantisation's clipped activation without the rounding: ``torch.clamp(h, min=0, max=alpha)`` with a
    learned bound ``alpha`` (a tensor ``max``); ``h`` and ``alpha - h`` go through ``marks`` for the reference."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.marks = nn.Linear(4, 8), nn.Linear(8, 3), KinkMarks()
        self.alpha = nn.Parameter(torch.tensor(0.8))

    def forward(self, x):
        h = self.a(x)
        self.marks(torch.cat([h, self.alpha - h], 1))
        return self.b(torch.clamp(h, min=torch.zeros((), dtype=h.dtype), max=self.alpha))


class RenormPrototypes(nn.Module):
    """Rows of a weight capped to norm 0.7 by ``Tensor.renorm`` in the forward (a kink where a row's norm crosses
    0.7, through ``marks`` for the reference), tanh, and Euclidean distances (``F.pairwise_distance``) to 3 learned
    prototypes as logits."""

    def __init__(self):
        super().__init__()
        self.a, self.protos, self.marks = nn.Linear(4, 5), nn.Parameter(torch.randn(3, 5)), KinkMarks()

    def forward(self, x):
        self.marks(self.a.weight.norm(dim=1)[None].expand(len(x), -1) - 0.7)
        h = torch.tanh(F.linear(x, self.a.weight.renorm(2, 0, 0.7), self.a.bias))
        return -torch.stack([F.pairwise_distance(h, p.expand_as(h)) for p in self.protos], 1)


class SqrtUntilFar(nn.Module):
    """``torch.where(h > -5, sqrt(h + 10), linear continuation)``: the sqrt branch, unused below -5, is NaN only
    below -10, which the training inputs never reach and 100 times a held-out input does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h, r5 = self.a(x), 5 ** 0.5
        return self.b(torch.where(h > -5, torch.sqrt(h + 10), r5 + (h + 5) / (2 * r5)))


class LengthFeature(nn.Module):
    """Two ReLU units and their Euclidean length as features: ``sqrt((h ** 2).sum())`` written by hand, or with
    ``vector_norm`` ``torch.linalg.vector_norm``; :func:`all_off` gives inputs where both units are 0."""

    def __init__(self, vector_norm: bool = False):
        super().__init__()
        self.a, self.b, self.relu, self.vector_norm = nn.Linear(4, 2), nn.Linear(3, 3), nn.ReLU(), vector_norm

    def forward(self, x):
        h = self.relu(self.a(x) + 2.0)
        n = torch.linalg.vector_norm(h, dim=-1, keepdim=True) if self.vector_norm else (h ** 2).sum(-1, True).sqrt()
        return self.b(torch.cat([h, n], -1))


def all_off(model: LengthFeature) -> Tensor:
    """Two inputs far along minus the sum of ``model.a``'s weight rows, where both ReLU units are 0."""
    w = model.a.weight.detach().sum(0)
    return torch.stack([-50 * w, -80 * w])


#: A temperature kept as a module-level global, doubled after every step by :func:`double_temperature`.
TEMPERATURE = [1.0]


class GlobalTemperature(nn.Module):
    """Logits divided by the module-level ``TEMPERATURE[0]`` (neither a parameter, a buffer nor an attribute)."""

    def __init__(self):
        super().__init__()
        TEMPERATURE[0] = 1.0
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) / TEMPERATURE[0]


def double_temperature(step: int, model: nn.Module) -> None:
    TEMPERATURE[0] *= 2
