r"""Forward-mode JVPs of layer and RMS normalisation in closed form.

Used by :func:`~explaind.kernel.fused_jvp.fused_jvp` (its rule table) and by the layer-factored rows of
:class:`~explaind.kernel.layer_rules.LayerNormRule`. Notation of docs/maths.md: a dot marks a tangent (the
derivative along the direction of the JVP), :math:`\langle\cdot\rangle` the mean over the :math:`n` normalised
values of one row.

**Layer normalisation** (``F.layer_norm``, ``torch.layer_norm``) of an input :math:`x` ``(*, *S)`` over its
trailing shape :math:`S` (``normalized_shape``, :math:`n = \prod S`) normalises each row by its mean :math:`\mu`
and :math:`r = (\sigma^2 + \epsilon)^{-1/2}` (:math:`\sigma^2` the biased variance) and applies an element-wise
affine map of shape :math:`S`,

.. math::

    y = \gamma \odot \hat x + \beta, \qquad \hat x = r\,(x - \mu).

With :math:`\dot\mu = \langle\dot x\rangle` and, since :math:`\langle x - \mu\rangle = 0`,
:math:`\dot{(\sigma^2)} = 2\langle (x - \mu)\,\dot x\rangle`, so
:math:`\dot r = -\tfrac12 r^3 \dot{(\sigma^2)} = -r^2 \langle \hat x\,\dot x\rangle`, the normalised input moves by
:math:`\dot{\hat x} = \dot r\,(x - \mu) + r(\dot x - \dot\mu)` and

.. math::

    \dot y = \gamma \odot r\bigl(\dot x - \langle\dot x\rangle - \hat x\, m\bigr) + \dot\gamma \odot \hat x
    + \dot\beta, \qquad m = \langle \hat x\, \dot x\rangle .

**RMS normalisation** (``F.rms_norm``, ``torch.rms_norm``, ``nn.RMSNorm``) does not centre:
:math:`\hat x = r x` with :math:`r = (\langle x^2\rangle + \epsilon)^{-1/2}` and :math:`y = \gamma \odot \hat x`;
:math:`\dot r = -r^3\langle x\dot x\rangle = -r^2\langle\hat x\dot x\rangle`, so

.. math:: \dot y = \gamma \odot r\bigl(\dot x - \hat x\, m\bigr) + \dot\gamma \odot \hat x .

Each primal is torch's own kernel, bit for bit (``native_layer_norm``, ``_fused_rms_norm``), and :math:`\mu, r`
are the statistics those kernels return; :math:`\hat x` is taken from the centred :math:`x - \mu`, as the variance
is. The tangent is two reductions over each row (:math:`\langle\dot x\rangle` and :math:`n m`, one
``linalg.vecdot``) and three passes for :math:`r(\dot x - q/n)`, :math:`q = n\langle\dot x\rangle + \hat x\,nm`,
then one pass per affine term; forward mode's derivative of ``native_layer_norm`` makes about a dozen passes. On
512 rows of 768 values that is 1.2-1.8x less CPU time per call; on small inputs the few microseconds each torch
call costs in Python dominate (:data:`MIN_ELEMENTS`; ``python benchmarks/bench_norm_rules.py --calls``;
docs/engine.md, section 7). ``tests/test_layer_norm_jvp.py`` checks both rules against :func:`torch.func.jvp` of
the torch function and of a normalisation written from elementary operations.

Each rule returns ``None``, and the caller then runs torch's own function with its forward-mode derivative and
its own errors, for what it does not compute: nothing with a tangent; a dtype other than ``float32`` and
``float64`` (half types keep their statistics in ``float32``); an input of fewer than :data:`MIN_ELEMENTS`
values (where forward mode is as fast); a ``normalized_shape`` that is not the input's trailing shape, or a weight
or bias of another shape, dtype or device; and, for RMS normalisation, a torch without ``_fused_rms_norm``. Batch
normalisation is left to forward mode everywhere: in evaluation mode its derivative is a per-channel affine map
already, and the engine replays training-mode batches by reverse mode (``kernel/coupled.py``), never by forward
mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

__all__ = ["layer_norm_dual", "rms_norm_dual"]

_FLOATS = (torch.float32, torch.float64)

#: Inputs of fewer elements are left to forward mode: there the few microseconds that each torch call of the
#: closed form costs in Python outweigh the passes it saves (``python benchmarks/bench_norm_rules.py --calls``:
#: 0.56-1.02x forward mode's speed up to 65,536 elements, 1.12-1.78x from 393,216; docs/engine.md, section 7).
MIN_ELEMENTS = 2**17


def _unpack(t: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    return (None, None) if t is None else fwad.unpack_dual(t)


def _trailing(normalized_shape: Any) -> tuple[int, ...] | None:
    """``normalized_shape`` as a tuple of ints, or ``None`` when it is neither an int nor a sequence of them."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    try:
        shape = tuple(shape)
    except TypeError:
        return None
    return shape if shape and all(isinstance(s, int) and not isinstance(s, bool) for s in shape) else None


def _fits(x: Tensor, shape: tuple[int, ...], params: tuple[Tensor | None, ...]) -> bool:
    """Whether ``x`` (at least :data:`MIN_ELEMENTS` values) ends in ``shape`` and every parameter given has that
    shape and ``x``'s dtype and device."""
    return (x.dtype in _FLOATS and x.numel() >= max(1, MIN_ELEMENTS) and x.dim() >= len(shape)
            and tuple(x.shape[-len(shape):]) == shape
            and all(p is None or (tuple(p.shape) == shape and p.dtype == x.dtype and p.device == x.device)
                    for p in params))


def _row_tangent(x_hat: Tensor, r: Tensor, x_dot: Tensor, centred: bool) -> Tensor:
    r""":math:`r(\dot x - \langle\dot x\rangle - \hat x m)` (``centred``) or :math:`r(\dot x - \hat x m)` ``(M, n)``.

    ``x_hat (M, n)``, ``x_dot`` (``M n`` values), ``r (M, 1)``, :math:`m = \langle\hat x\dot x\rangle`: two
    reductions over the rows, then :math:`q = n\langle\dot x\rangle + \hat x\, n m` and
    :math:`r(\dot x - q / n)` in three passes.
    """
    M, n = x_hat.shape
    x_dot = x_dot.reshape(M, n)
    nm = torch.linalg.vecdot(x_hat, x_dot).unsqueeze(1)  # n <x hat x dot>, (M, 1)
    q = torch.addcmul(x_dot.sum(1, keepdim=True), x_hat, nm) if centred else x_hat * nm
    return torch.sub(x_dot, q, alpha=1 / n).mul_(r)


def _affine_tangent(x_hat: Tensor, core: Tensor | None, w: Tensor | None, w_dot: Tensor | None,
                    b_dot: Tensor | None) -> Tensor:
    r""":math:`\gamma\odot\mathrm{core} + \dot\gamma\odot\hat x + \dot\beta` on rows ``(M, n)``; parameters ``(n,)``
    or ``None`` (no scale: :math:`\gamma = 1`; no tangent: that term is zero)."""
    out = torch.zeros_like(x_hat) if core is None else core
    if core is not None and w is not None:
        out.mul_(w.reshape(-1))
    if w_dot is not None:
        out.addcmul_(x_hat, w_dot.reshape(-1))
    if b_dot is not None:
        out.add_(b_dot.reshape(-1))
    return out


def layer_norm_dual(input: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
                    eps: float = 1e-5, *_: Any, **__: Any) -> Tensor | None:
    r"""``F.layer_norm`` (or ``torch.layer_norm``) on dual tensors, the tangent in closed form (module docstring).

    Parameters
    ----------
    input : Tensor
        ``(*, *S)``, a dual tensor or not.
    normalized_shape : int or sequence of int
        :math:`S`, the trailing shape normalised over (any number of axes).
    weight, bias : Tensor or None
        :math:`\gamma, \beta` of shape :math:`S`, dual or not; ``None``: no scale, no shift.
    eps : float
        Added to the variance.

    Returns
    -------
    Tensor or None
        The dual output of ``input``'s shape, or ``None`` for what the closed form does not take (module
        docstring): the caller then runs torch's own function.
    """
    if input.numel() < MIN_ELEMENTS:  # before unpacking (microseconds a call): the layer rules call it on any input
        return None
    x, x_dot = fwad.unpack_dual(input)
    w, w_dot = _unpack(weight)
    b, b_dot = _unpack(bias)
    shape = _trailing(normalized_shape)
    if (x_dot is None and w_dot is None and b_dot is None) or shape is None or not _fits(x, shape, (w, b)):
        return None
    y, mean, rstd = torch.native_layer_norm(x, shape, w, b, eps)  # mean, rstd (*, 1, ..., 1)
    n = math.prod(shape)
    M = x.numel() // n
    r = rstd.reshape(M, 1)
    if w is None and b is None:  # y is x hat
        x_hat = y.reshape(M, n)
    else:
        x_hat = (x.reshape(M, n) - mean.reshape(M, 1)).mul_(r)  # r (x - mu), from the centred input
    core = None if x_dot is None else _row_tangent(x_hat, r, x_dot, centred=True)
    return fwad.make_dual(y, _affine_tangent(x_hat, core, w, w_dot, b_dot).view(y.shape))


def rms_norm_dual(input: Tensor, normalized_shape: Any, weight: Tensor | None = None, eps: float | None = None,
                  *_: Any, **__: Any) -> Tensor | None:
    r"""``F.rms_norm`` (or ``torch.rms_norm``) on dual tensors, the tangent in closed form (module docstring).

    Parameters
    ----------
    input : Tensor
        ``(*, *S)``, a dual tensor or not.
    normalized_shape : int or sequence of int
        :math:`S`, the trailing shape normalised over.
    weight : Tensor or None
        :math:`\gamma` of shape :math:`S`, dual or not; ``None``: no scale.
    eps : float or None
        Added to the mean square; ``None``: ``torch.finfo(input.dtype).eps``, as torch does.

    Returns
    -------
    Tensor or None
        The dual output of ``input``'s shape, or ``None`` (the caller then runs torch's own function) for what the
        closed form does not take (module docstring), and where this torch has no ``_fused_rms_norm``.
    """
    x, x_dot = fwad.unpack_dual(input)
    w, w_dot = _unpack(weight)
    shape = _trailing(normalized_shape)
    if (x_dot is None and w_dot is None) or shape is None or not _fits(x, shape, (w,)) \
            or not hasattr(torch, "_fused_rms_norm"):
        return None
    y, rstd = torch._fused_rms_norm(x, list(shape), w, eps)  # the kernel of F.rms_norm; rstd (*, 1, ..., 1)
    n = math.prod(shape)
    M = x.numel() // n
    r = rstd.reshape(M, 1).to(x.dtype)
    x_hat = x.reshape(M, n) * r
    core = None if x_dot is None else _row_tangent(x_hat, r, x_dot, centred=False)
    return fwad.make_dual(y, _affine_tangent(x_hat, core, w, w_dot, None).view(y.shape))
