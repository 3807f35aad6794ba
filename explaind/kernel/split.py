r"""Each update split into data, regularization and residual parts (docs/maths.md §4).

The recorded coefficients of step ``s`` on a parameter block are a :class:`StepCoefficients`
(each a float uniform over the block or a flat tensor ``(D_b,)``). Unrolling the recurrence with
two buffers,

.. math::

    m^{data}_s &= a_s m^{data}_{s-1} + b_s g_s, \qquad
    m^{reg}_s = a_s m^{reg}_{s-1} + b_s \lambda^c_s \theta_s, \\
    \Delta\theta_s &= \underbrace{-P_s(q_s m^{data}_s + n_s g_s)}_{data}
      \underbrace{- P_s(q_s m^{reg}_s + n_s \lambda^c_s\theta_s) - \lambda^d_s\theta_s}_{regularization}
      + \underbrace{E_s}_{residual},

with :math:`g_s = c_s\sum_k w_{s,k}\nabla\ell_k(\theta_s)` recomputed from the training data
(:class:`Splitter`) and :math:`E_s` whatever the modelled parts leave of the actual
:math:`\Delta\theta_s`. Buffers start at the last step ``r <= start`` where every ``a_r`` is exactly 0
(:func:`momentum_start`): earlier history cannot reach the window.

When the optimizer held momentum buffers :math:`m_{-1}` before step 0 (a recording resumed from a
checkpoint, :meth:`~explaind.trajectory.base.Trajectory.initial_state`), a third buffer carries them,

.. math::

    m^{init}_s = a_s m^{init}_{s-1},\quad m^{init}_{-1} = m_{-1},\qquad
    \underbrace{-P_s q_s m^{init}_s}_{initial\ state},

so that the data, regularization and initial-state parts and :math:`E_s` sum to :math:`\Delta\theta_s`
(docs/maths.md §4, "Optimizer state at the start"). It reaches a window only when the buffers start
at step 0 (:func:`start_buffer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..recurrence import COEFFICIENT_NAMES, LinearUpdate
from .coupled import step_replay
from .evaluate import Batch
from .layout import ParamLayout

__all__ = ["StepCoefficients", "step_coefficients", "is_zero", "coefficients", "momentum_start", "step_batch",
           "Splitter", "start_buffer"]

Coefficient = float | Tensor


def is_zero(value: Coefficient) -> bool:
    """Whether a coefficient is exactly zero everywhere."""
    if isinstance(value, Tensor):
        return not bool(value.any())
    return float(value) == 0.0


@dataclass(frozen=True)
class StepCoefficients:
    r"""Recurrence coefficients of one step on a parameter block (docs/maths.md).

    Each of ``a, b, P, q, n, lambda_c, lambda_d`` is a float (the same for every coordinate of
    the block) or a tensor of shape ``(D_b,)``; ``c`` is the gradient scale :math:`c_s`.
    """

    a: Coefficient
    b: Coefficient
    P: Coefficient
    q: Coefficient
    n: Coefficient
    lambda_c: Coefficient
    lambda_d: Coefficient
    c: float


def _flat_coefficient(values: list[Any], layout: ParamLayout, device: Any, dtype: torch.dtype) -> Coefficient:
    if all(not isinstance(v, Tensor) or v.dim() == 0 for v in values):
        floats = [float(v) for v in values]
        if all(f == floats[0] for f in floats):
            return floats[0]
    parts = []
    for v, shape in zip(values, layout.shapes):
        t = torch.as_tensor(v, dtype=dtype, device=device)
        parts.append(torch.broadcast_to(t, shape).reshape(-1))
    return torch.cat(parts).to(device=device, dtype=dtype)


def step_coefficients(updates: Mapping[str, LinearUpdate], scale: float, layout: ParamLayout, device: Any,
                      dtype: torch.dtype) -> StepCoefficients:
    """Collect the coefficients of ``updates`` (one :class:`LinearUpdate` per name) on ``layout``.

    A missing name is a parameter that did not move (``a=1, b=0, P=0``).
    """
    still = LinearUpdate(a=1.0, b=0.0, P=0.0)
    ups = [updates.get(n, still) for n in layout.names]
    values = {f: _flat_coefficient([getattr(u, f) for u in ups], layout, device, dtype) for f in COEFFICIENT_NAMES}
    return StepCoefficients(**values, c=float(scale))


def coefficients(engine: Any, s: int, layout: ParamLayout) -> StepCoefficients:
    """Coefficients of step ``s`` on ``layout`` (the engine's device and dtype)."""
    return step_coefficients(engine.traj.updates(s), engine.traj.grad_scale(s), layout, engine.device, engine.dtype)


def momentum_start(engine: Any, start: int) -> int:
    """Latest step ``r <= start`` at which every momentum decay ``a_r`` is exactly zero (else 0)."""
    for r in range(start, 0, -1):
        updates = engine.traj.updates(r)
        if all(is_zero(u.a) for u in updates.values()) and len(updates) == len(engine.names):
            return r
    return 0


def step_batch(engine: Any, s: int) -> tuple[Tensor, Batch]:
    """Dataset indices of step ``s`` and its :class:`~explaind.kernel.evaluate.Batch` (weights :math:`c_s w_{s,k}`)."""
    idx, w = engine.traj.batch(s)
    idx = torch.as_tensor(idx).long()
    Xb, Yb = engine.traj.train_samples(idx)
    fm = engine.fm
    weights = float(engine.traj.grad_scale(s)) * fm.cast(torch.as_tensor(w))
    return idx.to(engine.device), Batch(fm.cast(Xb), fm.cast(Yb), weights, step_replay(engine.traj, s))


def start_buffer(engine: Any, layout: ParamLayout, first: int) -> Tensor | None:
    r"""The flat :math:`m_{-1}` on ``layout`` (zeros for parameters without one), or ``None`` when it cannot matter.

    ``None`` when the trajectory started from a fresh optimizer, or when the buffers of the query
    start after step 0 (``first > 0``: a decay :math:`a_r = 0` cut every earlier buffer).
    """
    state = engine.traj.initial_state()
    if first != 0 or not state:
        return None
    parts = {n: engine.fm.cast(state[n]) if n in state else torch.zeros(shape, dtype=engine.dtype, device=engine.device)
             for n, shape in zip(layout.names, layout.shapes)}
    return layout.flatten(parts)


class Splitter:
    """The data, regularization and initial-state buffers of the unrolled recurrence on one parameter block.

    Parameters
    ----------
    m_init : Tensor, optional
        :math:`m_{-1}` on the block, flat ``(D_b,)`` (:func:`start_buffer`); ``None``: zero.
    """

    def __init__(self, m_init: Tensor | None = None) -> None:
        self.m_data: Tensor | None = None
        self.m_reg: Tensor | None = None
        self.m_init = m_init

    def advance(self, co: StepCoefficients, gsum: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""Feed step ``s``: ``gsum`` = :math:`g_s` (flat, ``c_s`` included), ``theta`` = :math:`\theta_s`.

        Returns the data, regularization and initial-state parts of :math:`\Delta\theta_s`, all flat
        (the last ``None`` without a start buffer).
        """
        u_reg = co.lambda_c * theta
        self.m_data = co.b * gsum if self.m_data is None else co.a * self.m_data + co.b * gsum
        self.m_reg = co.b * u_reg if self.m_reg is None else co.a * self.m_reg + co.b * u_reg
        data = -co.P * (co.q * self.m_data + co.n * gsum)
        reg = -co.P * (co.q * self.m_reg + co.n * u_reg) - co.lambda_d * theta
        init = None
        if self.m_init is not None:
            self.m_init = co.a * self.m_init
            init = -co.P * (co.q * self.m_init)
        return data, reg, init
