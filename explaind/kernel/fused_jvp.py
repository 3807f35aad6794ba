r"""Forward-mode JVPs whose convolutions compute the primal and the kernel's tangent in one call.

A convolution :math:`z = W \star a + b` at a point of a segment, with tangents :math:`\dot W, \dot b` of its
kernel and bias and :math:`\dot a` of its input, has the JVP

.. math::

    \dot z = \dot W \star a + \dot b + W \star \dot a .

Forward-mode AD computes :math:`W \star a`, :math:`\dot W \star a` and :math:`W \star \dot a` as three
convolutions, each unfolding its input into patches first. In float64 on the CPU (no oneDNN kernel) the
unfolding costs about as much as the product, so :func:`fused_jvp` runs the first two as **one**
convolution of :math:`a` with the kernel stacked along the output channels,
:math:`[W; \dot W] \star a + [b; \dot b]`, whose two halves are :math:`z` and the kernel's part of
:math:`\dot z`: two unfoldings instead of three, the same products
(``python benchmarks/bench_kink_dense.py --per-eval``; docs/engine.md, section 7). With ``groups`` =
:math:`G` the stacked kernel interleaves the groups, :math:`[W_1; \dot W_1; \dots; W_G; \dot W_G]`, so each
group of output channels still reads its own input channels.

A group normalisation (``F.group_norm``, ``torch.group_norm``) takes its tangent in closed form
(:func:`~explaind.kernel.norm_jvp.group_norm_dual`: a few passes over the activations, a quarter of forward mode's
CPU time for it), and so do layer normalisation (``F.layer_norm``, ``torch.layer_norm``) and RMS normalisation
(``F.rms_norm``, ``torch.rms_norm``; :mod:`~explaind.kernel.layer_norm_jvp`). Every other operation
(``torch.native_layer_norm`` called directly, batch normalisation, half types), and a convolution whose kernel
has no tangent, takes the ordinary forward-mode derivative (:mod:`torch.autograd.forward_ad`). The result equals
:func:`torch.func.jvp` up to rounding
(``tests/test_fused_jvp.py`` compares both and a loop of plain forward-mode derivatives).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .explained import Params
from .layer_norm_jvp import layer_norm_dual, rms_norm_dual
from .norm_jvp import group_norm_dual

__all__ = ["fused_jvp", "FusedConvTangents", "conv2d_dual"]


def fused_jvp(fn: Callable[[Params], Tensor], point: Params, tangent: Params) -> tuple[Tensor, Tensor]:
    r"""``fn(point)`` and its derivative along ``tangent``, convolutions fused (:class:`FusedConvTangents`).

    Parameters
    ----------
    fn : callable
        ``params -> Tensor``, e.g. the explained outputs ``(n, O)`` of a batch of inputs.
    point : dict
        :math:`\theta(t)`, ``name -> Tensor``; entries without a tangent (buffers) are held fixed.
    tangent : dict
        :math:`\Delta\theta`, ``name -> Tensor`` of the shapes of ``point``.

    Returns
    -------
    h, h_dot : Tensor
        ``fn(point)`` and :math:`\nabla_\theta\,\mathrm{fn}(\theta)\,\Delta\theta`, both of ``fn``'s output shape.
    """
    with fwad.dual_level():
        dual = {n: fwad.make_dual(v, tangent[n]) if n in tangent else v for n, v in point.items()}
        with FusedConvTangents():
            out = fn(dual)
        primal, dot = fwad.unpack_dual(out)
    return primal, torch.zeros_like(primal) if dot is None else dot


class FusedConvTangents(TorchFunctionMode):
    """A torch function mode that routes ``torch.conv2d`` on dual tensors through :func:`conv2d_dual`,
    ``F.group_norm`` / ``torch.group_norm`` through :func:`~explaind.kernel.norm_jvp.group_norm_dual`, and the
    layer and RMS normalisations through :mod:`~explaind.kernel.layer_norm_jvp`.

    Active only inside :func:`fused_jvp` (within a ``forward_ad.dual_level``); any call that these rules do
    not take (they return ``None``) runs unchanged.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            out = rule(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def conv2d_dual(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                dilation: Any = 1, groups: int = 1) -> Tensor | None:
    r"""``torch.conv2d`` on dual tensors with the primal and :math:`\dot W \star a + \dot b` in one convolution.

    Parameters are those of :func:`torch.conv2d`: ``input (B, C_in, H, W)``, ``weight (C_out, C_in / G, kh, kw)``,
    ``bias (C_out,)`` or ``None``. Returns the dual output ``(B, C_out, H', W')``, or ``None`` (the caller then
    runs the ordinary derivative) when the kernel has no tangent or the input is not batched.
    """
    a, a_dot = fwad.unpack_dual(input)
    w, w_dot = fwad.unpack_dual(weight)
    if w_dot is None or a.dim() != 4:
        return None
    c_out, G = w.shape[0], groups
    per = c_out // G
    stacked = torch.stack([w.reshape(G, per, *w.shape[1:]), w_dot.reshape(G, per, *w.shape[1:])], 1)
    stacked = stacked.reshape(2 * c_out, *w.shape[1:])  # (G, 2, C_out / G, ...): each group's W, then its W dot
    b_stacked = None
    if bias is not None:
        b, b_dot = fwad.unpack_dual(bias)
        b_dot = torch.zeros_like(b) if b_dot is None else b_dot
        b_stacked = torch.stack([b.reshape(G, per), b_dot.reshape(G, per)], 1).reshape(-1)
    both = F.conv2d(a, stacked, b_stacked, stride, padding, dilation, groups)
    both = both.reshape(both.shape[0], G, 2, per, *both.shape[2:])
    z = both[:, :, 0].reshape(both.shape[0], c_out, *both.shape[4:])
    z_dot = both[:, :, 1].reshape_as(z)
    if a_dot is not None:
        z_dot = z_dot + F.conv2d(a_dot, w, None, stride, padding, dilation, groups)
    return fwad.make_dual(z, z_dot)


#: the closed-form rules by the torch function they replace on dual tensors
_RULES: dict[Any, Callable[..., Tensor | None]] = {
    torch.conv2d: conv2d_dual, F.group_norm: group_norm_dual, torch.group_norm: group_norm_dual,
    F.layer_norm: layer_norm_dual, torch.layer_norm: layer_norm_dual, F.rms_norm: rms_norm_dual,
    torch.rms_norm: rms_norm_dual}
