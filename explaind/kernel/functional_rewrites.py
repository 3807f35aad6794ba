r"""Plain-operation forms of functional torch operations without a forward-mode derivative.

explaind computes the path derivatives :math:`\varphi_s(x)\,\Delta\theta_s` of docs/maths.md §2 with
:func:`torch.func.jvp`, and torch has no forward-mode derivative for ``grid_sampler_2d``/``3d``
(``F.grid_sample``), ``_cdist_forward``/``_euclidean_dist`` (``torch.cdist``) and ``_pdist_forward``
(``F.pdist``); ``F.rrelu`` has no ``vmap`` rule even in evaluation mode. Each runs here as operations that
have both, with torch's value up to rounding and the derivative of that value exact in the replay dtype.
:class:`~explaind.kernel.rewrites.FusedKernelRewrite` swaps them in (benchmarks/survey_forward_ad.py lists the
operations tried, and which fail).

**Grid sampling** (``F.grid_sample(x, grid, mode, padding_mode, align_corners)``, ``x`` of shape
``(N, C, *S)`` with ``S`` two (``H, W``) or three (``D, H, W``) sizes, ``grid`` ``(N, *O, k)`` with
``k = len(S)`` coordinates in :math:`[-1, 1]`, the first indexing the last axis ``W``). Coordinate
:math:`g` along an axis of size :math:`n` is unnormalised to the pixel index

.. math:: u = \tfrac{g + 1}{2}(n - 1) \;\text{(align_corners)}, \qquad u = \tfrac{(g + 1) n - 1}{2} \;\text{(else)},

then ``border`` clamps it to :math:`[0, n - 1]` and ``reflection`` folds it into the span between
:math:`a = 0, b = n - 1` (align_corners) or :math:`a = -\tfrac12, b = n - \tfrac12` with
:math:`m = |u - a|`, :math:`L = b - a`: :math:`u \leftarrow a + (m \bmod L)` after an even number
:math:`\lfloor m / L \rfloor` of folds, :math:`a + L - (m \bmod L)` after an odd one, then clamps.
``bilinear`` (trilinear for 3-D) is :math:`\sum_{c \in \{0,1\}^k} \prod_j w_{j,c_j}\,x[\lfloor u \rfloor + c]`
with :math:`w_{j,1} = u_j - \lfloor u_j \rfloor`, :math:`w_{j,0} = 1 - w_{j,1}`, a corner outside the image
reading 0; ``nearest`` reads :math:`x[\operatorname{round}(u)]` (half to even, as torch), 0 outside.
The floors and rounds are constants to the derivative, so the derivative in ``grid`` is
:math:`\sum_c \partial_u(\prod_j w_{j,c_j})\,x[\cdot]` times :math:`\partial u / \partial g`, torch's own
(its backward), and the derivative in ``x`` is the same weights. ``bicubic`` (4-D only, as torch) reads the
:math:`4 \times 4` taps :math:`\lfloor u \rfloor + d`, :math:`d \in \{-1, 0, 1, 2\}` per axis, each tap placed by
the padding rule (the sampling position itself is not), weighted along each axis by Keys' cubic kernel
(:math:`A = -0.75`) at :math:`t = u - \lfloor u \rfloor`: :math:`k(t + 1), k(t), k(1 - t), k(2 - t)` with
:math:`k(s) = (A + 2)s^3 - (A + 3)s^2 + 1` for :math:`s \le 1` and :math:`A s^3 - 5A s^2 + 8A s - 4A` for
:math:`1 < s < 2`, summed over the columns of each row, then over the rows, as torch does.

**Distances** (``torch.cdist(a, b, p)``, ``a`` ``(*B, P, M)``, ``b`` ``(*B, R, M)``, out ``(*B, P, R)``):
:math:`d_{ij} = \|a_i - b_j\|_p`, written from the differences :math:`a_i - b_j` with

* :math:`p = 0`: :math:`\#\{m : a_{im} \ne b_{jm}\}` (derivative 0);
* :math:`p = 1`: :math:`\sum_m |a_{im} - b_{jm}|`; :math:`p = \infty`: :math:`\max_m |a_{im} - b_{jm}|`;
* other :math:`p`: :math:`(\sum_m |a_{im} - b_{jm}|^p)^{1/p}`, the power of a zero difference and the root of a
  zero sum taken as 0 with derivative 0, as torch's backward does (a zero distance, e.g. the diagonal of
  ``cdist(a, a)``, has derivative 0 rather than :math:`0/0`);
* :math:`p = 2` where torch uses its matrix-product form (``compute_mode="use_mm_for_euclid_dist"``, or the
  default with :math:`P > 25` or :math:`R > 25`): :math:`\sqrt{\max(0, \|a_i\|^2 + \|b_j\|^2 - 2 a_i \cdot b_j)}`,
  as torch computes it, so the value keeps torch's rounding (absolute error about :math:`\sqrt{\epsilon}\,\|a\|`
  for nearly equal points, in torch's value and here alike); ``compute_mode="donot_use_mm_for_euclid_dist"``
  avoids it.

``F.pdist(a, p)`` is :math:`\|a_i - a_j\|_p` for :math:`i < j` in row-major order, the same norms.

**``F.rrelu(x, lower, upper, training=False)``** is the leaky ReLU with slope :math:`(l + u)/2`, as torch
computes it in evaluation mode; ``training=True`` draws random slopes and is left to torch (refused under
``vmap``).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..exceptions import ConfigError

__all__ = ["cdist", "grid_sample", "pdist", "rrelu"]

_MODES = ("bilinear", "nearest", "bicubic")
_PADDINGS = ("zeros", "border", "reflection")
_COMPUTE_MODES = ("use_mm_for_euclid_dist_if_necessary", "use_mm_for_euclid_dist", "donot_use_mm_for_euclid_dist")


def _unnormalize(g: Tensor, n: int, align_corners: bool) -> Tensor:
    """Grid coordinate ``g`` in :math:`[-1, 1]` to the pixel index along an axis of size ``n``."""
    if align_corners:
        return (g + 1) / 2 * (n - 1)
    return ((g + 1) * n - 1) / 2


def _reflect(u: Tensor, low: float, high: float) -> Tensor:
    """Fold ``u`` into :math:`[low, high]` by reflections at its ends (see the module docstring)."""
    span = high - low
    if span <= 0:
        return torch.zeros_like(u)
    m = (u - low).abs()
    extra = torch.fmod(m, span)
    flips = torch.floor(m / span)
    return torch.where(torch.remainder(flips, 2) == 0, extra + low, span - extra + low)


def _pad(u: Tensor, n: int, padding_mode: str, align_corners: bool) -> Tensor:
    """Pixel index ``u`` along an axis of size ``n`` after the padding rule (``zeros``: unchanged)."""
    if padding_mode == "border":
        return u.clamp(0, n - 1)
    if padding_mode == "reflection":
        u = _reflect(u, 0.0, n - 1.0) if align_corners else _reflect(u, -0.5, n - 0.5)
        return u.clamp(0, n - 1)
    return u


def _read(flat: Tensor, idx: list[Tensor], sizes: list[int]) -> Tensor:
    """``x[idx]`` for integer-valued index tensors ``idx`` ``(N, *O)`` per spatial axis, 0 outside the image.

    ``flat`` is ``x`` of shape ``(N, C, prod(sizes))``; the result is ``(N, C, *O)``.
    """
    inside = torch.ones_like(idx[0], dtype=torch.bool)
    lin = torch.zeros_like(idx[0], dtype=torch.long)
    for i, n in zip(idx, sizes):
        inside = inside & (i >= 0) & (i <= n - 1)
        lin = lin * n + i.clamp(0, n - 1).long()
    N, C, L = flat.shape[0], flat.shape[1], lin[0].numel()
    values = torch.gather(flat, 2, lin.reshape(N, 1, L).expand(N, C, L)).reshape(N, C, *idx[0].shape[1:])
    return values * inside.unsqueeze(1).to(values.dtype)


def grid_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool | None = None) -> Tensor:
    """``F.grid_sample`` from gathers and products (see the module docstring): ``(N, C, *O)``.

    Raises
    ------
    ConfigError
        For a ``mode`` or ``padding_mode`` torch does not have, shapes that do not match, or ``bicubic`` on a 5-D
        input.
    """
    if mode not in _MODES:
        raise ConfigError(f"F.grid_sample got mode={mode!r}. Choose one of: {', '.join(map(repr, _MODES))}.")
    if padding_mode not in _PADDINGS:
        raise ConfigError(f"F.grid_sample got padding_mode={padding_mode!r}. Choose one of: "
                          f"{', '.join(map(repr, _PADDINGS))}.")
    k = input.dim() - 2
    if mode == "bicubic" and k != 2:
        raise ConfigError(f"F.grid_sample got mode='bicubic' with an input of shape {tuple(input.shape)}; bicubic "
                          f"takes 4-D inputs (N, C, H, W) only, as in torch. Fix: mode='bilinear' for 5-D inputs.")
    if k not in (2, 3) or grid.dim() != k + 2 or grid.shape[-1] != k or grid.shape[0] != input.shape[0]:
        raise ConfigError(
            f"F.grid_sample got an input of shape {tuple(input.shape)} and a grid of shape {tuple(grid.shape)}; it "
            f"takes (N, C, H, W) with (N, H_out, W_out, 2), or (N, C, D, H, W) with (N, D_out, H_out, W_out, 3). "
            f"Fix: pass shapes of that form.")
    align = bool(align_corners)
    sizes = list(input.shape[2:])
    # grid coordinate j indexes spatial axis k - 1 - j (x: W, y: H, z: D)
    raw = [_unnormalize(grid[..., k - 1 - a], sizes[a], align) for a in range(k)]
    flat = input.reshape(input.shape[0], input.shape[1], -1)
    if mode == "bicubic":
        return _bicubic(flat, raw, sizes, padding_mode, align)
    u = [_pad(r, n, padding_mode, align) for r, n in zip(raw, sizes)]
    if mode == "nearest":
        return _read(flat, [torch.round(ua) for ua in u], sizes)
    low = [torch.floor(ua) for ua in u]
    frac = [ua - la for ua, la in zip(u, low)]
    out = None
    for corner in itertools.product((0, 1), repeat=k):
        weight = None
        for f, c in zip(frac, corner):
            w = f if c else 1 - f
            weight = w if weight is None else weight * w
        term = _read(flat, [la + c for la, c in zip(low, corner)], sizes) * weight.unsqueeze(1)
        out = term if out is None else out + term
    return out


def _cubic_weights(t: Tensor) -> list[Tensor]:
    r"""The weights of taps :math:`-1, 0, 1, 2` at offset ``t`` in :math:`[0, 1)` (Keys' kernel, :math:`A = -0.75`)."""
    A = -0.75

    def near(x: Tensor) -> Tensor:  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic(flat: Tensor, raw: list[Tensor], sizes: list[int], padding_mode: str, align: bool) -> Tensor:
    """Bicubic sampling at pixel positions ``raw`` (rows, columns), each tap placed by the padding rule."""
    low = [torch.floor(r) for r in raw]
    wy, wx = (_cubic_weights(r - lo) for r, lo in zip(raw, low))
    taps = [[torch.trunc(_pad(lo + d, n, padding_mode, align)) for d in (-1, 0, 1, 2)] for lo, n in zip(low, sizes)]
    out = None
    for i in range(4):
        row = None
        for j in range(4):
            term = _read(flat, [taps[0][i], taps[1][j]], sizes) * wx[j].unsqueeze(1)
            row = term if row is None else row + term
        term = row * wy[i].unsqueeze(1)
        out = term if out is None else out + term
    return out


def _zero_safe_power(x: Tensor, p: float) -> Tensor:
    r""":math:`x^p` for :math:`x \ge 0`, 0 with derivative 0 where :math:`x = 0`."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)) ** p, torch.zeros_like(x))


def _norms(diff: Tensor, p: float) -> Tensor:
    """:math:`\\|\\cdot\\|_p` over the last axis of ``diff`` (see the module docstring)."""
    if p == 0:
        return (diff != 0).sum(-1).to(diff.dtype)
    a = diff.abs()
    if p == 1:
        return a.sum(-1)
    if math.isinf(p):
        return a.amax(-1)
    return _zero_safe_power(_zero_safe_power(a, p).sum(-1), 1.0 / p)


def _check_p(p: float, where: str) -> float:
    p = float(p)
    if not p >= 0:
        raise ConfigError(f"{where} got p={p}; it takes p >= 0 (float('inf') included). Fix: pass such a p.")
    return p


def cdist(x1: Tensor, x2: Tensor, p: float = 2.0,
          compute_mode: str = "use_mm_for_euclid_dist_if_necessary") -> Tensor:
    """``torch.cdist`` from differences or, where torch uses it, its matrix-product form: ``(*B, P, R)``.

    Raises
    ------
    ConfigError
        For a negative ``p``, an unknown ``compute_mode`` or inputs of different widths.
    """
    p = _check_p(p, "torch.cdist")
    if compute_mode not in _COMPUTE_MODES:
        raise ConfigError(f"torch.cdist got compute_mode={compute_mode!r}. Choose one of: "
                          f"{', '.join(map(repr, _COMPUTE_MODES))}.")
    if x1.dim() < 2 or x2.dim() < 2 or x1.shape[-1] != x2.shape[-1]:
        raise ConfigError(f"torch.cdist got inputs of shapes {tuple(x1.shape)} and {tuple(x2.shape)}; it takes "
                          f"(*B, P, M) and (*B, R, M) with the same M. Fix: pass such shapes.")
    mm = p == 2 and (compute_mode == "use_mm_for_euclid_dist" or (
        compute_mode == "use_mm_for_euclid_dist_if_necessary" and (x1.shape[-2] > 25 or x2.shape[-2] > 25)))
    if mm:
        sq = (x1 * x1).sum(-1, keepdim=True) + (x2 * x2).sum(-1).unsqueeze(-2) - 2 * (x1 @ x2.mT)
        return _zero_safe_power(sq.clamp_min(0), 0.5)
    return _norms(x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def pdist(input: Tensor, p: float = 2.0) -> Tensor:
    """``F.pdist``: the ``p``-norms of the row differences :math:`a_i - a_j`, :math:`i < j`, ``(N (N - 1) / 2,)``.

    Raises
    ------
    ConfigError
        For a negative ``p`` or an input that is not 2-D.
    """
    p = _check_p(p, "F.pdist")
    if input.dim() != 2:
        raise ConfigError(f"F.pdist got an input of shape {tuple(input.shape)}; it takes (N, M). Fix: pass a 2-D "
                          f"input.")
    i, j = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    return _norms(input[i] - input[j], p)


def rrelu(input: Tensor, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False,
          inplace: bool = False) -> Tensor | None:
    """``F.rrelu`` in evaluation mode as ``F.leaky_relu(input, (lower + upper) / 2)``; ``None`` for
    ``training=True`` (left to torch). ``inplace`` is ignored (a new tensor)."""
    if training:
        return None
    return F.leaky_relu(input, (lower + upper) / 2)
