r"""Splitting each update into data, regularization and residual parts; the forward-mode (JVP) path.

Unrolling the recurrence of DESIGN §2 with two buffers,

.. math::

    m^{data}_s &= a_s m^{data}_{s-1} + b_s g_s, \qquad
    m^{reg}_s = a_s m^{reg}_{s-1} + b_s \lambda^c_s \theta_s, \\
    \Delta\theta_s &= \underbrace{-P_s(q_s m^{data}_s + n_s g_s)}_{data}
      \underbrace{- P_s(q_s m^{reg}_s + n_s \lambda^c_s\theta_s) - \lambda^d_s\theta_s}_{regularization}
      + \underbrace{E_s}_{residual},

with :math:`g_s = c_s\sum_k w_{s,k}\nabla\ell_k(\theta_s)` recomputed from the training data and
:math:`E_s` whatever the two modelled parts leave of the actual :math:`\Delta\theta_s`. Buffers start at
the last step ``r <= start`` where every ``a_r`` is exactly 0 (earlier history cannot reach the
window; :func:`momentum_start`).

When neither ``param`` nor ``train`` is kept, each part (per parameter tensor when ``group`` is
kept) is a tangent, and :math:`\varphi_s(x) v` is a batch of JVPs at the step's quadrature nodes:
no Jacobian and no per-sample gradient is formed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .accumulate import Accumulators
from .engine import PathEngine, progress_iter
from .functional import Explained
from .layout import ParamLayout, StepCoefficients, is_zero, step_coefficients
from .quadrature import NodePlan

__all__ = ["momentum_start", "coefficients", "Splitter", "jvp_decomposition", "batch_data"]


def coefficients(engine: PathEngine, s: int, layout: ParamLayout) -> StepCoefficients:
    """Coefficients of step ``s`` on ``layout`` (compute device and dtype)."""
    return step_coefficients(engine.traj.updates(s), engine.traj.grad_scale(s), layout, engine.device, engine.dtype)


def momentum_start(engine: PathEngine, start: int) -> int:
    """Latest step ``r <= start`` at which every momentum decay ``a_r`` is exactly zero (else 0)."""
    for r in range(start, 0, -1):
        if all(is_zero(u.a) for u in engine.traj.updates(r).values()) and len(engine.traj.updates(r)) == len(
                engine.names):
            return r
    return 0


def batch_data(engine: PathEngine, s: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(indices, weights, X_batch, y_batch)`` of step ``s`` on the compute device."""
    idx, w = engine.traj.batch(s)
    idx = torch.as_tensor(idx).long()
    Xb, Yb = engine.traj.train_samples(idx)
    return idx.to(engine.device), engine.fm.cast(torch.as_tensor(w)), engine.fm.cast(Xb), engine.fm.cast(Yb)


class Splitter:
    """The data and regularization buffers of the unrolled recurrence on one parameter block."""

    def __init__(self) -> None:
        self.m_data: Tensor | None = None
        self.m_reg: Tensor | None = None

    def advance(self, co: StepCoefficients, gsum: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        r"""Feed step ``s``: ``gsum`` = :math:`g_s` (flat, ``c_s`` included), ``theta`` = :math:`\theta_s`.

        Returns the data and regularization parts of :math:`\Delta\theta_s`, both flat.
        """
        u_reg = co.lambda_c * theta
        self.m_data = co.b * gsum if self.m_data is None else co.a * self.m_data + co.b * gsum
        self.m_reg = co.b * u_reg if self.m_reg is None else co.a * self.m_reg + co.b * u_reg
        data = -co.P * (co.q * self.m_data + co.n * gsum)
        reg = -co.P * (co.q * self.m_reg + co.n * u_reg) - co.lambda_d * theta
        return data, reg


def jvp_decomposition(engine: PathEngine, X: Tensor, explained: Explained, plans: list[NodePlan],
                      window: tuple[int, int], acc: Accumulators, max_tangent_bytes: int) -> None:
    """Fill ``acc`` for ``keep`` within ``{"step", "group"}`` with JVPs along the three parts."""
    start, stop = window
    layout = engine.layout
    D, G = layout.size, len(layout)
    splitter = Splitter()
    r = momentum_start(engine, start)
    per_group = acc.group
    n_tan = 3 * G if per_group else 3
    elem = torch.finfo(engine.dtype).bits // 8
    k_chunk = max(1, min(n_tan, max_tangent_bytes // max(1, elem * D)))
    rows = slice(0, X.shape[0])
    for s in progress_iter(range(r, stop), engine.progress, "steps", stop - r):
        theta = engine.params(s)
        co = coefficients(engine, s, layout)
        idx, w, Xb, Yb = batch_data(engine, s)
        g = engine.fm.weighted_grad(theta, engine.names, Xb, Yb, co.c * w, engine.chunk_size)
        data, reg = splitter.advance(co, layout.flatten(g), layout.flatten(theta))
        if s < start:
            continue
        delta = layout.flatten(engine.delta(s))
        parts = torch.stack([data, reg, delta - data - reg])  # (3, D)
        seg = engine.segment(s, X, explained)
        plan = plans[s - start]
        out = []
        for lo in range(0, n_tan, k_chunk):
            hi = min(lo + k_chunk, n_tan)
            V = _tangents(parts, layout, lo, hi, per_group)
            out.append(engine.reduce_jvp(seg, plan, layout.unflatten(V)))
        J = torch.cat(out, dim=1)  # (T, K, O)
        J = J.reshape(J.shape[0], 3, G, -1) if per_group else J.reshape(J.shape[0], 3, -1)
        acc.add_totals("values", s, J[:, 0], rows)
        acc.add_totals("regularization", s, J[:, 1], rows)
        acc.add_totals("residual", s, J[:, 2], rows)
        acc.add_estimate(s, J.sum(dim=(1, 2)) if per_group else J.sum(1), rows)


def _tangents(parts: Tensor, layout: ParamLayout, lo: int, hi: int, per_group: bool) -> Tensor:
    """Tangents ``lo..hi-1`` of the list (part, group): flat ``(hi - lo, D)``."""
    if not per_group:
        return parts[lo:hi]
    G = len(layout)
    out = torch.zeros(hi - lo, layout.size, dtype=parts.dtype, device=parts.device)
    for k in range(lo, hi):
        j, g = divmod(k, G)
        sl = slice(layout.offsets[g], layout.offsets[g + 1])
        out[k - lo, sl] = parts[j, sl]
    return out


def flat_block(tensors: dict[str, Any], layout: ParamLayout, lead: int = 0) -> Tensor:
    """Flatten the tensors of ``layout`` out of a larger dict."""
    return layout.flatten({n: tensors[n] for n in layout.names}, lead=lead)
