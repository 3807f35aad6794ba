r"""Forward-mode JVP of a group normalisation in closed form, for :func:`~explaind.kernel.fused_jvp.fused_jvp`.

A group normalisation of an input :math:`x` ``(B, C, *)`` in :math:`G` groups of :math:`n = (C / G)\prod *`
values each normalises every group of every sample by its mean :math:`\mu` and
:math:`r = (\sigma^2 + \epsilon)^{-1/2}` (:math:`\sigma^2` the biased variance) and applies a per-channel affine map,

.. math::

    y = \gamma \odot \hat x + \beta, \qquad \hat x = r\,(x - \mu).

With tangents :math:`\dot x, \dot\gamma, \dot\beta` and :math:`\langle\cdot\rangle` the mean over a group,
:math:`\dot\mu = \langle \dot x\rangle` and :math:`\dot r = -r^3 \langle (x - \mu)\,\dot x\rangle`, so

.. math::

    \dot y = \gamma r \bigl(\dot x - \langle\dot x\rangle - \hat x\, m\bigr) + \dot\gamma \hat x + \dot\beta,
    \qquad m = \langle \hat x\, \dot x\rangle ,

which, with :math:`x_c = x - \mu` and per (sample, channel) coefficients :math:`A = \gamma r`,
:math:`D = r(\dot\gamma - A m)` and :math:`E = \dot\beta - A \langle\dot x\rangle`, is

.. math:: \dot y = A \odot \dot x + D \odot x_c + E .

:func:`group_norm_dual` computes it so: the primal by torch's own kernel (``native_group_norm``, which also returns
:math:`\mu` and :math:`r`: the primal is bit for bit ``F.group_norm``'s), :math:`x_c` once, the two group means by
one sum and one batched dot product, and :math:`\dot y` in two fused multiply-adds: five passes over the activations,
where forward mode's derivative of ``native_group_norm`` takes about four times the CPU time (``python
benchmarks/bench_kink_dense.py --per-eval``; docs/engine.md, section 7). The product is taken with the centred
:math:`x_c`, as the variance is, not as :math:`\langle x\dot x\rangle - \mu\langle\dot x\rangle`.
``tests/test_norm_jvp.py`` checks it against
:func:`torch.func.jvp` of ``F.group_norm``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

__all__ = ["group_norm_dual"]


def group_norm_dual(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                    eps: float = 1e-5, *_: Any, **__: Any) -> Tensor | None:
    r"""``F.group_norm`` (or ``torch.group_norm``) on dual tensors, the tangent in closed form (module docstring).

    Parameters
    ----------
    input : Tensor
        ``(B, C, *)``, a dual tensor or not.
    num_groups : int
        :math:`G`, dividing ``C``.
    weight, bias : Tensor or None
        :math:`\gamma, \beta` ``(C,)``, dual or not; ``None``: no scale, no shift.
    eps : float
        Added to the variance.

    Returns
    -------
    Tensor or None
        The dual output ``(B, C, *)``; ``None`` (the caller then runs torch's own function, its derivative and its
        errors) when nothing has a tangent, for an input without a batch and a channel axis or with no elements,
        in a dtype other than ``float32`` and ``float64``, when ``num_groups`` does not divide ``C``, or when the
        affine parameters' dtype or shape differ from what ``native_group_norm`` takes without a conversion.
    """
    x, x_dot = fwad.unpack_dual(input)
    w, w_dot = (None, None) if weight is None else fwad.unpack_dual(weight)
    b, b_dot = (None, None) if bias is None else fwad.unpack_dual(bias)
    if x_dot is None and w_dot is None and b_dot is None:
        return None
    if x.dim() < 2 or x.numel() == 0 or not isinstance(num_groups, int) or num_groups < 1 \
            or x.dtype not in (torch.float32, torch.float64):  # half types: statistics in float32, left to torch
        return None
    B, C, G = x.shape[0], x.shape[1], num_groups
    if C % G or any(p is not None and (p.dtype != x.dtype or p.shape != (C,)) for p in (w, b)):
        return None
    x = x.contiguous()
    HxW = x.numel() // (B * C)
    y, mean, rstd = torch.native_group_norm(x, w, b, B, C, HxW, G, eps)  # mean, rstd (B, G)
    per, n = C // G, (C // G) * HxW
    xc = (x.view(B, G, n) - mean.unsqueeze(-1)).view(B, C, HxW)  # x - mu, (B, C, HxW)
    r = rstd.unsqueeze(-1)  # (B, G, 1)
    gamma = torch.ones(1, G, per, dtype=x.dtype, device=x.device) if w is None else w.view(1, G, per)
    A = r * gamma  # (B, G, per)
    D = torch.zeros_like(A) if w_dot is None else r * w_dot.view(1, G, per)
    E = torch.zeros_like(A) if b_dot is None else b_dot.view(1, G, per).expand_as(A).clone()
    if x_dot is not None:
        xd = x_dot.reshape(B, G, n)
        m_dot = xd.sum(-1, keepdim=True) / n  # <x dot>, (B, G, 1)
        m = r * torch.bmm(xc.view(B * G, 1, n), xd.reshape(B * G, n, 1)).view(B, G, 1) / n  # <x hat x dot>
        D = D - r * A * m
        E = E - A * m_dot
    coef = [v.reshape(B, C, 1) for v in (A, D, E)]
    y_dot = torch.addcmul(coef[2], coef[1], xc)  # D x_c + E
    if x_dot is not None:
        y_dot.addcmul_(coef[0], x_dot.reshape(B, C, HxW))  # + A x dot
    return fwad.make_dual(y, y_dot.view_as(y))
