r"""Adadelta's update as a pure, differentiable function (docs/maths.md §9), the ``update_fn`` of ``adadelta``.

With ``u = g + lambda_c theta`` (the recurrence's sign: ``-`` torch's under maximize), the running means
``v' = rho v + (1 - rho) u^2`` (torch's ``square_avg``) and ``d`` (``acc_delta``),

.. math::

    \delta = \sqrt{d + \epsilon} / \sqrt{v' + \epsilon} \odot u, \qquad
    d' = \rho d + (1 - \rho) \delta^2, \qquad
    \theta' = \theta - S_s \delta - \lambda_d \theta

with ``S_s = P_s sqrt(v' + eps) / sqrt(d + eps)``, the signed ``lr_s``, recovered from the recorded preconditioner and
held fixed (checked constant over a tensor's entries, which catches a run whose ``rho`` or ``eps`` changed or differs
from the manifest). State ``{"v", "d"}``, zero for a fresh optimizer, else torch's ``square_avg`` and ``acc_delta``
when recording started. Parameter groups that differ in ``rho`` or ``eps`` are refused: the trajectory does not
record which tensor belongs to which group. ASGD needs no function of its own: its coefficients do not depend on the
gradient, so the ``sgd`` record's linear update (``a = 0``, ``b = 1`` as recorded) is its pure update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from explaind.recurrence import LinearUpdate

from .pure_more import _constant, _missing, _shared

__all__ = ["AdadeltaUpdate", "adadelta_update_fn"]


class AdadeltaUpdate:
    """:class:`torch.optim.Adadelta`'s update as a pure function of ``(theta, v, d)`` and ``g``.

    Parameters
    ----------
    rho, eps : float
        The running means' decay and the constant added under both square roots.
    """

    def __init__(self, rho: float, eps: float):
        self.rho, self.eps = float(rho), float(eps)

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """``{"v": zeros, "d": zeros}``: a fresh optimizer's running means."""
        return {"v": torch.zeros_like(theta), "d": torch.zeros_like(theta)}

    def start_state(self, theta: Tensor, m: Tensor | None, saved: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """``{"v": square_avg, "d": acc_delta}`` of torch's state at the start (zeros where it had none)."""
        if not saved:
            return self.init_state(theta)
        entry = _missing("Adadelta", saved, ("square_avg", "acc_delta"))
        return {"v": entry["square_avg"].to(theta), "d": entry["acc_delta"].to(theta)}

    def _ratio(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor],
               grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u = grad + update.lambda_c * theta
        v = self.rho * state["v"] + (1.0 - self.rho) * u * u
        return u, v, torch.sqrt(state["d"] + self.eps) / torch.sqrt(v + self.eps)

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """``{"step_size": S_s}`` with ``S_s = P_s / ratio`` (the signed ``lr_s``), checked constant."""
        with torch.no_grad():
            _, _, ratio = self._ratio(update, theta, state, grad)
            P = torch.as_tensor(update.P, dtype=ratio.dtype, device=ratio.device)
            S = _constant(P / ratio, f"Adadelta pure update: the recorded P_s is not lr_s sqrt(acc_delta + eps) / "
                          f"sqrt(square_avg + eps) with rho={self.rho}, eps={self.eps} from the manifest and the "
                          f"replayed running means", "keep rho and eps constant to use CounterfactualEstimator "
                          "(InfluenceEstimator does not need them).")
        return {"step_size": S}

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``theta' = theta - S_s delta - lambda_d theta`` and ``{"v": v', "d": d'}``."""
        u, v, ratio = self._ratio(update, theta, state, grad)
        delta = ratio * u
        d = self.rho * state["d"] + (1.0 - self.rho) * delta * delta
        return theta - scalars["step_size"] * delta - update.lambda_d * theta, {"v": v, "d": d}


def adadelta_update_fn(hyperparameters: Mapping[str, Any]) -> AdadeltaUpdate:
    """The ``update_fn`` of the ``adadelta`` record.

    Raises
    ------
    ConfigError
        When the parameter groups differ in ``rho`` or ``eps``.
    """
    rho, eps = _shared(hyperparameters, {"rho": 0.9, "eps": 1e-6}, "Adadelta")
    return AdadeltaUpdate(rho, eps)
