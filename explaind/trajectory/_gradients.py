r"""Gradient bookkeeping of the recorder: raw-gradient snapshots, the scale ``c_s``, the gradient check, the audit.

* :class:`GradientTap` copies each parameter's accumulated gradient right after ``backward``
  (``Tensor.register_post_accumulate_grad_hook``), before the user's loop may clip or rescale it.
  At ``optimizer.step()`` the gradient the optimizer sees, :math:`g_s`, is compared with that raw
  gradient :math:`\tilde g_s`: the global factor :math:`c = \langle g_s, \tilde g_s\rangle /
  \langle \tilde g_s, \tilde g_s\rangle` is measured, and a per-coordinate change (not a global
  multiple) is an error.
* :func:`check_batch_gradient` recomputes :math:`\sum_k w_{s,k} \nabla\ell_k(\theta_s)` from the
  logged batch and the loss and measures the user's loss scale :math:`\sigma` with
  :math:`\tilde g_s = \sigma \sum_k w_{s,k}\nabla\ell_k(\theta_s)`.
* :class:`UpdateAudit` replays each step with the adapter's coefficients and reports
  :math:`\|E_s\| / \|\Delta\theta_s\|`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ..outputs import model_output
from ..recurrence import LinearUpdate

__all__ = ["GradientTap", "check_batch_gradient", "UpdateAudit", "default_tolerance", "has_stochastic_layers"]


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the gradient comparisons for parameters of ``dtype``."""
    return 1e-7 if dtype == torch.float64 else 1e-3


def has_stochastic_layers(model: nn.Module) -> list[str]:
    """Names of modules whose training-mode output depends on randomness or batch statistics."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(name or type(module).__name__)
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            found.append(name or type(module).__name__)
    return found


def _dot64(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())


class GradientTap:
    """Raw accumulated gradients, snapshotted after every ``backward`` that reaches a parameter.

    Parameters
    ----------
    params : dict of str to Parameter
        The trainable parameters.
    """

    def __init__(self, params: dict[str, nn.Parameter]):
        self._params = params
        self._raw: dict[str, Tensor] = {}
        self._version: dict[str, tuple[int, int]] = {}
        self._handles: list[Any] = []

    def attach(self) -> None:
        for name, p in self._params.items():
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str) -> Any:
        def hook(p: Tensor) -> None:
            g = p.grad
            if g is None:
                return
            buf = self._raw.get(name)
            if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
                self._raw[name] = g.detach().clone()
            else:  # neither tensor requires grad: no autograd bookkeeping
                buf.copy_(g.detach())
            self._version[name] = (id(g), g._version)

        return hook

    def reset(self) -> None:
        """Forget which parameters received a gradient (after each optimizer step)."""
        self._version.clear()

    def raw(self, name: str, seen: Tensor) -> Tensor:
        """The raw gradient of ``name`` (``seen`` itself when no backward reached it since the last step)."""
        return self._raw[name] if name in self._version else seen

    def measure(self, seen: dict[str, Tensor | None], step: int, tol: float) -> float:
        """Check the gradients the optimizer sees and return the global scale ``c`` (``g_seen = c g_raw``).

        Raises
        ------
        TrajectoryError
            For NaN/inf gradients, or a change that is not a global multiple (e.g. ``clip_grad_value_``).
        """
        names = [n for n, g in seen.items() if g is not None]
        if not names:
            return 1.0
        grads = [seen[n] for n in names]
        norms = torch._foreach_norm(grads)
        try:
            total = torch.stack(norms).double().sum()
        except RuntimeError:  # parameters of several dtypes or devices
            total = sum(float(x) for x in norms)
        if not math.isfinite(float(total)):
            bad = [n for n, g in zip(names, grads) if not bool(torch.isfinite(g).all())]
            raise TrajectoryError(
                f"Step {step}: the gradient of {', '.join(bad)} contains NaN or inf, so this step cannot be recorded "
                f"(nothing was stored for it). Lower the learning rate, check the loss and inputs, or clip gradients."
            )
        modified = [
            n for n in names if n in self._version and self._version[n] != (id(seen[n]), seen[n]._version)
        ]
        if not modified:
            return 1.0
        dot = sq_raw = sq_seen = torch.zeros((), dtype=torch.float64, device=grads[0].device)
        for n in names:
            g, r = seen[n], self.raw(n, seen[n])
            dot = dot + _dot64(g, r)
            sq_raw = sq_raw + _dot64(r, r)
            sq_seen = sq_seen + _dot64(g, g)
        dot_f, raw_f, seen_f = float(dot), float(sq_raw), float(sq_seen)
        if raw_f == 0.0:
            return 1.0
        c = dot_f / raw_f
        deviation = math.sqrt(max(seen_f - dot_f * dot_f / raw_f, 0.0) / seen_f) if seen_f > 0 else 0.0
        if deviation > tol:
            raise TrajectoryError(
                f"Step {step}: between backward() and optimizer.step() the gradient of {', '.join(modified)} was "
                f"changed by more than a global factor (relative deviation {deviation:.3g} > {tol:g}). Only global "
                f"rescaling such as torch.nn.utils.clip_grad_norm_ over all parameters can be recorded; "
                f"clip_grad_value_ or per-parameter clipping cannot."
            )
        return c


def check_batch_gradient(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    raw: dict[str, Tensor],
    loss: Any,
    inputs: Tensor,
    targets: Tensor,
    weights: Tensor,
    step: int,
    tol: float,
) -> float:
    r"""Compare the raw gradient with :math:`\sum_k w_k \nabla\ell_k(\theta_s)`; return the loss scale :math:`\sigma`.

    Parameters
    ----------
    raw : dict
        Raw accumulated gradients (zeros for parameters that received none), shapes of the parameters.
    inputs, targets : Tensor
        The logged samples of all micro-batches, ``(n, ...)``.
    weights : Tensor
        ``(n,)`` sample weights.

    Raises
    ------
    TrajectoryError
        When the raw gradient is not ``sigma`` times the recomputed one within ``tol``.
    """
    names = list(params)
    detached = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.enable_grad():
        out = model_output(torch.func.functional_call(model, {**buffers, **detached}, (inputs,)))
        per_sample = loss.implementation(out, targets)
        total = (weights.to(per_sample.dtype) * per_sample).sum()
        ref = torch.autograd.grad(total, [detached[n] for n in names], allow_unused=True)
    dot = sq_ref = sq_raw = 0.0
    for n, r in zip(names, ref):
        g = raw[n]
        if r is None:
            sq_raw += float(_dot64(g, g))
            continue
        dot += float(_dot64(g, r))
        sq_ref += float(_dot64(r, r))
        sq_raw += float(_dot64(g, g))
    if sq_ref == 0.0 and sq_raw == 0.0:
        return 1.0
    sigma = dot / sq_ref if sq_ref > 0 else 0.0
    resid = math.sqrt(max(sq_raw - 2 * sigma * dot + sigma * sigma * sq_ref, 0.0))
    rel = resid / math.sqrt(max(sq_raw, sq_ref * sigma * sigma, 1e-300))
    if rel > tol or sigma <= 0:
        raise TrajectoryError(
            f"Step {step}: the gradient from backward() does not match the gradient of the logged batch under "
            f"loss {loss.name!r} (relative difference {rel:.3g} > tolerance {tol:g}, best scale {sigma:.3g}). "
            f"Check that loss= is the loss the loop trains with, that rec.log_batch() received the indices of every "
            f"sample (and micro-batch) used in this step, and that the model is deterministic in training mode; "
            f"pass check_gradients=False to record anyway."
        )
    return sigma


class UpdateAudit:
    r"""Replays the recurrence with the adapter's coefficients and measures :math:`\|E_s\|/\|\Delta\theta_s\|`."""

    def __init__(self) -> None:
        self.momentum: dict[str, Tensor] = {}

    def step(
        self,
        theta: dict[str, Tensor],
        theta_next: dict[str, Tensor],
        grads: dict[str, Tensor | None],
        updates: dict[str, LinearUpdate],
    ) -> float:
        err = delta_sq = 0.0
        for name, u in updates.items():
            g = grads.get(name)
            t = theta[name]
            g = torch.zeros_like(t) if g is None else g
            modelled, m = u.step(g.to(t.dtype), self.momentum.get(name), t)
            self.momentum[name] = m if isinstance(m, Tensor) else torch.as_tensor(m, dtype=t.dtype)
            actual = theta_next[name] - t
            err += float(_dot64(actual - modelled, actual - modelled))
            delta_sq += float(_dot64(actual, actual))
        if delta_sq == 0.0:
            return 0.0 if err == 0.0 else math.inf
        return math.sqrt(err / delta_sq)
