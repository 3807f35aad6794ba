r"""The linear-recurrence form of optimizer updates (docs/maths.md §3).

Every supported optimizer step is written, per parameter tensor, as

.. math::

    u_s &= g_s + \lambda^c_s \theta_s \\
    m_s &= a_s \odot m_{s-1} + b_s \odot u_s \\
    \Delta\theta_s &= -P_s \odot (q_s \odot m_s + n_s \odot u_s) - \lambda^d_s \theta_s + E_s

with ``g_s = c_s * sum_k w_{s,k} grad l_k(theta_s)`` the gradient the optimizer saw. An
optimizer adapter reads the coefficients from the live optimizer after each step; the engine
unrolls the recurrence to split every update into data, regularization and residual parts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["LinearUpdate", "OptimizerAdapter", "PureUpdate", "COEFFICIENT_NAMES", "is_unchanged"]

Coefficient = float | Tensor

COEFFICIENT_NAMES = ("a", "b", "P", "q", "n", "lambda_c", "lambda_d")


@dataclass(frozen=True)
class LinearUpdate:
    """Coefficients of one step for one parameter tensor.

    Each coefficient is a Python float or a tensor broadcastable to the parameter's shape
    (elementwise / diagonal coefficients, e.g. Adam's preconditioner ``P_s``).

    Attributes
    ----------
    a : float or Tensor
        Momentum decay ``a_s`` (0 on a buffer's first step).
    b : float or Tensor
        Input gain of the momentum buffer ``b_s``.
    P : float or Tensor
        Step size / diagonal preconditioner ``P_s`` (shape of the parameter for Adam).
    q, n : float or Tensor
        Weights of the momentum buffer and of the current input in the update.
    lambda_c : float
        Coupled (L2) weight decay entering the gradient.
    lambda_d : float
        Decoupled weight decay applied to the parameter (AdamW: ``lr * wd``).
    """

    a: Coefficient = 0.0
    b: Coefficient = 1.0
    P: Coefficient = 0.0
    q: Coefficient = 1.0
    n: Coefficient = 0.0
    lambda_c: Coefficient = 0.0
    lambda_d: Coefficient = 0.0

    def step(self, grad: Tensor, momentum: Tensor | None, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the modelled update.

        Parameters
        ----------
        grad : Tensor
            ``g_s``, shape of the parameter.
        momentum : Tensor or None
            ``m_{s-1}`` (``None`` = zeros).
        theta : Tensor
            ``theta_s``.

        Returns
        -------
        delta, momentum : Tensor, Tensor
            The modelled ``Delta theta_s`` (without residual) and ``m_s``.
        """
        u = grad + self.lambda_c * theta
        m = self.b * u if momentum is None else self.a * momentum + self.b * u
        delta = -self.P * (self.q * m + self.n * u) - self.lambda_d * theta
        return delta, m

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Flatten into ``{prefix + field: tensor}`` for safetensors (scalars become 0-d tensors)."""
        out: dict[str, Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            tensor = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
            out[prefix + f.name] = tensor.detach().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str) -> LinearUpdate:
        """Inverse of :meth:`to_tensors`; 0-d tensors come back as Python floats."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            t = tensors[prefix + f.name]
            values[f.name] = float(t) if t.dim() == 0 else t
        return cls(**values)

    def to(self, device: Any = None, dtype: Any = None) -> LinearUpdate:
        """Move tensor coefficients (floats are left as they are)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.to(device=device, dtype=dtype) if isinstance(v, Tensor) else v
        return LinearUpdate(**values)


@runtime_checkable
class OptimizerAdapter(Protocol):
    """What the recorder needs from an optimizer adapter implementation.

    ``record.implementation.from_optimizer(optimizer)`` builds one; it raises
    :class:`explaind.exceptions.ConfigError` for options the maths does not cover. An optional class
    attribute ``fresh_tensors = True`` says that every tensor coefficient ``after_step`` returns is
    new and never touched by the adapter again, so the recorder keeps it without a copy. An
    optional keyword ``out`` of ``after_step`` takes ``out(param) -> Tensor | None``, a buffer the
    recorder lends for that parameter's tensor coefficient, and ``defer`` a job that fills those
    buffers later (docs/optimizers.md, "Coefficient buffers"). An
    optional method ``resumed(optimizer)`` is called by ``TrajectoryRecorder.restore()`` right after
    the recorded run's optimizer state was loaded into ``optimizer``: its hyperparameters are then
    those of the last recorded step (the built-in adapters refuse a later switch of ``maximize``
    while a buffer built under the loaded value exists). An optional method ``start_state(optimizer)`` returns
    the momentum buffers an optimizer holds when recording starts (restored from a checkpoint, or after
    unrecorded steps), ``id(param) -> m_{-1}`` in the recurrence's sign convention; without it such an
    optimizer is refused (docs/maths.md §4, "Optimizer state at the start").
    """

    def hyperparameters(self) -> dict[str, Any]:
        """JSON-serialisable hyperparameters (validated by the record's ``config`` model)."""

    def before_step(self, optimizer: Any) -> Any:
        """Called by the recorder just before ``optimizer.step()``; returns any state needed after it."""

    def after_step(self, optimizer: Any, before: Any) -> dict[int, LinearUpdate]:
        """Called right after ``optimizer.step()``: the coefficients used, keyed by ``id(param)``.

        Parameters without a gradient at this step are left out (they did not move).
        """


def is_unchanged(update: LinearUpdate) -> bool:
    """Whether ``update`` is the record of a parameter without gradient at its step (``a=1, b=0, P=0``)."""
    return (not isinstance(update.P, Tensor) and float(update.P) == 0.0 and not isinstance(update.a, Tensor)
            and float(update.a) == 1.0 and not isinstance(update.b, Tensor) and float(update.b) == 0.0)


@runtime_checkable
class PureUpdate(Protocol):
    r"""The update of one parameter tensor as a pure function :math:`z_{s+1} = U_s(z_s, g_s)` (docs/maths.md §9).

    ``z = (theta, state)`` with ``state`` the optimizer's buffers (``m``, ``v``, ...) as a dict of
    tensors. Built by ``OptimizerAdapterRecord.update_fn(hyperparameters)``; the
    counterfactual estimator replays it forward from ``theta_0`` and differentiates it with
    :func:`torch.func.vjp`, so ``__call__`` must be written in differentiable torch operations.
    Per-step constants the recorder did not store as such (Adam's step size
    ``lr_s / (1 - beta1^t)``) are recovered by :meth:`scalars` from the recorded
    :class:`LinearUpdate` at the recorded point and held fixed. An optional method
    ``start_state(theta, m, saved)`` returns the state before step 0 of a run recorded from an
    optimizer that held state: ``m`` its stored :math:`m_{-1}` (or ``None``), ``saved`` torch's own
    state entry of the parameter then (``None`` where the store did not keep it); without it such a
    run is refused (docs/maths.md §9, "A run that started from optimizer state").
    """

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """The optimizer state before the first step (zeros; shapes as ``theta``)."""

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """Per-step constants of ``U_s`` recovered from the recorded coefficients at ``(theta_s, state_s, g_s)``.

        Raises :class:`explaind.exceptions.ConfigError` when the coefficients cannot be reproduced.
        """

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(theta_{s+1}, state_{s+1})`` from ``theta_s`` (shape ``(*shape)``), ``state_s`` and ``g_s``."""
