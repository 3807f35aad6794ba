r"""NAdam, RAdam and Adamax updates as pure, differentiable functions (docs/maths.md §9).

Each update keeps the first moment ``m``, a second statistic ``w`` of the inputs and the step count
``t``, and moves the parameter by the recorded scalars over a denominator ``d`` that depends on the
gradient through ``w``:

.. math::

    u &= g + \lambda^c \theta, \qquad m' = a m + b u, \qquad t' = t + 1 \\
    \theta' &= \theta - \lambda^d \theta - S_s \, \frac{q m' + n u}{d(w', t')}

* **NAdam**: ``w' = beta2 w + (1 - beta2) u^2``, ``d = sqrt(w') / sqrt(1 - beta2^t') + eps``; ``q`` and
  ``n`` (momentum-decay schedule and ``mu_product``) are the recorded ones and ``S_s = P_s d = ±1``.
* **RAdam**: ``w`` as NAdam's; ``d = sqrt(w') + eps`` at a rectified step (``rho_t' > 5``), else ``d = 1``;
  ``S_s = lr r_t sqrt(1 - beta2^t) / (1 - beta1^t)`` or ``lr / (1 - beta1^t)``.
* **Adamax**: ``w' = max(beta2 w, |u| + eps)`` (``exp_inf``), ``d = w'``, ``S_s = lr / (1 - beta1^t)``.

``S_s`` (scheduled, signed under ``maximize``) is not stored by the recorder:
:meth:`ScaledMomentUpdate.scalars` recovers it from the recorded preconditioner as ``P_s d`` — one value
for every entry of the tensor, which is checked to :data:`~explaind_optimizers.pure.STEP_SIZE_RTOL` — and
holds it fixed.
``beta2`` and ``eps`` come from the manifest; groups that differ in them are refused, because the
trajectory does not record which tensor belongs to which group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from explaind.exceptions import ConfigError
from explaind.recurrence import LinearUpdate

from .pure import _safe_sqrt, recovered_step_size

__all__ = ["AdamaxUpdate", "NAdamUpdate", "RAdamUpdate", "ScaledMomentUpdate", "adamax_update_fn",
           "nadam_update_fn", "radam_update_fn"]


class ScaledMomentUpdate:
    """Base of the three pure updates: state ``{"m", "w", "step"}`` (subclasses set ``second`` and ``_denominator``).

    Parameters
    ----------
    beta2, eps : float
        Decay of the second statistic and the denominator's epsilon (shared by every parameter group).
    """

    #: registry name of the adapter (in messages).
    label: ClassVar[str]
    #: torch's state entry holding ``w`` (``"exp_avg_sq"`` or ``"exp_inf"``).
    second: ClassVar[str] = "exp_avg_sq"

    def __init__(self, beta2: float, eps: float):
        self.beta2 = float(beta2)
        self.eps = float(eps)

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """Zero moments and step count."""
        return {"m": torch.zeros_like(theta), "w": torch.zeros_like(theta),
                "step": torch.zeros((), dtype=theta.dtype, device=theta.device)}

    def start_state(self, theta: Tensor, m: Tensor | None, saved: Mapping[str, Any] | None) -> dict[str, Tensor]:
        r"""The state of a run recorded from an optimizer that held state: :math:`m_{-1}`, ``w`` and ``step``.

        Raises
        ------
        ConfigError
            When ``saved`` is ``None`` (a store that kept only :math:`m_{-1}`) or lacks an entry.
        """
        entry = dict(saved or {})
        missing = [k for k in (self.second, "step") if k not in entry]
        if missing:
            raise ConfigError(
                f"{self.label} pure update: the run started from optimizer state, and its start file does not hold "
                f"{missing} of that state, so the optimizer's statistics before step 0 are unknown. Fix: re-record "
                f"the run with this explaind, or use InfluenceEstimator (its initial_state term needs only the first "
                f"moment)."
            )
        return {"m": torch.zeros_like(theta) if m is None else m.to(theta), "w": entry[self.second].to(theta),
                "step": torch.tensor(float(entry["step"]), dtype=theta.dtype, device=theta.device)}

    def _second(self, w: Tensor, u: Tensor) -> Tensor:
        """``w'`` from ``w`` and the input ``u`` (default: Adam's second moment)."""
        return self.beta2 * w + (1.0 - self.beta2) * u * u

    def _denominator(self, w: Tensor, step: Tensor) -> Tensor:
        """``d(w', t')``."""
        raise NotImplementedError

    def _forward(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        u = grad + update.lambda_c * theta
        new = {"m": update.a * state["m"] + update.b * u, "w": self._second(state["w"], u),
               "step": state["step"] + 1.0}
        return u, self._denominator(new["w"], new["step"]), new

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """``{"step_size": S_s}`` with ``S_s = P_s d_s``, checked constant over the tensor.

        Raises
        ------
        ConfigError
            When ``P_s d_s`` differs between entries by more than
            :data:`~explaind_optimizers.pure.STEP_SIZE_RTOL` relative (``beta2`` or ``eps`` changed during
            the run or differ from the manifest).
        """
        with torch.no_grad():
            _, denom, _ = self._forward(update, theta, state, grad)
        return {"step_size": recovered_step_size(update.P, denom, self.label, "S_s", self.beta2, self.eps)}

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``theta' = theta - lambda_d theta - S_s (q m' + n u) / d`` and the new state."""
        u, denom, new = self._forward(update, theta, state, grad)
        direction = update.q * new["m"] + update.n * u
        return theta - update.lambda_d * theta - scalars["step_size"] * direction / denom, new


class NAdamUpdate(ScaledMomentUpdate):
    """:class:`torch.optim.NAdam`'s update: ``d = sqrt(w') / sqrt(1 - beta2^t') + eps``."""

    label = "NAdam"

    def _denominator(self, w: Tensor, step: Tensor) -> Tensor:
        return _safe_sqrt(w) / torch.sqrt(1.0 - self.beta2**step) + self.eps


class RAdamUpdate(ScaledMomentUpdate):
    """:class:`torch.optim.RAdam`'s update: ``d = sqrt(w') + eps`` at a rectified step, else 1."""

    label = "RAdam"

    def _denominator(self, w: Tensor, step: Tensor) -> Tensor:
        # rho_t as in explaind_optimizers.radam.radam_rectification, in tensor operations (no .item() under vjp)
        rho_inf = 2 / (1 - self.beta2) - 1
        rho_t = rho_inf - 2 * step * self.beta2**step / (1 - self.beta2**step)
        return torch.where(rho_t > 5.0, _safe_sqrt(w) + self.eps, torch.ones_like(w))


class AdamaxUpdate(ScaledMomentUpdate):
    """:class:`torch.optim.Adamax`'s update: ``w' = max(beta2 w, |u| + eps)``, ``d = w'``."""

    label = "Adamax"
    second = "exp_inf"

    def _second(self, w: Tensor, u: Tensor) -> Tensor:
        return torch.maximum(self.beta2 * w, u.abs() + self.eps)

    def _denominator(self, w: Tensor, step: Tensor) -> Tensor:
        return w


def _shared(label: str, hyperparameters: Mapping[str, Any]) -> tuple[float, float]:
    """``(beta2, eps)`` shared by every group of the manifest's hyperparameters."""
    groups = list(hyperparameters.get("param_groups") or [{}])
    keys = {(float(g.get("betas", (0.9, 0.999))[1]), float(g.get("eps", 1e-8))) for g in groups}
    if len(keys) != 1:
        found = ", ".join(f"(betas[1]={b}, eps={e})" for b, e in sorted(keys))
        raise ConfigError(
            f"{label} pure update: the parameter groups differ in betas[1] or eps ({found}); the trajectory does not "
            f"record which parameter tensor belongs to which group, so the optimizer's statistics cannot be "
            f"replayed. Allowed: one value of each for all groups (lr, betas[0] and weight_decay may differ). Fix: "
            f"record the run with shared betas[1] and eps to use CounterfactualEstimator."
        )
    return keys.pop()


def nadam_update_fn(hyperparameters: Mapping[str, Any]) -> NAdamUpdate:
    """The ``update_fn`` of the ``nadam`` record (``ConfigError``: groups differ in ``betas[1]``, ``eps``)."""
    return NAdamUpdate(*_shared("NAdam", hyperparameters))


def radam_update_fn(hyperparameters: Mapping[str, Any]) -> RAdamUpdate:
    """The ``update_fn`` of the ``radam`` record (``ConfigError``: groups differ in ``betas[1]``, ``eps``)."""
    return RAdamUpdate(*_shared("RAdam", hyperparameters))


def adamax_update_fn(hyperparameters: Mapping[str, Any]) -> AdamaxUpdate:
    """The ``update_fn`` of the ``adamax`` record (``ConfigError``: groups differ in ``betas[1]``, ``eps``)."""
    return AdamaxUpdate(*_shared("Adamax", hyperparameters))
