"""Models of the twelfth round (tests/_round12_cases.py): models unusual in how they compute rather than in which layer
they use. Caches kept between forwards (a positional table memoised by length, ``functools.lru_cache`` on a method, a
mask built at first use, the last batch's keys kept in an attribute), global state read in ``forward``
(``torch.get_default_dtype()``, ``torch.are_deterministic_algorithms_enabled()``, a module-level counter), branches on
the input's shape or dtype, in-place edits of parameter-derived tensors, functions at their singular points, custom
``autograd.Function`` s, parameters held in unusual ways, transforms and gathers, and very deep or very wide MLPs.

``TanhBase`` is the eleventh round's. Inputs are tests/_round5_kit.py's: ``XV`` ``(n, 4)`` vectors and ``XS``
``(n, 6, 3)`` sequences.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _round5_kit import KinkMarks
from _round11_models import TanhBase
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class MemoPositions(nn.Module):
    """A sequence model on ``XS`` whose sinusoidal position table is memoised in a dict keyed by the length (built on
    the first call for each length, a constant of the parameters)."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.tables: dict[int, Tensor] = {}

    def table(self, n: int, like: Tensor) -> Tensor:
        if n not in self.tables:
            pos = torch.arange(n, dtype=like.dtype)[:, None] / 10 ** (torch.arange(4, dtype=like.dtype) / 4)
            self.tables[n] = torch.where(torch.arange(4) % 2 == 0, pos.sin(), pos.cos())
        return self.tables[n]

    def forward(self, x):
        h = torch.tanh(self.inp(x) + self.table(x.shape[-2], x))
        return self.head(h.mean(-2))


class LruCachedMask(TanhBase):
    """A fixed feature mixing matrix returned by a method under ``functools.lru_cache`` (built once, from no
    parameter)."""

    @functools.lru_cache(maxsize=8)  # noqa: B019 - the cache of the pattern under test
    def mixing(self, n: int) -> Tensor:
        return torch.tril(torch.ones(n, n, dtype=torch.float64)) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]

    def features(self, h):
        return h @ self.mixing(h.shape[-1]).T


class LruCachedWeight(TanhBase):
    """The head's weight scaled by 2, computed by a method under ``functools.lru_cache`` (cached at the first call:
    every later forward reads the tensor of the first one)."""

    @functools.lru_cache(maxsize=8)  # noqa: B019 - the cache of the pattern under test
    def doubled(self) -> Tensor:
        return 2 * self.b.weight

    def forward(self, x):
        return F.linear(torch.tanh(self.a(x)), self.doubled(), self.b.bias)


class LazyMask(nn.Module):
    """Causal attention over ``XS`` whose mask is built at the first forward and stored in ``self.mask`` (a plain
    attribute, not a buffer)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(3, 12), nn.Linear(4, 3)
        self.mask: Tensor | None = None

    def forward(self, x):
        if self.mask is None:
            n = x.shape[-2]
            self.mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        q, k, v = self.qkv(x).split(4, -1)
        s = (q @ k.transpose(-1, -2) / 2).masked_fill(self.mask, float("-inf"))
        return self.head((torch.softmax(s, -1) @ v)[..., -1, :])


class KeyCache(TanhBase):
    """A key cache kept in an attribute: each forward attends over its own hidden units and the previous forward's
    (``self.cache``, detached), like an incremental decoder left in caching mode."""

    def __init__(self):
        super().__init__()
        self.k, self.cache = nn.Linear(6, 6), None

    def features(self, h):
        keys = self.k(h)
        if self.cache is not None and self.cache.shape == keys.shape:
            keys = keys + 0.5 * self.cache
        self.cache = keys.detach()
        return torch.tanh(keys)


#: The module-level call counter of :class:`CallCounter`.
CALLS = [0]


class CallCounter(TanhBase):
    """A module-level counter incremented by every forward, its parity scaling the hidden units (1 or 1.5); reset to
    0 when a model is built, so that each case's run is the same."""

    def __init__(self):
        super().__init__()
        CALLS[0] = 0

    def features(self, h):
        CALLS[0] += 1
        return h * (1.0 + 0.5 * (CALLS[0] % 2))


class DefaultDtype(TanhBase):
    """Hidden units converted to ``torch.get_default_dtype()`` (float32 under torch's default) and back."""

    def features(self, h):
        return h.to(torch.get_default_dtype()).to(h.dtype)


class DeterministicBranch(TanhBase):
    """A branch on ``torch.are_deterministic_algorithms_enabled()``: a ``scatter_add`` of the hidden units when set,
    the same sum by a matrix product otherwise."""

    def features(self, h):
        idx = torch.tensor([0, 1, 2, 0, 1, 2])
        if torch.are_deterministic_algorithms_enabled():
            pooled = torch.zeros(*h.shape[:-1], 3, dtype=h.dtype).scatter_add(-1, idx.expand_as(h), h)
        else:
            pooled = h @ F.one_hot(idx, 3).to(h.dtype)
        return torch.cat([h[..., :3], pooled], -1)


class BatchOfOne(TanhBase):
    """A branch on ``x.shape[0] == 1``: a single input takes a shortcut (its hidden units doubled, as code that
    special-cases generation with one sequence), a batch the general path."""

    def features(self, h):
        return 2 * h if h.shape[0] == 1 else h


class DtypeBranch(TanhBase):
    """A branch on the input's dtype: float64 inputs through ``tanh``, others through ``sigmoid``."""

    def features(self, h):
        return torch.tanh(2 * h) if h.dtype == torch.float64 else torch.sigmoid(h)


class InplaceOnParams(nn.Module):
    """In-place edits of parameter-derived tensors inside ``forward``: ``w[0].mul_(2)`` on a clone of the first
    layer's weight, ``index_put_`` of parameter-derived rows (repeated indices accumulated), ``masked_fill_`` of the
    scores. ``out_of_place``: the same function by ``index_put``, ``masked_fill`` and a product (the fix)."""

    def __init__(self, out_of_place: bool = False):
        super().__init__()
        self.a, self.b, self.extra = nn.Linear(4, 6), nn.Linear(6, 3), nn.Parameter(torch.randn(2, 4) * 0.5)
        self.out_of_place = out_of_place

    def forward(self, x):
        rows, added = torch.tensor([1, 3, 1]), torch.cat([self.extra, self.extra[:1]])
        scale = torch.tensor([2.0, 1, 1, 1, 1, 1], dtype=x.dtype)[:, None]
        if self.out_of_place:
            w = (self.a.weight * scale).index_put((rows,), added, accumulate=True)
            s = F.linear(x, w, self.a.bias).masked_fill(torch.arange(6) == 5, 0.0)
            return self.b(torch.tanh(s))
        w = self.a.weight.clone()
        w[0].mul_(2)
        w.index_put_((rows,), added, accumulate=True)
        s = F.linear(x, w, self.a.bias)
        s.masked_fill_(torch.arange(6) == 5, 0.0)
        return self.b(torch.tanh(s))


class NormAtZero(nn.Module):
    """ReLU units normalised by their norm, ``r / r.norm()`` (NaN when every unit is off), or with ``eps``,
    ``F.normalize(r, eps=1e-12)``; a ReLU layer whose biases are -0.2 switches them all off for some inputs."""

    def __init__(self, eps: bool = False):
        super().__init__()
        self.a, self.b, self.eps = nn.Linear(4, 6), nn.Linear(6, 3), eps
        with torch.no_grad():
            self.a.bias.fill_(-0.2)

    def forward(self, x):
        r = torch.relu(self.a(x))
        n = F.normalize(r, dim=-1, eps=1e-12) if self.eps else r / r.norm(dim=-1, keepdim=True)
        return self.b(n)


class LogOfSoftmax(TanhBase):
    """Log-probabilities as ``torch.log(torch.softmax(z))`` of logits scaled by 60 (underflows to ``-inf``) or, with
    ``stable``, as ``F.log_softmax``; trained with ``nll``."""

    def __init__(self, stable: bool = False):
        super().__init__()
        self.stable = stable

    def forward(self, x):
        z = 60 * self.b(torch.tanh(self.a(x)))
        return F.log_softmax(z, -1) if self.stable else torch.log(torch.softmax(z, -1))


class ClampAtBound(TanhBase):
    """The head's weight clamped to ``[-0.2, 0.2]``, half its entries initialised exactly at a bound; the clamp's kinks
    (``w = -0.2``, ``w = 0.2``) marked for the slow reference."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.b.weight[:, ::2] = 0.2 * torch.sign(self.b.weight[:, ::2])

        self.marks = KinkMarks()

    def forward(self, x):
        w = self.b.weight
        self.marks(torch.cat([(w - 0.2).flatten(), (w + 0.2).flatten()]))
        return F.linear(torch.tanh(self.a(x)), w.clamp(-0.2, 0.2), self.b.bias)


class _CubeOnce(torch.autograd.Function):
    """``x^3`` with a backward under ``once_differentiable`` (no graph through the backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * grad


class OnceDifferentiable(TanhBase):
    """Hidden units cubed by an old-style ``autograd.Function`` whose backward is ``once_differentiable``."""

    def features(self, h):
        return _CubeOnce.apply(h)


class _ScaleNoGrad(torch.autograd.Function):
    """``2 x`` computed under ``torch.no_grad()`` in a ``setup_context`` style Function with ``jvp`` and a vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        with torch.no_grad():
            return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad

    @staticmethod
    def jvp(ctx, tangent):
        return 2 * tangent


class NoGradFunction(TanhBase):
    """Hidden units through :class:`_ScaleNoGrad` (``torch.no_grad`` inside a custom Function's ``forward``)."""

    def features(self, h):
        return _ScaleNoGrad.apply(h)


class FunctionalInForward(TanhBase):
    """``torch.func.functional_call`` of an inner layer inside ``forward``, with a parameter dict built there (its
    weight ``inner.weight * scale``)."""

    def __init__(self):
        super().__init__()
        self.inner, self.scale = nn.Linear(6, 6), nn.Parameter(torch.ones(6))

    def features(self, h):
        params = {"weight": self.inner.weight * self.scale[:, None], "bias": self.inner.bias}
        return torch.tanh(torch.func.functional_call(self.inner, params, (h,)))


class RequiresGradToggle(TanhBase):
    """``self.a.weight.requires_grad_(self.training)`` in ``forward``: the first layer's weight is frozen in
    evaluation mode (a user's way to save memory at inference)."""

    def forward(self, x):
        self.a.weight.requires_grad_(self.training)
        return super().forward(x)


class BufferViewOfParam(TanhBase):
    """A buffer that is a view of a parameter: ``register_buffer("wt", self.b.weight.data.t())`` shares its storage,
    so the optimizer's in-place updates move it; ``forward`` reads the head through the buffer (no gradient)
    plus the parameter itself."""

    def __init__(self):
        super().__init__()
        self.register_buffer("wt", self.b.weight.data.t())

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + 0.5 * h @ self.wt


class TransposedParam(nn.Module):
    """Parameters stored non-contiguous: the first layer's weight as the transpose of a ``(4, 6)`` tensor, the
    head's as a strided slice of a wider one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6).t() * 0.5)
        self.v = nn.Parameter((torch.randn(3, 12) * 0.3)[:, ::2])
        self.c = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w)), self.v, self.c)


class AliasedParam(TanhBase):
    """The head's weight registered a second time under another name (``register_parameter("alias", ...)``), the
    forward using both names."""

    def __init__(self):
        super().__init__()
        self.register_parameter("alias", self.b.weight)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + 0.5 * F.linear(h, self.alias)


class OrthoFFT(nn.Module):
    """``torch.fft.rfft(..., norm="ortho")`` over a sequence's time axis of real hidden units, magnitudes and phases
    through ``abs`` and ``angle``-free ``real``/``imag``, an ``irfft`` back (``norm="ortho"``)."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(3, 4), nn.Linear(20, 3)
        self.filt = nn.Parameter(torch.randn(4, 4) * 0.5)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        spec = torch.fft.rfft(h, dim=-2, norm="ortho")
        filtered = spec * torch.complex(self.filt, torch.zeros_like(self.filt))
        back = torch.fft.irfft(filtered, n=x.shape[-2], dim=-2, norm="ortho")
        mag = (spec.real ** 2 + spec.imag ** 2 + 1.0).sqrt().mean(-2)
        return self.head(torch.cat([back.flatten(-2)[..., :16], mag], -1))


class RepeatedGather(TanhBase):
    """A gather of hidden units with repeated indices and an ``index_add`` that sums rows onto the same slots."""

    width = 9

    def features(self, h):
        g = h.gather(-1, torch.tensor([0, 0, 3, 3, 3, 5]).expand(*h.shape[:-1], 6))
        acc = torch.zeros(*h.shape[:-1], 3, dtype=h.dtype).index_add(-1, torch.tensor([0, 0, 1, 1, 2, 2]), g * h)
        return torch.cat([g, acc], -1)


class HalfCast(TanhBase):
    """Hidden units through float16 and back (``h.half().double()``) inside a float64 model."""

    def features(self, h):
        return h.half().double()


def mlp(depth: int, width: int, act: Callable[[], nn.Module] = nn.ReLU) -> nn.Module:
    """``4 -> width -> ... -> 3`` with ``depth`` hidden layers and ``act`` modules."""
    layers: list[nn.Module] = []
    size = 4
    for _ in range(depth):
        layers += [nn.Linear(size, width), act()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, 3))


def deep_narrow() -> nn.Module:
    """50 hidden layers of 4 tanh units, each weight scaled to keep the signal (``init.orthogonal_`` gain 1.2)."""
    model = mlp(50, 4, nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight, gain=1.2)
    return model


def wide_shallow() -> nn.Module:
    """One hidden ReLU layer of 1024 units."""
    return mlp(1, 1024)



#: The environment variable :class:`EnvScale` reads in every forward.
ENV_SCALE = "EXPLAIND_TEST_ROUND12_SCALE"


class EnvScale(TanhBase):
    """Hidden units scaled by ``float(os.environ.get(ENV_SCALE, "1"))``, read in every forward (a switch a user sets
    in the shell)."""

    def features(self, h):
        return h * float(os.environ.get(ENV_SCALE, "1"))


def deep_narrow_leaky() -> nn.Module:
    """50 hidden layers of 4 ``LeakyReLU(0.3)`` units (orthogonal weights, gain 1.4, zero biases; a smaller gain or
    slope leaves the output nearly constant over the inputs). With ``nn.ReLU`` a net this deep and narrow is dead at
    initialisation here (some layer's units are all off for every input, so the output is a constant)."""
    model = mlp(50, 4, lambda: nn.LeakyReLU(0.3))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight, gain=1.4)
            nn.init.zeros_(m.bias)
    return model
