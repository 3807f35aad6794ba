"""Models of the tenth round (tests/_round10_cases.py): layers and forwards torch users write that earlier rounds left
out, each small enough for the slow float64 reference of tests/replay_reference.py (the attention models are in
tests/_round10_attention.py).

Inputs are tests/_round5_kit.py's: ``XV`` ``(n, 4)`` vectors, ``XS`` ``(n, 6, 3)`` sequences or sets, ``XI``
``(n, 1, 6, 6)`` images, ``XT`` ``(n, 5)`` token ids below 7. Where a kink is computed inside ``forward`` the model
passes its pre-activations through a :class:`KinkMarks` module so that tests/_round5_kit.py's ``KinkReference``
splits its panels there too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from _round5_kit import KinkMarks
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class EinsumEllipsis(nn.Module):
    """``torch.einsum`` with an ellipsis: ``"...ld,de->...le"`` per position, ``"b...d,hd->b...h"`` to heads, and
    ``"...i,...i->..."`` as a batched dot product."""

    def __init__(self):
        super().__init__()
        self.w, self.h = nn.Parameter(torch.randn(3, 5) * 0.5), nn.Parameter(torch.randn(2, 5) * 0.5)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = torch.tanh(torch.einsum("...ld,de->...le", x, self.w))
        heads = torch.einsum("b...d,hd->b...h", h, self.h)
        dots = torch.einsum("...i,...i->...", h[:, :-1], h[:, 1:])
        return self.head(torch.cat([heads.mean(1), 0.5 * dots], 1))


class JitIgnored(nn.Module):
    """A model whose forward calls methods marked ``@torch.jit.ignore`` and ``@torch.jit.unused`` (kept for a
    scripted export; in eager mode they are plain methods)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    @torch.jit.ignore
    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.a(x))

    @torch.jit.unused
    def mix(self, h: Tensor) -> Tensor:
        return h + 0.1 * h.roll(1, -1)

    def forward(self, x):
        return self.b(self.mix(self.features(x)))


class ParamHook(nn.Module):
    """A tanh MLP whose first weight carries a hook registered in ``__init__`` by ``Tensor.register_hook``:
    ``"read"`` logs the gradient norm and returns nothing, ``"clamp"`` clips each gradient entry to +-0.01."""

    def __init__(self, kind: str = "read"):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.norms: list[float] = []
        if kind == "read":
            self.a.weight.register_hook(lambda g: self.norms.append(float(g.norm())))
        else:
            self.a.weight.register_hook(lambda g: g.clamp(-0.01, 0.01))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class GradInputClip(nn.Module):
    """A tanh MLP whose hidden layer has a ``register_full_backward_hook`` returning its ``grad_input`` clipped to
    +-0.01 (gradient clipping per activation)."""

    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.mid.register_full_backward_hook(lambda mod, gin, gout: (gin[0].clamp(-0.01, 0.01),))

    def forward(self, x):
        return self.b(torch.tanh(self.mid(torch.tanh(self.a(x)))))


class HyperConv(nn.Module):
    """A hypernetwork emitting one 3x3 kernel pair per image from its mean row, applied by a single grouped
    ``F.conv2d`` with the batch folded into the channels (``groups=n``)."""

    def __init__(self):
        super().__init__()
        self.hyper, self.head = nn.Linear(6, 18), nn.Linear(2, 3)

    def forward(self, x):
        n = x.shape[0]
        kernels = torch.tanh(self.hyper(x.mean(-2).flatten(1))).reshape(n * 2, 1, 3, 3)
        out = F.conv2d(x.reshape(1, n, 6, 6), kernels, padding=1, groups=n).reshape(n, 2, 6, 6)
        return self.head(torch.tanh(out).mean((-1, -2)))


class Sparsemax(nn.Module):
    """A sparsemax head by hand (Martins and Astudillo 2016): sort, ``cumsum``, the support ``1 + k z_(k) >
    cumsum``, the threshold ``tau``, ``clamp(z - tau, min=0)``; its kinks (``z - tau`` crossing 0) marked."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(8, 5), nn.Linear(5, 3)
        self.marks = KinkMarks()

    def sparsemax(self, z: Tensor) -> Tensor:
        zs = torch.sort(z, -1, descending=True).values
        k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
        support = (1 + k * zs > zs.cumsum(-1)).to(z.dtype)
        size = support.sum(-1, keepdim=True)
        tau = ((zs * support).sum(-1, keepdim=True) - 1) / size
        return torch.clamp(self.marks(z - tau), min=0)

    def forward(self, x):
        return self.out(self.sparsemax(2 * self.b(torch.tanh(self.a(x)))))


class Siren(nn.Module):
    """Random Fourier features (a fixed Gaussian matrix buffer, ``sin``/``cos``) into two SIREN layers
    ``sin(30 W x)`` with SIREN's initialisation."""

    def __init__(self, w0: float = 30.0):
        super().__init__()
        self.register_buffer("B", torch.randn(4, 4, dtype=torch.float64))
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.w0 = w0
        with torch.no_grad():
            self.a.weight.uniform_(-1 / 8, 1 / 8)
            self.b.weight.uniform_(-math.sqrt(6 / 8) / w0, math.sqrt(6 / 8) / w0)

    def forward(self, x):
        proj = 2 * math.pi * x @ self.B
        h = torch.sin(self.w0 * self.a(torch.cat([proj.sin(), proj.cos()], -1)) / 30)
        return self.head(torch.sin(self.w0 * self.b(h)))


class CausalTCN(nn.Module):
    """A temporal convolutional network: left padding by ``F.pad`` then dilated ``Conv1d`` (dilations 1 and 2),
    ReLU modules, a residual connection, the last time step into a head."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 4, 2, dilation=1), nn.Conv1d(4, 4, 2, dilation=2)
        self.skip, self.r1, self.r2, self.head = nn.Conv1d(3, 4, 1), nn.ReLU(), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        x = x.transpose(1, 2)
        h = self.r1(self.c1(F.pad(x, (1, 0))))
        h = self.r2(self.c2(F.pad(h, (2, 0))))
        return self.head((h + self.skip(x))[..., -1])


class DetPower(nn.Module):
    """Features from a per-sample 3x3 matrix ``I + 0.3 tanh(A x)``: ``torch.linalg.det`` and the diagonal of
    ``torch.linalg.matrix_power(M, 3)``."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 9), nn.Linear(4, 3)

    def forward(self, x):
        m = torch.eye(3, dtype=x.dtype) + 0.3 * torch.tanh(self.a(x)).reshape(-1, 3, 3)
        cube = torch.linalg.matrix_power(m, 3).diagonal(dim1=-2, dim2=-1)
        return self.head(torch.cat([torch.linalg.det(m)[:, None], cube], 1))


class EighVectors(nn.Module):
    """The eigenvectors of a per-sample symmetric 3x3 matrix (``torch.linalg.eigh``), squared so that their sign
    does not matter, weighted by the eigenvalues."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 9), nn.Linear(9, 3)

    def forward(self, x):
        m = self.a(x).reshape(-1, 3, 3)
        vals, vecs = torch.linalg.eigh(m + m.transpose(-1, -2) + 3 * torch.diag(torch.tensor([0.0, 1.0, 2.0],
                                                                                          dtype=x.dtype)))
        return self.head((vecs ** 2 * vals[:, None, :]).flatten(1))


class HessianFeatures(nn.Module):
    """The diagonal of the input Hessian of a learned energy (``torch.func.vmap(torch.func.hessian(...))`` inside
    ``forward``) next to the energy, into a head."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2, self.head = nn.Linear(4, 6), nn.Linear(6, 1), nn.Linear(5, 3)

    def energy(self, x: Tensor) -> Tensor:
        return self.e2(torch.tanh(self.e1(x))).squeeze(-1)

    def forward(self, x):
        hess = torch.func.vmap(torch.func.hessian(self.energy))(x)
        return self.head(torch.cat([hess.diagonal(dim1=-2, dim2=-1), self.energy(x)[:, None]], 1))


class Windows(nn.Module):
    """Sliding windows of 3 steps over ``XS`` taken by ``Tensor.unfold`` (``"unfold"``) or by ``Tensor.as_strided``
    (``"strided"``), a shared linear map per window, mean pooling."""

    def __init__(self, how: str = "unfold"):
        super().__init__()
        self.how, self.w, self.head = how, nn.Linear(9, 4), nn.Linear(4, 3)

    def forward(self, x):
        if self.how == "unfold":
            win = x.unfold(1, 3, 1).transpose(-1, -2)
        else:
            x = x.contiguous()
            n, length, d = x.shape
            win = x.as_strided((n, length - 2, 3, d), (length * d, d, d, 1))
        return self.head(torch.tanh(self.w(win.flatten(-2))).mean(1))


class TensorOps(nn.Module):
    """Index and shape operations: ``torch.diff``, ``take_along_dim`` and ``index_select`` with fixed indices,
    ``tensor_split``, ``torch.block_diag`` of two learned blocks, per-sample outer products read at the index pairs
    of ``torch.cartesian_prod``."""

    def __init__(self):
        super().__init__()
        self.p, self.q = nn.Parameter(torch.randn(2, 2) * 0.5), nn.Parameter(torch.randn(2, 2) * 0.5)
        self.head = nn.Linear(10, 3)
        self.register_buffer("order", torch.tensor([[2, 0, 3, 1]]))
        self.register_buffer("pairs", torch.cartesian_prod(torch.arange(2), torch.arange(2)))

    def forward(self, x):
        h = torch.tanh(x @ torch.block_diag(self.p, self.q))
        d = torch.diff(h, dim=1, prepend=h[:, :1])
        taken = torch.take_along_dim(h, self.order.expand(len(x), -1), 1)
        left, right = torch.tensor_split(taken, 2, dim=1)
        outer = torch.einsum("ni,nj->nij", left, right)[:, self.pairs[:, 0], self.pairs[:, 1]]
        return self.head(torch.cat([d, outer, torch.index_select(h, 1, self.order[0, :2])], 1))


class VarMeanNorm(nn.Module):
    """A layer norm written with ``torch.var_mean(correction=0)`` and a feature standardisation with
    ``torch.std(correction=1)``, around a ReLU MLP."""

    def __init__(self):
        super().__init__()
        self.a, self.r, self.b = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)
        self.g = nn.Parameter(torch.ones(6))

    def forward(self, x):
        h = self.a(x)
        var, mean = torch.var_mean(h, -1, correction=0, keepdim=True)
        h = self.g * (h - mean) / torch.sqrt(var + 1e-5)
        h = self.r(h)
        return self.b(h / (torch.std(h, -1, keepdim=True) + 1))


class SpecialFunctions(nn.Module):
    """``torch.special``: ``erfinv`` of a bounded unit, ``xlogy`` entropy terms, ``i0e``, ``torch.sinc``,
    ``torch.logit(eps=...)`` of a sigmoid that does not saturate; the kink of ``i0e`` at 0 marked."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.marks = KinkMarks()

    def forward(self, x):
        h = self.a(x)
        self.marks(h)  # i0e(h) = exp(-|h|) i0(h) has a kink at 0
        p = torch.sigmoid(h)
        feats = (torch.special.erfinv(0.9 * torch.tanh(h)) + torch.special.xlogy(p, p) + torch.special.i0e(h)
                 + torch.sinc(h + 0.3) + 0.1 * torch.logit(p, eps=1e-6))
        return self.b(feats)


class FiLM(nn.Module):
    """Feature-wise linear modulation: the first two features, through a linear layer, give a per-sample scale and
    shift of a tanh layer of the last two."""

    def __init__(self):
        super().__init__()
        self.film, self.a, self.b = nn.Linear(2, 12), nn.Linear(2, 6), nn.Linear(6, 3)

    def forward(self, x):
        gamma, beta = self.film(x[:, :2]).chunk(2, -1)
        return self.b(torch.tanh((1 + gamma) * self.a(x[:, 2:]) + beta))


class UnflattenConv(nn.Module):
    """``nn.Unflatten`` of a linear layer's 16 outputs into a ``(1, 4, 4)`` image, ``Conv2d``, ``nn.Flatten``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3),
                                 nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


class CheckpointSequential(nn.Module):
    """``torch.utils.checkpoint.checkpoint_sequential`` over an ``nn.Sequential`` with dropout, in 2 segments,
    ``use_reentrant=False``, in training mode (while ``checkpointing``)."""

    def __init__(self):
        super().__init__()
        self.checkpointing = True
        self.seq = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 6), nn.Tanh(),
                                 nn.Linear(6, 3))

    def forward(self, x):
        if self.training and self.checkpointing:
            return torch.utils.checkpoint.checkpoint_sequential(self.seq, 2, x, use_reentrant=False)
        return self.seq(x)


class CheckpointByName(CheckpointSequential):
    """The same block run by ``checkpoint`` imported by name at the top of the model's module (``from
    torch.utils.checkpoint import checkpoint``, bound before explaind is imported), ``use_reentrant=False``."""

    def forward(self, x):
        if self.training and self.checkpointing:
            return checkpoint(self.seq, x, use_reentrant=False)
        return self.seq(x)


def relu_mlp(depth: int = 5, width: int = 8) -> nn.Module:
    """A ReLU MLP ``4 -> width -> ... -> 3`` with ``depth`` hidden layers (ReLU modules)."""
    layers: list[nn.Module] = []
    size = 4
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.ReLU()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, 3))


def relu_cnn() -> nn.Module:
    """A ReLU CNN on ``XI``: two 3x3 convolutions, ``MaxPool2d(2)``, a head."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 3))


class SpatialSampler(nn.Module):
    """A spatial transformer whose affine map moves up to 0.3 from the identity, resampled by ``F.grid_sample``
    (``mode``, ``padding_mode="reflection"``, ``align_corners=False``). ``marks``: ``sin(pi u)`` and
    ``sin(pi (u + 1/2))`` of the sampling positions ``u`` in pixels (the kinks of the interpolation weights at
    integers, of the reflection at the half-integer borders), for the slow reference."""

    def __init__(self, mode: str = "bicubic"):
        super().__init__()
        self.mode, self.loc, self.head, self.marks = mode, nn.Linear(36, 6), nn.Linear(36, 3), KinkMarks()

    def forward(self, x):
        theta = torch.eye(2, 3, dtype=x.dtype) + 0.3 * torch.tanh(self.loc(x.flatten(1))).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        u = ((grid + 1) * 6 - 1) / 2
        self.marks(torch.cat([torch.sin(math.pi * u), torch.sin(math.pi * (u + 0.5))], -1))
        out = F.grid_sample(x, grid, mode=self.mode, padding_mode="reflection", align_corners=False)
        return self.head(out.flatten(1))


class FunctionalHyper(nn.Module):
    """A hypernetwork in the functional style: per sample, ``torch.func.vmap`` of ``torch.func.functional_call`` of a
    target ``nn.Linear`` with weights generated from the sample."""

    def __init__(self):
        super().__init__()
        self.target, self.hyper, self.head = nn.Linear(4, 3), nn.Linear(4, 15), nn.Linear(3, 3)

    def forward(self, x):
        gen = 0.5 * torch.tanh(self.hyper(x))
        w, b = gen[:, :12].reshape(-1, 3, 4) + self.target.weight, gen[:, 12:] + self.target.bias

        def one(wi, bi, xi):
            return torch.func.functional_call(self.target, {"weight": wi, "bias": bi}, (xi,))
        return self.head(torch.tanh(torch.func.vmap(one)(w, b, x)))


class PreHookStandardise(nn.Module):
    """A tanh MLP with a ``register_forward_pre_hook(with_kwargs=True, prepend=True)`` on its second layer that
    standardises the layer's input (its own mean and standard deviation per sample)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.register_forward_pre_hook(self.standardise, with_kwargs=True, prepend=True)

    @staticmethod
    def standardise(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h = args[0]
        return ((h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 0.1),), kwargs

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class InPlaceWrites(nn.Module):
    """A tanh layer's 4 units written into 6 slots of a ``torch.zeros`` buffer, then a head: in place by
    ``scatter_``, ``index_copy_``, ``masked_scatter_`` or ``buf[:, :4] += h`` (``"add_"``), or out of place by
    ``scatter`` (``"scatter"``) and ``F.pad`` (``"pad"``), the same values."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.a, self.b = how, nn.Linear(4, 4), nn.Linear(6, 3)
        self.register_buffer("slots", torch.tensor([[0, 2, 4, 5]]))
        self.register_buffer("mask", torch.tensor([[True, False, True, False, True, True]]))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        buf, slots = torch.zeros(len(x), 6, dtype=x.dtype), self.slots.expand(len(x), -1)
        if self.how == "scatter_":
            buf.scatter_(1, slots, h)
        elif self.how == "index_copy_":
            buf.index_copy_(1, self.slots[0], h)
        elif self.how == "masked_scatter_":
            buf.masked_scatter_(self.mask.expand(len(x), -1), h)
        elif self.how == "add_":
            buf[:, :4] += h
        elif self.how == "scatter":
            buf = buf.scatter(1, slots, h)
        else:
            buf = F.pad(h, (0, 2))
        return self.b(buf)


class CompilerDisabled(nn.Module):
    """A forward whose feature method is marked ``@torch.compiler.disable`` (kept out of a later ``torch.compile``)
    and whose second layer's weight is a symmetric parametrization read twice under ``parametrize.cached()`` inside
    ``forward``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        nn.utils.parametrize.register_parametrization(self.b, "weight", Symmetric())

    @torch.compiler.disable
    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.a(x))

    def forward(self, x):
        h = self.features(x)
        with nn.utils.parametrize.cached():
            return self.c(torch.tanh(self.b(h)) + torch.tanh(self.b(0.5 * h)))


class Symmetric(nn.Module):
    """``(W + W^T) / 2``."""

    def forward(self, w: Tensor) -> Tensor:
        return (w + w.T) / 2
