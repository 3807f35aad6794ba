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

(over parameters :math:`p` and their elements :math:`i`). Each square is exact in float64 and the
sums run in float64: per flat piece of at most :data:`CHUNK_ELEMENTS` elements one float64 dot
product, and the pieces' dot products added exactly (``math.fsum``) after one read from the device.

Cost. The parameters whose coefficients are Python numbers or tensors laid out like the parameter
(same shape and dtype) are audited in groups that share the dtype, the device and the scalar
coefficients' values (e.g. one optimizer parameter group). Within a group, tensors of at most
:data:`PACK_ELEMENTS` elements are packed side by side into flat buffers of at most
:data:`CHUNK_ELEMENTS` elements (one ``torch.cat`` per input), so a few dozen small tensors cost
one pass of each operation instead of one Python call of each per tensor; larger tensors are
computed in flat slices of at most :data:`CHUNK_ELEMENTS` elements, in place, into buffers made
once per step. Each elementwise operation is the one the recurrence above applies, in the same
order and dtype, so :math:`m_s` and every modelled element are the same bits as the recurrence
written out per tensor; the modelled update is kept with its sign flipped,
:math:`w = P \odot \text{inner} + \lambda^d \theta`, and :math:`\Delta\theta - \widehat{\Delta\theta}
= \Delta\theta + w` is the same float (rounding to nearest is symmetric in the sign). Scalar
coefficients that make an operation an identity skip it: 0 and 1 as in ``g + 0 \theta = g``,
``1 \cdot u = u``; :math:`b_s = 0` gives :math:`m_s = a_s m_{s-1}` (:math:`m_{s-1}` itself when
:math:`a_s = 1`, a parameter the optimizer did not step), :math:`P_s = 0` a modelled update of
:math:`-\lambda^d_s\theta_s` alone; for finite values these leave every element the same up to
the sign of a zero, which no square sees.

The parameters whose coefficients are not laid out like the parameter (a 0-d tensor, a
broadcast shape, another dtype) are audited one by one (:func:`_modelled`), whole or in flat
chunks of :data:`CHUNK_ELEMENTS` elements when every input is laid out like the parameter.

Memory: the temporaries are the step's buffers, a few rows of at most :data:`CHUNK_ELEMENTS`
elements per dtype and device (one of them float64), and the new :math:`m_s`, which the next step
needs. The :math:`m_s` of packed tensors are views into one new flat tensor per packed buffer.
Chunking changes no element of :math:`m_s` or of the modelled update, and the value only by the
rounding of float64 summation (on a ResNet-18, whose largest tensor has 2.4M elements, a relative
4e-14 to 6e-14 in ``python benchmarks/bench_audit_chunks.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from ..recurrence import LinearUpdate

__all__ = ["CHUNK_ELEMENTS", "PACK_ELEMENTS", "UpdateAudit"]

#: elements of one chunk of the audit's arithmetic (2**17: 1 MiB of float64 per temporary)
CHUNK_ELEMENTS = 1 << 17
#: tensors of at most this many elements are packed with others of their group (see the module docstring)
PACK_ELEMENTS = 1 << 14

_FIELDS = tuple(f.name for f in fields(LinearUpdate))


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


@dataclass(frozen=True)
class _Group:
    """What the parameters audited together share: dtype, device, inputs present, scalar coefficients.

    ``scalars``: ``(field, value)`` of the Python-number coefficients; ``tensors``: the fields given as
    tensors laid out like the parameter. The flags say which operations the scalars leave.
    """

    dtype: torch.dtype
    device: torch.device
    has_grad: bool
    has_prev: bool
    scalars: tuple[tuple[str, float], ...]
    tensors: tuple[str, ...]

    def value(self, name: str) -> float | None:
        """The scalar coefficient ``name`` (``None`` when it is a tensor)."""
        return dict(self.scalars).get(name)

    def skips(self, name: str, number: float) -> bool:
        """Whether coefficient ``name`` is the Python number ``number`` for every member."""
        return name not in self.tensors and self.value(name) == number


def _group_of(u: LinearUpdate, t: Tensor, t_next: Tensor, g: Tensor | None, prev: Tensor | None) -> _Group | None:
    """The group of a parameter, or ``None`` when its inputs are not all laid out like it (audited alone)."""
    if t_next.shape != t.shape or t_next.dtype != t.dtype or t_next.device != t.device:
        return None
    for x in (g, prev):
        if x is not None and (x.shape != t.shape or x.dtype != t.dtype or x.device != t.device):
            return None
    scalars, tensors = [], []
    for name in _FIELDS:
        value = getattr(u, name)
        if isinstance(value, Tensor):
            if value.shape != t.shape or value.dtype != t.dtype or value.device != t.device:
                return None
            tensors.append(name)
        elif isinstance(value, float | int) and not isinstance(value, bool):
            scalars.append((name, float(value)))
        else:
            return None
    return _Group(t.dtype, t.device, g is not None, prev is not None, tuple(scalars), tuple(tensors))


@dataclass
class _Piece:
    """One flat piece of a group: its 1-D inputs (views or packed buffers) and where its ``m_s`` goes."""

    t: Tensor
    t_next: Tensor
    g: Tensor | None
    prev: Tensor | None
    coef: dict[str, Tensor]
    m_out: Tensor | None  # where m_s goes (None: m_s is m_{s-1} itself)


class _Work:
    r"""The buffers of one step's grouped audit for one dtype and device, reused by every piece.

    Work rows (``x``, two temporaries, :math:`\Delta\theta`, the zero or packed gradient) of ``length``
    elements, packing rows (:math:`\theta_s`, :math:`\theta_{s+1}`, :math:`m_{s-1}` and ``coefs`` tensor
    coefficients) of ``packed`` elements, and one float64 row for the squares' dot products.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, length: int, packed: int, coefs: int) -> None:
        self.rows = torch.empty(5, length, dtype=dtype, device=device)
        self.pack = torch.empty(3 + coefs, packed, dtype=dtype, device=device) if packed else None
        self.f64 = torch.empty(length, dtype=torch.float64, device=device)

    def packed(self, row: int, parts: list[Tensor]) -> Tensor:
        """``parts`` (flat) side by side in packing row ``row``."""
        assert self.pack is not None
        k = sum(p.numel() for p in parts)
        return torch.cat(parts, out=self.pack[row, :k])

    def sum_dot64(self, w: Tensor, actual: Tensor) -> Tensor:
        r""":math:`\sum_i (w_i + a_i)^2` as a 0-d float64 tensor, each sum :math:`w_i + a_i` rounded in ``w``'s dtype.

        For float32 the sum is computed in float32 and stored straight into the float64 row (torch computes a
        binary operation in its inputs' dtype and converts on store), one pass instead of a sum and a copy.
        """
        if w.dtype != torch.float32:
            return self.dot64(w.add_(actual))
        e = torch.add(w, actual, out=self.f64[: w.numel()])
        return torch.dot(e, e)

    def dot64(self, x: Tensor) -> Tensor:
        r""":math:`\sum_i x_i^2` of a flat ``x`` as a 0-d float64 tensor (each square exact for float32 and less)."""
        if x.dtype != torch.float64:
            x = self.f64[: x.numel()].copy_(x)
        return torch.dot(x, x)


def _piece(grp: _Group, p: _Piece, work: _Work) -> tuple[Tensor, Tensor]:
    r"""The recurrence on one flat piece, ``m_s`` written into ``p.m_out``; returns the two dots.

    The dots are :math:`\sum (\Delta\theta - \widehat{\Delta\theta})^2` and :math:`\sum \Delta\theta^2` over
    the piece, 0-d float64 tensors. The operations are :func:`_modelled`'s, applied with ``out=`` into the
    work rows (see the module docstring for the sign of ``w`` and the skipped identities).
    """
    k = p.t.numel()
    x_row, w1, w2, actual_row, _ = (row[:k] for row in work.rows)

    def c(name: str) -> Tensor | float:
        return p.coef[name] if name in p.coef else grp.value(name)  # type: ignore[return-value]

    x = None
    if not grp.skips("b", 0.0) or not grp.skips("n", 0.0):
        assert p.g is not None
        x = p.g if grp.skips("lambda_c", 0.0) else torch.add(p.g, torch.mul(p.t, c("lambda_c"), out=w1), out=x_row)
    m: Tensor | None
    if grp.skips("b", 0.0):  # m_s = a m_{s-1} (+ 0)
        if p.m_out is None:  # m_s is m_{s-1} itself (a_s = 1)
            m = p.prev
        elif p.prev is None:
            m = p.m_out.zero_()
        else:
            m = torch.mul(p.prev, c("a"), out=p.m_out)
    else:
        assert x is not None and p.m_out is not None
        if p.prev is None:
            m = p.m_out.copy_(x) if grp.skips("b", 1.0) else torch.mul(x, c("b"), out=p.m_out)
        else:
            bx = x if grp.skips("b", 1.0) else torch.mul(x, c("b"), out=w1)
            if grp.skips("a", 1.0):
                m = torch.add(p.prev, bx, out=p.m_out)
            else:
                m = torch.mul(p.prev, c("a"), out=p.m_out).add_(bx)
    actual = torch.sub(p.t_next, p.t, out=actual_row)
    w = None  # the modelled update with its sign flipped: P (q m + n x) + lambda_d theta
    if not grp.skips("P", 0.0):
        assert m is not None
        inner = m if grp.skips("q", 1.0) else torch.mul(m, c("q"), out=w2)
        if not grp.skips("n", 0.0):
            assert x is not None
            inner = torch.add(inner, torch.mul(x, c("n"), out=w1), out=w2)
        w = torch.mul(inner, c("P"), out=w2)
    if not grp.skips("lambda_d", 0.0):
        d = torch.mul(p.t, c("lambda_d"), out=w1)
        w = d if w is None else w.add_(d)
    if w is None:
        e_dot = work.dot64(actual)
        return e_dot, e_dot
    return work.sum_dot64(w, actual), work.dot64(actual)


class UpdateAudit:
    r"""Replays the recurrence with the adapter's coefficients and measures :math:`\|E_s\|/\|\Delta\theta_s\|`.

    Parameters
    ----------
    chunk : int, optional
        Elements per chunk of the arithmetic (default: :data:`CHUNK_ELEMENTS` when constructed).
    """

    def __init__(self, chunk: int | None = None) -> None:
        # m_s per parameter; each step stores new tensors (or keeps m_{s-1} itself where m_s equals it) and
        # never writes into old ones (the store's writer saves them with the optimizer state without copying)
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
        err: list[float] = []
        delta_sq: list[float] = []
        groups: dict[_Group, list[str]] = {}
        for name, u in updates.items():
            t, prev = theta[name], self.momentum.get(name)
            grp = _group_of(u, t, theta_next[name], grads.get(name), prev)
            if grp is None:
                e, d = self._parameter(name, t, theta_next[name], grads.get(name), u)
                err.append(e)
                delta_sq.append(d)
            else:
                groups.setdefault(grp, []).append(name)
        dots: dict[torch.device, list[Tensor]] = {}
        work = self._work(groups, theta)
        for grp, names in groups.items():
            for e_dot, d_dot in self._group(grp, names, theta, theta_next, grads, updates, work[grp.dtype, grp.device]):
                dots.setdefault(grp.device, []).extend((e_dot, d_dot))
        for values in dots.values():  # one read per device
            flat = torch.stack(values).tolist()
            err.extend(flat[0::2])
            delta_sq.extend(flat[1::2])
        e_total, d_total = math.fsum(err), math.fsum(delta_sq)
        if d_total == 0.0:
            return 0.0 if e_total == 0.0 else math.inf
        return math.sqrt(e_total / d_total)

    def _work(self, groups: dict[_Group, list[str]], theta: dict[str, Tensor]) -> dict[tuple[Any, Any], _Work]:
        """The step's buffers per dtype and device, sized by the largest piece and packed buffer they serve."""
        sizes: dict[tuple[Any, Any], list[int]] = {}
        for grp, names in groups.items():
            numel = [theta[n].numel() for n in names]
            small = [k for k in numel if k <= self._pack_limit()]
            entry = sizes.setdefault((grp.dtype, grp.device), [0, 0, 0])
            entry[0] = max(entry[0], min(self.chunk, max(numel)))
            if len(small) > 1:  # packed (a lone small tensor is used in place)
                entry[1] = max(entry[1], min(self.chunk, sum(small)))
            entry[2] = max(entry[2], len(grp.tensors))
        # a packed buffer's pieces use the work rows too: they are as long as the longest piece or packed buffer
        return {key: _Work(key[0], key[1], max(entry[0], entry[1]), entry[1], entry[2]) for key, entry in sizes.items()}

    def _pack_limit(self) -> int:
        """Elements of the largest tensor that is packed with others (:data:`PACK_ELEMENTS`, at most a chunk)."""
        return min(PACK_ELEMENTS, self.chunk)

    def _group(self, grp: _Group, names: list[str], theta: dict[str, Tensor], theta_next: dict[str, Tensor],
               grads: dict[str, Tensor | None], updates: dict[str, LinearUpdate], work: _Work
               ) -> list[tuple[Tensor, Tensor]]:
        """Audit a group's parameters (updating :attr:`momentum`); returns each piece's two dots."""
        keep_prev = grp.has_prev and grp.skips("b", 0.0) and grp.skips("a", 1.0)  # m_s = m_{s-1}
        need_x = not grp.skips("b", 0.0) or not grp.skips("n", 0.0)
        need_prev = grp.has_prev and not (keep_prev and grp.skips("P", 0.0))
        out: list[tuple[Tensor, Tensor]] = []

        def run(batch: list[str], packed: bool) -> None:
            flat = {n: theta[n].reshape(-1) for n in batch}
            k = sum(x.numel() for x in flat.values())
            m_out = None if keep_prev else torch.empty(k, dtype=grp.dtype, device=grp.device)
            if packed:  # tensors side by side: one pass of each operation for all of them
                inputs = [work.packed(0, list(flat.values())),
                          work.packed(1, [theta_next[n].reshape(-1) for n in batch]),
                          work.packed(2, [self.momentum[n].reshape(-1) for n in batch]) if need_prev else None,
                          {f: work.packed(3 + i, [getattr(updates[n], f).reshape(-1) for n in batch])
                           for i, f in enumerate(grp.tensors)}]
                g = _packed_grad(batch, grads, work) if need_x and grp.has_grad else None
                spans = [(inputs, g, m_out, 0, k)]
            else:  # one tensor, in flat slices of at most `chunk` elements
                (n,) = batch
                inputs = [flat[n], theta_next[n].reshape(-1), self.momentum[n].reshape(-1) if need_prev else None,
                          {f: getattr(updates[n], f).reshape(-1) for f in grp.tensors}]
                g = grads[n].reshape(-1) if need_x and grp.has_grad else None  # type: ignore[union-attr]
                spans = [(inputs, g, m_out, lo, min(lo + self.chunk, k)) for lo in range(0, k, self.chunk)]
            for (t, t_next, prev, coef), g_all, m_all, lo, hi in spans:
                gp = g_all[lo:hi] if g_all is not None else (work.rows[4, : hi - lo].zero_() if need_x else None)
                piece = _Piece(t[lo:hi], t_next[lo:hi], gp, None if prev is None else prev[lo:hi],
                               {f: v[lo:hi] for f, v in coef.items()}, None if m_all is None else m_all[lo:hi])
                out.append(_piece(grp, piece, work))
            if m_out is None:
                return
            start = 0
            for n in batch:
                size = flat[n].numel()
                self.momentum[n] = m_out[start:start + size].view(theta[n].shape)
                start += size

        batch: list[str] = []
        filled = 0
        for n in names:
            size = theta[n].numel()
            if size > self._pack_limit():
                run([n], packed=False)
                continue
            if batch and filled + size > self.chunk:
                run(batch, packed=len(batch) > 1)
                batch, filled = [], 0
            batch.append(n)
            filled += size
        if batch:
            run(batch, packed=len(batch) > 1)
        return out

    def _parameter(self, name: str, t: Tensor, t_next: Tensor, g: Tensor | None,
                   u: LinearUpdate) -> tuple[float, float]:
        r"""A parameter's float64 sums :math:`\|\Delta\theta - \widehat{\Delta\theta}\|^2`, :math:`\|\Delta\theta\|^2`.

        For a parameter outside the groups (:func:`_group_of`). Updates :attr:`momentum` of ``name`` (a new
        tensor). Tensors of at most one chunk, and those whose coefficients, gradient or momentum are not
        laid out like the parameter, are computed whole.
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


def _packed_grad(batch: list[str], grads: dict[str, Tensor | None], work: _Work) -> Tensor:
    """The gradients of a packed batch side by side in the work row of the gradient."""
    parts = [grads[n].reshape(-1) for n in batch]  # type: ignore[union-attr]
    return torch.cat(parts, out=work.rows[4, : sum(p.numel() for p in parts)])
