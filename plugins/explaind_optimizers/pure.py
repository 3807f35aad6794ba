r"""The built-in optimizers' updates as pure, differentiable functions (docs/maths.md §9).

``OptimizerAdapterRecord.update_fn(hyperparameters)`` returns a
:class:`explaind.recurrence.PureUpdate`: :math:`(\theta_{s+1}, \mathrm{state}_{s+1}) = U_s(\theta_s,
\mathrm{state}_s, g_s)` for one parameter tensor, written in torch operations so that
:func:`torch.func.vjp` differentiates it.

* **SGD** (momentum, dampening, Nesterov, L2 weight decay, maximize): the update is linear in
  ``(theta, m, g)`` and its coefficients do not depend on the gradient, so ``U_s`` is exactly the
  recorded recurrence ``u = g + lambda_c theta``, ``m' = a m + b u``,
  ``theta' = theta - P (q m' + n u) - lambda_d theta``; state ``{"m"}``.
* **Adam / AdamW** (L2 or decoupled weight decay, AMSGrad, maximize): the preconditioner depends
  on the gradient through the second moment,
  ``v' = beta2 v + (1 - beta2) u^2`` (AMSGrad: ``vmax' = max(vmax, v')``),
  ``d = sqrt(v') / sqrt(1 - beta2^t) + eps``, ``theta' = theta - lambda_d theta - S_s m' / d``;
  state ``{"m", "v", "step"}`` (and ``"vmax"``). The step size ``S_s = lr_s / (1 - beta1^t)``
  (scheduled, signed for ``maximize``) is not stored by the recorder; :meth:`AdamUpdate.scalars`
  recovers it from the recorded preconditioner as ``S_s = P_s d`` — one value for every entry of
  the tensor, which is checked — and holds it fixed. ``beta2``, ``eps`` and ``amsgrad`` come from
  the manifest; a run whose parameter groups differ in them is refused, because the trajectory
  does not record which tensor belongs to which group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from explaind.exceptions import ConfigError
from explaind.recurrence import LinearUpdate

__all__ = ["SGDUpdate", "AdamUpdate", "sgd_update_fn", "adam_update_fn", "recovered_step_size"]

#: Largest relative spread of the recovered Adam step size over a tensor's entries.
STEP_SIZE_RTOL = 1e-6


class SGDUpdate:
    """:class:`torch.optim.SGD`'s update as a pure function (linear in ``theta``, ``m`` and ``g``)."""

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """``{"m": zeros}``: the (modelled) momentum buffer before the first step."""
        return {"m": torch.zeros_like(theta)}

    def start_state(self, theta: Tensor, m: Tensor | None, saved: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """``{"m": m_-1}``: the recorded coefficients carry the rest (``a_0 = mu`` once the buffer exists)."""
        return {"m": torch.zeros_like(theta) if m is None else m.to(theta)}

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """SGD needs nothing beyond the recorded coefficients."""
        return {}

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``theta' = theta - P (q m' + n u) - lambda_d theta`` with ``m' = a m + b u``, ``u = g + lambda_c theta``."""
        u = grad + update.lambda_c * theta
        m = update.a * state["m"] + update.b * u
        return theta - update.P * (update.q * m + update.n * u) - update.lambda_d * theta, {"m": m}


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` with derivative 0 (not infinity) where ``v == 0`` (an entry whose gradient was always 0)."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def recovered_step_size(P: Any, denom: Tensor, label: str, size: str, beta2: float, eps: float) -> float:
    """The one step size ``S_s = P_s d_s`` of a tensor (its median), checked constant to :data:`STEP_SIZE_RTOL`.

    Parameters
    ----------
    P : float or Tensor
        The recorded preconditioner (shape of the parameter, or a float).
    denom : Tensor
        The pure update's denominator ``d_s`` at the recorded point (shape of the parameter).
    label, size : str
        The optimizer and its step size in words, for the message.
    beta2, eps : float
        The manifest's values, for the message.

    Raises
    ------
    ConfigError
        When ``P_s d_s`` differs between entries by more than :data:`STEP_SIZE_RTOL` relative:
        ``beta2`` or ``eps`` changed during the run or differ from the manifest.
    """
    with torch.no_grad():
        S = (torch.as_tensor(P, dtype=denom.dtype, device=denom.device) * denom).reshape(-1)
        mid = S.median()
        spread = float((S - mid).abs().max() / mid.abs().clamp_min(torch.finfo(S.dtype).tiny))
    if not spread <= STEP_SIZE_RTOL:
        raise ConfigError(
            f"{label} pure update: the recorded preconditioner P_s is not {size} / d_s with beta2={beta2} and "
            f"eps={eps} from the manifest (step sizes P_s * d_s of one tensor differ by {spread:.2e} relative; "
            f"allowed: {STEP_SIZE_RTOL:.0e}). This happens when a scheduler changed betas[1] or eps during the run. "
            f"Fix: keep betas[1] and eps constant to use CounterfactualEstimator (InfluenceEstimator does not need "
            f"them)."
        )
    return float(mid)


class AdamUpdate:
    """:class:`torch.optim.Adam`/:class:`~torch.optim.AdamW`'s update as a pure function of ``(theta, m, v)`` and ``g``.

    Parameters
    ----------
    beta2, eps : float
        Second-moment decay and the denominator's epsilon (shared by every parameter group).
    amsgrad : bool
        Use the running maximum of ``v`` (state ``"vmax"``).
    """

    def __init__(self, beta2: float, eps: float, amsgrad: bool):
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.amsgrad = bool(amsgrad)

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """Zero moments and step count (``"vmax"`` too with AMSGrad)."""
        state = {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta),
                 "step": torch.zeros((), dtype=theta.dtype, device=theta.device)}
        if self.amsgrad:
            state["vmax"] = torch.zeros_like(theta)
        return state

    def start_state(self, theta: Tensor, m: Tensor | None, saved: Mapping[str, Any] | None) -> dict[str, Tensor]:
        r"""The state of a run recorded from an optimizer that held state: :math:`m_{-1}`, ``exp_avg_sq``, ``step``.

        ``m`` is the stored :math:`m_{-1}` (the recurrence's sign: ``-exp_avg`` under ``maximize``), ``saved``
        torch's state entry of the parameter at the start (``exp_avg_sq``, ``step``, ``max_exp_avg_sq``).

        Raises
        ------
        ConfigError
            When ``saved`` is ``None`` (a store that kept only :math:`m_{-1}`) or lacks an entry.
        """
        keys = ("exp_avg_sq", "step") + (("max_exp_avg_sq",) if self.amsgrad else ())
        entry = dict(saved or {})
        missing = [k for k in keys if k not in entry]
        if missing:
            raise ConfigError(
                f"Adam pure update: the run started from optimizer state, and its start file does not hold "
                f"{missing} of that state (a store written before explaind kept the optimizer's whole start state "
                f"keeps only the first moment), so the second moment and the step count before step 0 are unknown. "
                f"Fix: re-record the run with this explaind, or use InfluenceEstimator (its initial_state term "
                f"needs only the first moment)."
            )
        state = {"m": torch.zeros_like(theta) if m is None else m.to(theta), "v": entry["exp_avg_sq"].to(theta),
                 "step": torch.tensor(float(entry["step"]), dtype=theta.dtype, device=theta.device)}
        if self.amsgrad:
            state["vmax"] = entry["max_exp_avg_sq"].to(theta)
        return state

    def _moments(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        u = grad + update.lambda_c * theta
        new = {"m": update.a * state["m"] + update.b * u,
               "v": self.beta2 * state["v"] + (1.0 - self.beta2) * u * u,
               "step": state["step"] + 1.0}
        if self.amsgrad:
            new["vmax"] = torch.maximum(state["vmax"], new["v"])
        second = new["vmax"] if self.amsgrad else new["v"]
        denom = _safe_sqrt(second) / torch.sqrt(1.0 - self.beta2 ** new["step"]) + self.eps
        return denom, new

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """``{"step_size": S_s}`` with ``S_s = P_s d_s`` (``lr_s / (1 - beta1^t)``, signed), checked constant.

        Raises :class:`ConfigError` as :func:`recovered_step_size` does (``beta2`` or ``eps`` changed).
        """
        with torch.no_grad():
            denom, _ = self._moments(update, theta, state, grad)
        return {"step_size": recovered_step_size(update.P, denom, "Adam", "lr_s / (1 - beta1^t)", self.beta2, self.eps)}

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``theta' = theta - lambda_d theta - S_s m' / d(v')`` and the new moments."""
        denom, new = self._moments(update, theta, state, grad)
        return theta - update.lambda_d * theta - scalars["step_size"] * new["m"] / denom, new


def sgd_update_fn(hyperparameters: Mapping[str, Any]) -> SGDUpdate:
    """The ``update_fn`` of the ``sgd`` adapter record (every SGD run is expressible)."""
    return SGDUpdate()


def adam_update_fn(hyperparameters: Mapping[str, Any]) -> AdamUpdate:
    """The ``update_fn`` of the ``adam`` and ``adamw`` records.

    Raises
    ------
    ConfigError
        When the parameter groups differ in ``betas[1]``, ``eps`` or ``amsgrad`` (which group a
        tensor belongs to is not recorded).
    """
    groups = list(hyperparameters.get("param_groups") or [{}])
    keys = {(float(g.get("betas", (0.9, 0.999))[1]), float(g.get("eps", 1e-8)), bool(g.get("amsgrad", False)))
            for g in groups}
    if len(keys) != 1:
        found = ", ".join(f"(betas[1]={b}, eps={e}, amsgrad={a})" for b, e, a in sorted(keys))
        raise ConfigError(
            f"Adam pure update: the parameter groups differ in betas[1], eps or amsgrad ({found}); the trajectory "
            f"does not record which parameter tensor belongs to which group, so the second moment cannot be "
            f"replayed. Allowed: one value of each for all groups (lr, betas[0] and weight_decay may differ). "
            f"Fix: record the run with shared betas[1], eps and amsgrad to use CounterfactualEstimator."
        )
    beta2, eps, amsgrad = keys.pop()
    return AdamUpdate(beta2, eps, amsgrad)
