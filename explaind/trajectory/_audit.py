r"""The recorder's update audit: each step replayed with the adapter's coefficients (docs/maths.md §3).

For every parameter tensor the audit recomputes the modelled update of the linear recurrence

.. math::

    u_s = g_s + \lambda^c_s \theta_s, \quad m_s = a_s \odot m_{s-1} + b_s \odot u_s, \quad
    \widehat{\Delta\theta}_s = -P_s \odot (q_s \odot m_s + n_s \odot u_s) - \lambda^d_s \theta_s

and compares it with the update the optimizer made, :math:`\Delta\theta_s = \theta_{s+1} - \theta_s`:

.. math::

    \text{audit}_s = \frac{\|\Delta\theta_s - \widehat{\Delta\theta}_s\|}{\|\Delta\theta_s\|}
    = \sqrt{\frac{\sum_{p, i} (\Delta\theta_{s,p,i} - \widehat{\Delta\theta}_{s,p,i})^2}
                 {\sum_{p, i} \Delta\theta_{s,p,i}^2}}

(over parameters :math:`p` and their elements :math:`i`). The sums run in float64.

Memory: the recurrence and both sums are computed over flat chunks of at most
:data:`CHUNK_ELEMENTS` elements of each tensor, so the temporaries (:math:`u`, the modelled update,
the difference and its float64 copy) are those of one chunk, not of the whole tensor; only
:math:`m_s`, which the next step needs, is a whole tensor. The recurrence is elementwise, so every
element of :math:`m_s` and of the modelled update is the same as computed on the whole tensor; the
float64 sums add the chunks' sums in order, which differs from one sum over the tensor by the
rounding of float64 summation only (on a ResNet-18, whose largest tensor has 2.4M elements, the
audit moved by a relative 4e-14 to 6e-14 in ``python benchmarks/bench_audit_chunks.py``), and not at
all for tensors of at most one chunk.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import torch
from torch import Tensor

from ..recurrence import LinearUpdate

__all__ = ["CHUNK_ELEMENTS", "UpdateAudit"]

#: elements of one chunk of the audit's arithmetic (2**17: 1 MiB of float64 per temporary)
CHUNK_ELEMENTS = 1 << 17


def _flat_coefficients(u: LinearUpdate, like: Tensor) -> LinearUpdate | None:
    """``u`` with every tensor coefficient flattened to ``like.numel()`` elements (0-d tensors and floats kept).

    ``None`` when a coefficient cannot be laid out element by element like ``like`` (not broadcastable).
    """
    flat = {}
    for f in fields(u):
        value = getattr(u, f.name)
        if isinstance(value, Tensor) and value.dim() > 0:
            try:
                value = value.expand_as(like)
            except RuntimeError:
                return None
            flat[f.name] = value.reshape(-1)
    return replace(u, **flat)


def _chunk(u: LinearUpdate, lo: int, hi: int) -> LinearUpdate:
    """The flat coefficients of elements ``lo:hi`` (scalars unchanged)."""
    part = {f.name: getattr(u, f.name)[lo:hi] for f in fields(u)
            if isinstance(getattr(u, f.name), Tensor) and getattr(u, f.name).dim() > 0}
    return replace(u, **part)


def _is(value: object, number: float) -> bool:
    """Whether a coefficient is the Python float (or int) ``number`` (a tensor coefficient never is)."""
    return isinstance(value, float | int) and not isinstance(value, bool) and value == number


def _modelled(u: LinearUpdate, g: Tensor, prev: Tensor | None, t: Tensor) -> tuple[Tensor, Tensor]:
    r""":meth:`LinearUpdate.step` without the operations that scalar coefficients 0 and 1 make identities.

    ``g + 0 * theta`` is ``g``, ``1 * u`` is ``u``, ``q m + 0 * u`` is ``q m`` and ``x - 0 * theta`` is
    ``x`` for finite values (up to the sign of a zero, which no square or sum of the audit sees), so the
    modelled update and :math:`m_s` equal those of ``u.step(g, prev, t)``; an SGD-with-momentum step
    then costs 3 elementwise passes instead of 11. Returns ``(modelled update, m_s)``.
    """
    x = g if _is(u.lambda_c, 0.0) else g + u.lambda_c * t
    bx = x if _is(u.b, 1.0) else u.b * x
    if prev is None:
        m = bx.clone() if bx is g else bx  # m_s is kept: never the caller's gradient buffer
    else:
        m = u.a * prev + bx
    inner = m if _is(u.q, 1.0) else u.q * m
    if not _is(u.n, 0.0):
        inner = inner + u.n * x
    delta = -u.P * inner
    if not _is(u.lambda_d, 0.0):
        delta = delta - u.lambda_d * t
    return delta, m


def _sq64(a: Tensor) -> float:
    r""":math:`\sum_i a_i^2` in float64 (one float64 copy of ``a``)."""
    flat = a.reshape(-1).double()
    return float(torch.dot(flat, flat))


class UpdateAudit:
    r"""Replays the recurrence with the adapter's coefficients and measures :math:`\|E_s\|/\|\Delta\theta_s\|`.

    Parameters
    ----------
    chunk : int, optional
        Elements per chunk of the arithmetic (default: :data:`CHUNK_ELEMENTS` when constructed).
    """

    def __init__(self, chunk: int | None = None) -> None:
        # m_s per parameter; each step stores new tensors and never writes into old ones (the store's
        # writer saves them with the optimizer state without copying)
        self.momentum: dict[str, Tensor] = {}
        self.chunk = max(1, int(CHUNK_ELEMENTS if chunk is None else chunk))

    def step(
        self,
        theta: dict[str, Tensor],
        theta_next: dict[str, Tensor],
        grads: dict[str, Tensor | None],
        updates: dict[str, LinearUpdate],
    ) -> float:
        r"""Audit one step: returns :math:`\|E_s\|/\|\Delta\theta_s\|` (0 when nothing moved and nothing was modelled).

        Parameters
        ----------
        theta, theta_next : dict of str to Tensor
            :math:`\theta_s` and :math:`\theta_{s+1}` per parameter (any shape).
        grads : dict of str to Tensor or None
            :math:`g_s`, the gradient the optimizer saw (``None``: zero), shape of the parameter.
        updates : dict of str to LinearUpdate
            The step's coefficients per parameter; the audit runs over these parameters.
        """
        err = delta_sq = 0.0
        for name, u in updates.items():
            e, d = self._parameter(name, theta[name], theta_next[name], grads.get(name), u)
            err += e
            delta_sq += d
        if delta_sq == 0.0:
            return 0.0 if err == 0.0 else math.inf
        return math.sqrt(err / delta_sq)

    def _parameter(self, name: str, t: Tensor, t_next: Tensor, g: Tensor | None,
                   u: LinearUpdate) -> tuple[float, float]:
        r"""A parameter's float64 sums :math:`\|\Delta\theta - \widehat{\Delta\theta}\|^2`, :math:`\|\Delta\theta\|^2`.

        Updates :attr:`momentum` of ``name`` (a new tensor). Tensors of at most one chunk, and those whose
        coefficients, gradient or momentum are not laid out like the parameter, are computed whole.
        """
        prev = self.momentum.get(name)
        flat_u = _flat_coefficients(u, t)
        whole = (flat_u is None or t.numel() <= self.chunk or t_next.shape != t.shape
                 or (g is not None and g.shape != t.shape) or (prev is not None and prev.shape != t.shape))
        if whole:
            g = torch.zeros_like(t) if g is None else g
            modelled, m = _modelled(u, g.to(t.dtype), prev, t)
            self.momentum[name] = m if isinstance(m, Tensor) else torch.as_tensor(m, dtype=t.dtype)
            actual = t_next - t
            return _sq64(actual - modelled), _sq64(actual)
        assert flat_u is not None
        tf, nf = t.reshape(-1), t_next.reshape(-1)
        gf = None if g is None else g.reshape(-1)
        pf = None if prev is None else prev.reshape(-1)
        m_new: Tensor | None = None
        err = delta_sq = 0.0
        for lo in range(0, tf.numel(), self.chunk):
            hi = min(lo + self.chunk, tf.numel())
            tc = tf[lo:hi]
            gc = torch.zeros_like(tc) if gf is None else gf[lo:hi].to(t.dtype)
            modelled, m = _modelled(_chunk(flat_u, lo, hi), gc, None if pf is None else pf[lo:hi], tc)
            if m_new is None:
                m_new = torch.empty(tf.numel(), dtype=m.dtype, device=m.device)
            m_new[lo:hi] = m
            actual = nf[lo:hi] - tc
            err += _sq64(actual - modelled)
            delta_sq += _sq64(actual)
        assert m_new is not None
        self.momentum[name] = m_new.reshape(t.shape)
        return err, delta_sq
