r"""torch's and transformers' Adafactor updates as pure, differentiable functions (docs/maths.md §9).

The companion of :mod:`explaind_optimizers.adafactor` for the ``adafactor`` record:
``adafactor_update_fn(hyperparameters)`` returns a :class:`explaind.recurrence.PureUpdate` for one parameter
tensor. With ``t`` the step count after the step, ``w_t = t^{beta2_decay}`` and ``eps1, eps2, d`` from the
manifest,

* a tensor of two or more dimensions keeps row and column factors,
  ``R' = R + w_t (mean_{-1}(g^2) - R)``, ``C' = C + w_t (mean_{-2}(g^2) - C)`` and
  ``V = R' C' / max(mean_{-2}(R'), eps1)``; a vector keeps ``V' = V + w_t (g^2 - V)`` itself;
* ``r = max(V, eps1^2)^{-1/2}``, ``delta = max(1, RMS(r g) / d)``, and
  ``theta' = theta - lambda_d theta - S_s max(eps2, RMS(theta)) r g / delta``.

State ``{"row", "col", "step"}`` or ``{"v", "step"}``. The relative step size ``S_s = sigma rho_t`` (``rho_t =
min(lr_s, 1/sqrt(t))``, signed by ``maximize``) is not stored by the recorder; :meth:`AdafactorUpdate.scalars`
recovers it from the recorded preconditioner ``P_s = S_s max(eps2, RMS(theta)) r / delta`` (one value for every
entry of the tensor, which is checked) and holds it fixed. The update depends on ``theta`` also through
``RMS(theta)`` and on ``g`` through ``r`` and ``delta``; both are differentiated.

:class:`HFAdafactorUpdate` is transformers' variant (``hf_adafactor``; formulas in
:mod:`explaind_optimizers.hf_adafactor`), with its optional first moment of the scaled steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from explaind.recurrence import LinearUpdate

from .pure import _safe_sqrt
from .pure_more import _constant, _missing, _shared

__all__ = ["AdafactorUpdate", "HFAdafactorUpdate", "adafactor_update_fn", "hf_adafactor_update_fn"]


class AdafactorUpdate:
    """:class:`torch.optim.Adafactor`'s update as a pure function of ``(theta, factors, step)`` and ``g``.

    Parameters
    ----------
    beta2_decay, eps1, eps2, d : float
        Shared by every parameter group (``eps1`` as torch applied it).
    """

    def __init__(self, beta2_decay: float, eps1: float, eps2: float, d: float):
        self.beta2_decay, self.eps1, self.eps2, self.d = float(beta2_decay), float(eps1), float(eps2), float(d)

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """Zero factors (or zero ``v`` for a vector) and step count, as torch creates them at the first step."""
        step = torch.zeros((), dtype=theta.dtype, device=theta.device)
        if theta.dim() > 1:
            return {"row": theta.new_zeros((*theta.shape[:-1], 1)), "col": theta.new_zeros((*theta.shape[:-2], 1,
                                                                                             theta.shape[-1])),
                    "step": step}
        return {"v": torch.zeros_like(theta), "step": step}

    def start_state(self, theta: Tensor, m: Tensor | None, saved: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """torch's state entry at the start (``row_var``/``col_var`` or ``variance``, and ``step``).

        Raises
        ------
        ConfigError
            When ``saved`` is ``None`` or lacks an entry.
        """
        keys = ("row_var", "col_var", "step") if theta.dim() > 1 else ("variance", "step")
        entry = _missing("Adafactor", saved, keys)
        step = torch.tensor(float(entry["step"]), dtype=theta.dtype, device=theta.device)
        if theta.dim() > 1:
            return {"row": entry["row_var"].to(theta), "col": entry["col_var"].to(theta), "step": step}
        return {"v": entry["variance"].to(theta), "step": step}

    def _preconditioned(self, state: dict[str, Tensor], grad: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(r, delta, new state)`` of the module docstring."""
        step = state["step"] + 1.0
        w = step ** self.beta2_decay
        square = grad * grad
        if "row" in state:
            row = state["row"] + w * (square.mean(dim=-1, keepdim=True) - state["row"])
            col = state["col"] + w * (square.mean(dim=-2, keepdim=True) - state["col"])
            estimate = row @ col / torch.clamp(row.mean(dim=-2, keepdim=True), min=self.eps1)
            new = {"row": row, "col": col, "step": step}
        else:
            estimate = state["v"] + w * (square - state["v"])
            new = {"v": estimate, "step": step}
        r = torch.rsqrt(torch.clamp(estimate, min=self.eps1 * self.eps1))
        rms = _safe_sqrt((r * grad).pow(2).mean())
        return r, torch.clamp(rms / self.d, min=1.0), new

    def _scale(self, theta: Tensor) -> Tensor:
        return torch.clamp(_safe_sqrt(theta.pow(2).mean()), min=self.eps2)

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """``{"step_size": S_s}`` with ``S_s = P_s delta / (max(eps2, RMS(theta)) r)``, checked constant.

        Raises
        ------
        ConfigError
            When the recorded ``P_s`` is not of this form (``beta2_decay``, ``eps`` or ``d`` changed during the run
            or differ from the manifest).
        """
        with torch.no_grad():
            r, delta, _ = self._preconditioned(state, grad)
            P = torch.as_tensor(update.P, dtype=r.dtype, device=r.device)
            step_size = _constant(P * delta / (self._scale(theta) * r),
                                  f"Adafactor pure update: the recorded P_s is not S_s max(eps2, RMS(theta)) r / delta "
                                  f"with beta2_decay={self.beta2_decay}, eps=({self.eps1}, {self.eps2}), d={self.d} "
                                  f"from the manifest",
                                  "keep beta2_decay, eps and d constant to use CounterfactualEstimator "
                                  "(InfluenceEstimator does not need them).")
        return {"step_size": step_size}

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``theta'`` and the new state (the input's key order)."""
        r, delta, new = self._preconditioned(state, grad)
        theta_next = (theta - update.lambda_d * theta
                      - scalars["step_size"] * self._scale(theta) / delta * r * grad)
        return theta_next, {k: new[k] for k in state}


def adafactor_update_fn(hyperparameters: Mapping[str, Any]) -> AdafactorUpdate:
    """The ``update_fn`` of the ``adafactor`` record.

    Raises
    ------
    ConfigError
        When the parameter groups differ in ``beta2_decay``, ``eps`` (as applied) or ``d`` (which group a tensor
        belongs to is not recorded).
    """
    groups = [{**g, "eps2": (g.get("eps") or (None, 1e-3))[1]} for g in hyperparameters.get("param_groups") or [{}]
              if g.get("n_params", 1)]
    beta2_decay, eps1, eps2, d = _shared({"param_groups": groups or [{}]}, {
        "beta2_decay": -0.8, "eps1_used": torch.finfo(torch.float32).eps, "eps2": 1e-3, "d": 1.0}, "Adafactor")
    return AdafactorUpdate(beta2_decay, eps1, eps2, d)


class HFAdafactorUpdate:
    """transformers' ``Adafactor`` update as a pure function of ``(theta, factors, step[, m])`` and ``g``.

    With ``w_t = t^{decay_rate}``, ``R' = R + w_t (mean_{-1}(g^2 + eps1) - R)`` and ``C'`` likewise over the axis
    -2 (a vector: ``V'``), ``r = (R' / mean_{-1}(R'))^{-1/2} C'^{-1/2}`` (``V'^{-1/2}``), ``delta = max(1, RMS(r g) /
    clip_threshold)``, ``lambda = S_s max(eps2, RMS(theta))`` with ``scale_parameter`` (else ``S_s``),
    ``u = (lambda / delta) r g``, ``m' = beta1 m + (1 - beta1) u`` with ``beta1``, and
    ``theta' = theta - wd_s lambda theta - (m' or u)``. The unscaled step size ``S_s`` (``lr_s`` or the relative
    step) and ``wd_s`` are recovered from the recorded coefficients and held fixed.
    """

    def __init__(self, decay_rate: float, eps1: float, eps2: float, clip: float, beta1: float | None, scale: bool):
        self.decay_rate, self.eps1, self.eps2, self.clip = float(decay_rate), float(eps1), float(eps2), float(clip)
        self.beta1, self.scale = (None if beta1 is None else float(beta1)), bool(scale)

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """Zero factors (a vector: zero ``v``), step count and, with ``beta1``, first moment."""
        state = {"step": torch.zeros((), dtype=theta.dtype, device=theta.device)}
        if theta.dim() >= 2:
            state.update(row=theta.new_zeros(theta.shape[:-1]),
                         col=theta.new_zeros(theta.shape[:-2] + theta.shape[-1:]))
        else:
            state["v"] = torch.zeros_like(theta)
        if self.beta1 is not None:
            state["m"] = torch.zeros_like(theta)
        return state

    def start_state(self, theta: Tensor, m: Tensor | None, saved: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """transformers' state entry at the start (``exp_avg_sq_row``/``exp_avg_sq_col`` or ``exp_avg_sq``,
        ``step``) and the stored :math:`m_{-1}` (``exp_avg``).

        Raises
        ------
        ConfigError
            When ``saved`` is ``None`` or lacks an entry.
        """
        keys = ("exp_avg_sq_row", "exp_avg_sq_col", "step") if theta.dim() >= 2 else ("exp_avg_sq", "step")
        entry = _missing("transformers' Adafactor", saved, keys)
        state = {"step": torch.tensor(float(entry["step"]), dtype=theta.dtype, device=theta.device)}
        if theta.dim() >= 2:
            state.update(row=entry["exp_avg_sq_row"].to(theta), col=entry["exp_avg_sq_col"].to(theta))
        else:
            state["v"] = entry["exp_avg_sq"].to(theta)
        if self.beta1 is not None:
            state["m"] = torch.zeros_like(theta) if m is None else m.to(theta)
        return state

    def _direction(self, state: dict[str, Tensor], grad: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(r, delta, new factors and step)``."""
        step = state["step"] + 1.0
        w = step ** self.decay_rate
        square = grad * grad + self.eps1
        if "row" in state:
            row = state["row"] + w * (square.mean(dim=-1) - state["row"])
            col = state["col"] + w * (square.mean(dim=-2) - state["col"])
            r = torch.rsqrt(row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * torch.rsqrt(col).unsqueeze(-2)
            new = {"row": row, "col": col, "step": step}
        else:
            v = state["v"] + w * (square - state["v"])
            r, new = torch.rsqrt(v), {"v": v, "step": step}
        rms = _safe_sqrt((r * grad).pow(2).mean())
        return r, torch.clamp(rms / self.clip, min=1.0), new

    def _scale(self, theta: Tensor) -> Tensor | float:
        return torch.clamp(_safe_sqrt(theta.pow(2).mean()), min=self.eps2) if self.scale else 1.0

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """``{"step_size": S_s, "decay": wd_s}`` from the recorded gain (``P``, or ``b / (1 - beta1)`` with
        ``beta1``) and ``lambda_d``, the step size checked constant over the tensor's entries.

        Raises
        ------
        ConfigError
            When the recorded coefficients are not of this form (hyperparameters changed or differ from the
            manifest).
        """
        with torch.no_grad():
            r, delta, _ = self._direction(state, grad)
            gain = update.P if self.beta1 is None else update.b
            gain = torch.as_tensor(gain, dtype=r.dtype, device=r.device)
            if self.beta1 is not None:
                gain = gain / (1.0 - self.beta1)
            size = _constant(gain * delta / (self._scale(theta) * r),
                             f"transformers' Adafactor pure update: the recorded gain is not (lambda / delta) r with "
                             f"decay_rate={self.decay_rate}, eps=({self.eps1}, {self.eps2}), clip_threshold="
                             f"{self.clip}, beta1={self.beta1}, scale_parameter={self.scale} from the manifest",
                             "keep these hyperparameters constant to use CounterfactualEstimator "
                             "(InfluenceEstimator does not need them).")
            step = size * float(self._scale(theta))
        decay = float(update.lambda_d) / step if step else 0.0
        return {"step_size": size, "decay": decay}

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``theta'`` and the new state (the input's key order)."""
        r, delta, new = self._direction(state, grad)
        step = scalars["step_size"] * self._scale(theta)
        u = step / delta * r * grad
        if self.beta1 is not None:
            new["m"] = self.beta1 * state["m"] + (1.0 - self.beta1) * u
            u = new["m"]
        return theta - scalars["decay"] * step * theta - u, {k: new[k] for k in state}


def hf_adafactor_update_fn(hyperparameters: Mapping[str, Any]) -> HFAdafactorUpdate:
    """The ``update_fn`` of the ``hf_adafactor`` record.

    Raises
    ------
    ConfigError
        When the parameter groups differ in ``decay_rate``, ``eps``, ``clip_threshold``, ``beta1`` or
        ``scale_parameter`` (which group a tensor belongs to is not recorded).
    """
    groups = [{**g, "eps1": (g.get("eps") or (1e-30, 1e-3))[0], "eps2": (g.get("eps") or (1e-30, 1e-3))[1],
               "beta1": -1.0 if g.get("beta1") is None else g["beta1"]}
              for g in hyperparameters.get("param_groups") or [{}] if g.get("n_params", 1)]
    decay_rate, eps1, eps2, clip, beta1, scale = _shared({"param_groups": groups or [{}]}, {
        "decay_rate": -0.8, "eps1": 1e-30, "eps2": 1e-3, "clip_threshold": 1.0, "beta1": -1.0,
        "scale_parameter": True}, "transformers' Adafactor")
    return HFAdafactorUpdate(decay_rate, eps1, eps2, clip, None if beta1 == -1.0 else beta1, scale)
