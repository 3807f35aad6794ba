r"""RMSprop's and Adagrad's updates as pure, differentiable functions (docs/maths.md §9).

The companions of :mod:`explaind_optimizers.pure` for the ``rmsprop`` and ``adagrad`` records: each
``update_fn(hyperparameters)`` returns a :class:`explaind.recurrence.PureUpdate` for one parameter tensor.

* **RMSprop** (L2 weight decay, momentum, centered, maximize): with ``u = g + lambda_c theta``,
  ``v' = alpha v + (1 - alpha) u^2`` (centered: ``gbar' = alpha gbar + (1 - alpha) u``) and
  ``d = sqrt(v') + eps`` (centered: ``sqrt(v' - gbar'^2) + eps``),

  - momentum ``mu > 0`` (recorded ``b`` is ``1 / d``): ``m' = a m + u / d``, ``theta' = theta - P m'``
    with the recorded ``a = mu`` and ``P = lr_s``;
  - momentum 0 (recorded ``P = lr_s / d``): ``theta' = theta - S_s u / d`` with ``S_s = P_s d``,
    recovered from the recorded preconditioner and held fixed (the modelled buffer follows the recorded
    ``m' = a m + b u``; with momentum switched off mid-run it stays, ``a, b = 1, 0``).

  Which form a step has is read from its recorded ``a``: ``a = 0`` without momentum, ``a = 1, b = 0``
  switched off, ``a = mu > 0`` otherwise. State ``{"m", "v"}`` (and ``"gbar"``, in the recurrence's sign:
  ``-grad_avg`` under maximize). ``alpha``, ``eps`` and ``centered`` come from the manifest.
* **Adagrad** (lr decay, L2 weight decay, initial accumulator, maximize): ``sum' = sum + u^2``,
  ``theta' = theta - S_s u / (sqrt(sum') + eps)`` with ``S_s = P_s (sqrt(sum') + eps)`` (the decayed,
  signed ``clr``) recovered and held fixed; state ``{"sum"}``, starting from ``initial_accumulator_value``.

Both check the recovered per-step constant to :data:`RATIO_RTOL` over a tensor's entries, which catches a
run whose ``alpha``, ``eps`` or ``centered`` changed or differs from the manifest. Parameter groups that differ
in those hyperparameters are refused: the trajectory does not record which tensor belongs to which group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from explaind.exceptions import ConfigError
from explaind.recurrence import LinearUpdate

from .pure import _safe_sqrt

__all__ = ["AdagradUpdate", "RMSpropUpdate", "adagrad_update_fn", "rmsprop_update_fn"]

#: Largest relative spread of a recovered per-step constant over a tensor's entries.
RATIO_RTOL = 1e-6


def _constant(values: Tensor, what: str, fix: str) -> float:
    """The median of ``values`` (flattened), checked constant to :data:`RATIO_RTOL` relative."""
    flat = values.reshape(-1)
    mid = flat.median()
    spread = float((flat - mid).abs().max() / mid.abs().clamp_min(torch.finfo(flat.dtype).tiny))
    if not spread <= RATIO_RTOL:
        raise ConfigError(f"{what} (entries of one tensor differ by {spread:.2e} relative; allowed: "
                          f"{RATIO_RTOL:.0e}). Fix: {fix}")
    return float(mid)


def _is(value: Any, number: float) -> bool:
    return not isinstance(value, Tensor) and float(value) == number


def _shared(hyperparameters: Mapping[str, Any], keys: Mapping[str, Any], name: str) -> tuple[Any, ...]:
    """The values of ``keys`` (defaults given) shared by every parameter group; ConfigError when they differ."""
    groups = list(hyperparameters.get("param_groups") or [{}])
    found = {tuple(g.get(k, d) for k, d in keys.items()) for g in groups}
    if len(found) != 1:
        listed = ", ".join("(" + ", ".join(f"{k}={v}" for k, v in zip(keys, f)) + ")" for f in sorted(found))
        raise ConfigError(
            f"{name} pure update: the parameter groups differ in {', '.join(keys)} ({listed}); the trajectory does not "
            f"record which parameter tensor belongs to which group, so the optimizer state cannot be replayed. "
            f"Allowed: one value of each for all groups (lr and weight_decay may differ). Fix: record the run with "
            f"shared values to use CounterfactualEstimator (InfluenceEstimator does not need them)."
        )
    return found.pop()


def _missing(name: str, saved: Mapping[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    entry = dict(saved or {})
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ConfigError(
            f"{name} pure update: the run started from optimizer state, and its start file does not hold {missing} "
            f"of that state (a store written before explaind kept the optimizer's whole start state keeps only the "
            f"first moment). Fix: re-record the run with this explaind, or use InfluenceEstimator (its "
            f"initial_state term needs only the first moment)."
        )
    return entry


class RMSpropUpdate:
    """:class:`torch.optim.RMSprop`'s update as a pure function of ``(theta, m, v[, gbar])`` and ``g``.

    Parameters
    ----------
    alpha, eps : float
        Second-moment decay and the denominator's epsilon (shared by every parameter group).
    centered : bool
        Subtract the squared running mean ``gbar`` in the denominator.
    sign : float
        ``-1`` under ``maximize`` (the modelled ``gbar`` is then ``-grad_avg``), else ``1``.
    """

    def __init__(self, alpha: float, eps: float, centered: bool, sign: float = 1.0):
        self.alpha, self.eps, self.centered, self.sign = float(alpha), float(eps), bool(centered), float(sign)

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """Zero buffer and moments (torch starts ``square_avg``, ``grad_avg``, ``momentum_buffer`` at zero)."""
        state = {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta)}
        if self.centered:
            state["gbar"] = torch.zeros_like(theta)
        return state

    def start_state(self, theta: Tensor, m: Tensor | None, saved: Mapping[str, Any] | None) -> dict[str, Tensor]:
        r"""The state of a run recorded from an optimizer that held state: :math:`m_{-1}`, ``square_avg``, ``grad_avg``.

        Raises
        ------
        ConfigError
            When ``saved`` is ``None`` or lacks ``square_avg`` (or, centered, ``grad_avg``).
        """
        entry = _missing("RMSprop", saved, ("square_avg",) + (("grad_avg",) if self.centered else ()))
        state = {"m": torch.zeros_like(theta) if m is None else m.to(theta), "v": entry["square_avg"].to(theta)}
        if self.centered:
            state["gbar"] = self.sign * entry["grad_avg"].to(theta)
        return state

    def _moments(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        u = grad + update.lambda_c * theta
        new = {"v": self.alpha * state["v"] + (1.0 - self.alpha) * u * u}
        square = new["v"]
        if self.centered:
            new["gbar"] = self.alpha * state["gbar"] + (1.0 - self.alpha) * u
            square = square - new["gbar"] * new["gbar"]
        return u, _safe_sqrt(square) + self.eps, new

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """``{"step_size": S_s}`` (momentum 0: ``P_s d_s``) or ``{}`` (momentum: ``b_s d_s = 1`` is checked).

        Raises
        ------
        ConfigError
            When the recorded coefficients are not those of ``alpha``, ``eps`` and ``centered`` of the manifest
            (a scheduler changed them during the run).
        """
        fix = ("keep alpha, eps and centered constant to use CounterfactualEstimator (InfluenceEstimator does not "
               "need it).")
        with torch.no_grad():
            _, d, _ = self._moments(update, theta, state, grad)
            if _is(update.a, 0.0) or (_is(update.a, 1.0) and _is(update.b, 0.0)):
                P = torch.as_tensor(update.P, dtype=d.dtype, device=d.device)
                S = _constant(P * d, f"RMSprop pure update: the recorded P_s is not lr_s / d_s with "
                              f"alpha={self.alpha}, eps={self.eps}, centered={self.centered} from the manifest", fix)
                return {"step_size": S}
            b = torch.as_tensor(update.b, dtype=d.dtype, device=d.device)
            one = _constant(b * d, f"RMSprop pure update: the recorded b_s is not 1 / d_s with alpha={self.alpha}, "
                            f"eps={self.eps}, centered={self.centered} from the manifest", fix)
            if abs(one - 1.0) > RATIO_RTOL:
                raise ConfigError(f"RMSprop pure update: the recorded b_s d_s is {one!r}, not 1 (alpha, eps or "
                                  f"centered differ from the manifest). Fix: {fix}")
        return {}

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``theta'`` and the new state; the form (momentum or not) as :meth:`scalars` found it."""
        u, d, new = self._moments(update, theta, state, grad)
        if "step_size" in scalars:
            new["m"] = update.a * state["m"] + update.b * u
            theta_next = theta - scalars["step_size"] * u / d - update.lambda_d * theta
        else:
            new["m"] = update.a * state["m"] + u / d
            theta_next = theta - update.P * (update.q * new["m"] + update.n * u / d) - update.lambda_d * theta
        return theta_next, {k: new[k] for k in state}  # the input's key order (torch.func compares the trees)


class AdagradUpdate:
    """:class:`torch.optim.Adagrad`'s update as a pure function of ``(theta, sum)`` and ``g``.

    Parameters
    ----------
    eps : float
        Added to the square root of the accumulator.
    initial : float or None
        ``initial_accumulator_value`` (the accumulator of a fresh optimizer); ``None`` when the groups differ in it.
    """

    def __init__(self, eps: float, initial: float | None):
        self.eps, self.initial = float(eps), None if initial is None else float(initial)

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """``{"sum": initial_accumulator_value}`` shaped like ``theta``.

        Torch builds Adagrad's state with the optimizer, so a recorded run starts from :meth:`start_state`; this
        serves a replay without a stored start (the conformance suite).

        Raises
        ------
        ConfigError
            When the parameter groups differ in ``initial_accumulator_value``.
        """
        if self.initial is None:
            raise ConfigError("Adagrad pure update: the parameter groups differ in initial_accumulator_value and the "
                              "run holds no stored start state to read each tensor's accumulator from. Fix: record "
                              "the run with this explaind (it stores the optimizer's state at the start), or share "
                              "initial_accumulator_value between the groups.")
        return {"sum": torch.full_like(theta, self.initial)}

    def start_state(self, theta: Tensor, m: Tensor | None, saved: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """``{"sum": state["sum"]}`` of torch's state at the start (torch builds it with the optimizer)."""
        return {"sum": _missing("Adagrad", saved, ("sum",))["sum"].to(theta)}

    def _std(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor],
             grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u = grad + update.lambda_c * theta
        total = state["sum"] + u * u
        return u, _safe_sqrt(total) + self.eps, total

    def scalars(self, update: LinearUpdate, theta: Tensor, state: dict[str, Tensor], grad: Tensor) -> dict[str, Any]:
        """``{"step_size": S_s}`` with ``S_s = P_s (sqrt(sum') + eps)`` (the signed ``clr``), checked constant."""
        with torch.no_grad():
            _, std, _ = self._std(update, theta, state, grad)
            P = torch.as_tensor(update.P, dtype=std.dtype, device=std.device)
            S = _constant(P * std, f"Adagrad pure update: the recorded P_s is not clr_s / (sqrt(sum) + eps) with "
                          f"eps={self.eps} from the manifest and the replayed accumulator",
                          "keep eps constant to use CounterfactualEstimator (InfluenceEstimator does not need it).")
        return {"step_size": S}

    def __call__(self, update: LinearUpdate, scalars: dict[str, Any], theta: Tensor, state: dict[str, Tensor],
                 grad: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``theta' = theta - S_s u / (sqrt(sum') + eps)`` and ``{"sum": sum'}``."""
        u, std, total = self._std(update, theta, state, grad)
        return theta - scalars["step_size"] * u / std - update.lambda_d * theta, {"sum": total}


def rmsprop_update_fn(hyperparameters: Mapping[str, Any]) -> RMSpropUpdate:
    """The ``update_fn`` of the ``rmsprop`` record.

    Raises
    ------
    ConfigError
        When the parameter groups differ in ``alpha``, ``eps`` or ``centered`` (and, centered, ``maximize``).
    """
    alpha, eps, centered = _shared(hyperparameters, {"alpha": 0.99, "eps": 1e-8, "centered": False}, "RMSprop")
    sign = 1.0
    if centered:
        (maximize,) = _shared(hyperparameters, {"maximize": False}, "RMSprop (centered)")
        sign = -1.0 if maximize else 1.0
    return RMSpropUpdate(alpha, eps, centered, sign)


def adagrad_update_fn(hyperparameters: Mapping[str, Any]) -> AdagradUpdate:
    """The ``update_fn`` of the ``adagrad`` record.

    Raises
    ------
    ConfigError
        When the parameter groups differ in ``eps``. Groups that differ in ``initial_accumulator_value`` are
        refused only where a replay has no stored start state (:meth:`AdagradUpdate.init_state`).
    """
    (eps,) = _shared(hyperparameters, {"eps": 1e-10}, "Adagrad")
    groups = list(hyperparameters.get("param_groups") or [{}])
    initial = {float(g.get("initial_accumulator_value", 0.0)) for g in groups}
    return AdagradUpdate(eps, initial.pop() if len(initial) == 1 else None)
