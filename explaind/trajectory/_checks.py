r"""The recorder's gradient check: when it runs, what it compares and how loud it fails.

:func:`check_batch_gradient` recomputes :math:`\sum_k w_{s,k}\nabla\ell_k(\theta_s)` from the logged
batch, the training data and the recorder's loss (``torch.func.functional_call``, float
arithmetic of the parameters, no autocast) and compares it with the raw gradient of the loop's
``backward()`` over the parameters the optimizer steps. It measures the loop's loss scale
:math:`\sigma` (``raw = sigma * recomputed``) and the relative mismatch that remains, which the
trajectory keeps per step (``StepRecord.gradient_check``).

:class:`CheckSchedule` decides which steps are checked: by default the first
:data:`AUTO_CHECK_STEPS` steps, every power of two and every :data:`AUTO_CHECK_EVERY`-th step, so a
run of ``N`` steps pays about ``3 + log2(N) + N / AUTO_CHECK_EVERY`` extra batch gradients.

:func:`check_loss_decomposes` verifies once, on the first logged micro-batch, that a user loss
callable equals the logged weights times its per-sample values (a class-weighted cross entropy with
the default weights does not): forward passes only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError
from ..inputs import call_model
from ..outputs import model_output
from ..records import LossRecord
from ._random import RandomState, replayed

__all__ = [
    "AUTO_CHECK_STEPS",
    "AUTO_CHECK_EVERY",
    "CheckSchedule",
    "GradientCheck",
    "autocast_tolerance",
    "batch_gradient",
    "check_batch_gradient",
    "check_loss_decomposes",
    "default_tolerance",
]

#: With ``check_gradients="auto"``: the first steps checked.
AUTO_CHECK_STEPS = 3
#: With ``check_gradients="auto"``: after the powers of two, every this many steps.
AUTO_CHECK_EVERY = 1024

#: Relative tolerance of the gradient check when the forward ran under ``torch.autocast`` in this dtype
#: (the loop's gradient is then computed from half-precision activations, the recomputed one in the
#: parameters' dtype).
_AUTOCAST_TOLERANCE = {torch.float16: 3e-2, torch.bfloat16: 1.5e-1}


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the gradient comparisons for parameters of ``dtype`` (no autocast)."""
    return 1e-7 if dtype == torch.float64 else 1e-3


def autocast_tolerance(dtype: torch.dtype | None, base: float) -> float:
    """The check's tolerance when the loop's forward ran under autocast in ``dtype`` (``None``: no autocast)."""
    if dtype is None:
        return base
    return max(base, _AUTOCAST_TOLERANCE.get(dtype, _AUTOCAST_TOLERANCE[torch.bfloat16]))


class CheckSchedule:
    """Which steps the gradient check runs on.

    Parameters
    ----------
    spec : bool, int, "auto" or iterable of int
        ``"auto"``: steps ``0 .. AUTO_CHECK_STEPS-1``, every power of two and every multiple of
        :data:`AUTO_CHECK_EVERY` (counted from the first step this recorder records); ``True``: every
        step; ``False``: none; an int ``k``: every ``k``-th step; an iterable: exactly those steps.
    start : int
        The first step this recorder records (``N`` of a resumed run).
    """

    def __init__(self, spec: Any, start: int = 0):
        self.start = int(start)
        self._explicit: frozenset[int] | None = None
        if spec is True or spec is False or spec == "auto":
            self.kind: str | int = spec if isinstance(spec, str) else ("every" if spec else "never")
            self._every = 1
        elif type(spec) is int and spec > 0:
            self.kind, self._every = "every", spec
        elif isinstance(spec, Iterable) and not isinstance(spec, str | bytes):
            steps = list(spec)
            if not all(type(s) is int and s >= 0 for s in steps):
                raise ConfigError(
                    f"check_gradients={spec!r}: a collection of steps must hold non-negative ints. Choose 'auto', "
                    f"True, False, a positive int k (every k-th step) or a list of step numbers."
                )
            self.kind, self._explicit = "explicit", frozenset(steps)
        else:
            raise ConfigError(
                f"check_gradients={spec!r} is not allowed. Choose 'auto', True, False or a positive int k (check every "
                f"k-th step), or a list of step numbers."
            )

    @property
    def never(self) -> bool:
        """True when no step is checked."""
        return self.kind == "never" or (self.kind == "explicit" and not self._explicit)

    def due(self, step: int) -> bool:
        """Whether step ``step`` (global numbering) is checked."""
        if self.kind == "never":
            return False
        if self.kind == "explicit":
            assert self._explicit is not None
            return step in self._explicit
        if self.kind == "every":
            return step % self._every == 0
        local = step - self.start
        return local < AUTO_CHECK_STEPS or (local & (local - 1)) == 0 or local % AUTO_CHECK_EVERY == 0


@dataclass(frozen=True)
class GradientCheck:
    """Outcome of one gradient check.

    Attributes
    ----------
    sigma : float
        The loop's loss scale: ``raw ≈ sigma * recomputed``.
    mismatch : float
        ``||raw - sigma * recomputed|| / ||raw||`` over the checked parameters.
    """

    sigma: float
    mismatch: float


def _dot64(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


def _autocast_hint(autocast: torch.dtype | None, tol: float) -> str:
    if autocast is None:
        return ""
    return (
        f" The loop's forward ran under torch.autocast(dtype={autocast}), so its gradient differs from the recomputed "
        f"one (parameters' dtype) at {autocast} rounding; the tolerance {tol:g} allows for that. If the difference "
        f"is autocast rounding of this model, pass gradient_tolerance=<a larger value> to the recorder; the part "
        f"of the update that autocast changes is reported as the residual."
    )


def batch_gradient(
    model: nn.Module,
    constants: dict[str, Tensor],
    params: dict[str, Tensor],
    names: list[str],
    loss: LossRecord,
    batch: tuple[Any, Tensor, Tensor],
    replay: list[tuple[slice, RandomState]] | None = None,
    where: str = "The gradient check",
    generators: Sequence[torch.Generator] = (),
) -> dict[str, Tensor]:
    r""":math:`\sum_k w_k \nabla\ell_k(\theta)` over ``names``, through batched ``functional_call``\ s.

    Parameters
    ----------
    model : nn.Module
        Template for ``functional_call`` (run in its own training/evaluation mode).
    constants : dict of str to Tensor
        Buffers and frozen parameters passed with ``params``.
    params : dict of str to Tensor
        :math:`\theta`, every recorded parameter (all enter the forward pass).
    names : list of str
        The parameters to differentiate; a parameter the loss does not reach gets zeros.
    loss : LossRecord
        Per-sample training loss :math:`\ell_k`.
    batch : (inputs, Tensor, Tensor)
        Inputs ``(n, ...)``, targets ``(n, ...)`` and weights :math:`w_k` ``(n,)``.
    replay : list of (slice, RandomState), optional
        The micro-batches (positions in ``batch``) and the random states of their training forwards:
        each is one batched forward under its state (dropout masks and batch statistics as in the loop).
        Default: one forward of the whole batch.
    where : str
        Names the caller in a refusal to replay.
    generators : sequence of torch.Generator
        The model's private generators, set from each state for the replay.

    Returns
    -------
    dict of str to Tensor
        The batch gradient per name, shapes of the parameters (no autocast; the parameters' dtype).
    """
    inputs, targets, weights = batch
    wanted = set(names)
    detached = {n: p.detach().requires_grad_(n in wanted) for n, p in params.items()}
    device = next(iter(detached.values())).device.type
    total: Any = 0
    with torch.enable_grad(), torch.autocast(device, enabled=False):
        for sl, state in replay or [(slice(None), None)]:
            with replayed(state, inputs.device, where, generators) if state is not None else contextlib.nullcontext():
                out = model_output(call_model(model, {**constants, **detached}, inputs[sl]))
            per_sample = loss.implementation(out, targets[sl])
            total = total + (weights[sl].to(per_sample.dtype) * per_sample).sum()
        ref = torch.autograd.grad(total, [detached[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(detached[n]) if r is None else r) for n, r in zip(names, ref)}


def check_batch_gradient(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    raw: dict[str, Tensor],
    loss: LossRecord,
    batch: tuple[Tensor, Tensor, Tensor],
    step: int,
    tol: float,
    autocast: torch.dtype | None = None,
    replay: list[tuple[slice, RandomState]] | None = None,
    generators: Sequence[torch.Generator] = (),
    start_buffers: dict[str, Tensor] | None = None,
    hint: str = "",
) -> GradientCheck:
    r"""Compare the raw gradient with :math:`\sum_k w_k \nabla\ell_k(\theta_s)`; measure :math:`\sigma`.

    Parameters
    ----------
    model : nn.Module
        Template for ``functional_call`` (its buffers are used as they are).
    params : dict of str to Parameter
        Every recorded parameter (all enter the forward pass).
    raw : dict of str to Tensor
        Raw accumulated gradients of the parameters the optimizer steps, shapes of the parameters;
        only these names are compared.
    loss : LossRecord
        The recorder's loss (per-sample values).
    batch : (Tensor, Tensor, Tensor)
        Inputs ``(n, ...)``, targets ``(n, ...)`` and weights ``(n,)`` of all logged micro-batches.
    step : int
        Step number (messages).
    tol : float
        Relative tolerance (already widened for autocast).
    autocast : torch.dtype or None
        The autocast dtype of the loop's forward, for the message.
    replay : list of (slice, RandomState), optional
        The micro-batches (positions in ``batch``) and the random states of their training forwards:
        each is recomputed as one batched forward under its state (dropout masks and batch statistics
        as in the loop; docs/recording.md). Default: one forward of the whole batch.
    generators : sequence of torch.Generator
        The model's private generators (replayed with the states).
    start_buffers : dict of str to Tensor, optional
        Buffers as they were before the step's first training forward (:math:`\beta_s`); copies of
        them replace the model's current values, so a forward that reads buffers it changes (spectral
        norm's power iteration) is recomputed from where the loop's started, micro-batch after
        micro-batch.
    hint : str
        A sentence on the likeliest cause, placed first in the message.

    Returns
    -------
    GradientCheck

    Raises
    ------
    TrajectoryError
        When the raw gradient is not ``sigma`` times the recomputed one within ``tol``; the message
        names the loss, the parameters that differ most and the possible causes.
    """
    names = [n for n in params if n in raw]
    buffers = {n: b.detach().clone() for n, b in {**dict(model.named_buffers()), **(start_buffers or {})}.items()}
    refs = batch_gradient(model, buffers, params, names, loss, batch, replay, f"Step {step}", generators)
    dot = sum(_dot64(raw[n], refs[n]) for n in names)
    sq_ref = sum(_dot64(refs[n], refs[n]) for n in names)
    sq_raw = sum(_dot64(raw[n], raw[n]) for n in names)
    if sq_ref == 0.0 and sq_raw == 0.0:
        return GradientCheck(sigma=1.0, mismatch=0.0)
    sigma = dot / sq_ref if sq_ref > 0 else 0.0
    # the difference itself, not sq_raw - 2 sigma dot + sigma^2 sq_ref: that cancels to a floor of sqrt(eps) ~ 1e-8
    resid = math.sqrt(sum(float((raw[n].double() - sigma * refs[n].double()).square().sum()) for n in names))
    rel = resid / math.sqrt(max(sq_raw, sq_ref * sigma * sigma, 1e-300))
    if rel > tol or sigma <= 0:
        per = []
        for n in names:
            d = raw[n].double() - sigma * refs[n].double()
            per.append((float(d.norm()) / math.sqrt(max(sq_raw, 1e-300)), n))
        worst = ", ".join(f"{n} ({v:.2g})" for v, n in sorted(per, reverse=True)[:3])
        raise TrajectoryError(
            f"Step {step}: the gradient from backward() does not match the gradient of the logged batch under "
            f"loss {loss.name!r} (relative difference {rel:.3g} > tolerance {tol:g}, best scale {sigma:.3g}; "
            f"largest differences: {worst}).{hint} Check that loss= is the loss the loop trains with (a class-weighted "
            f"or label-smoothed loss must be given as that same callable; a penalty on the parameters added to the "
            f"loss by hand is no loss of the samples: express an L2 penalty lam*||theta||^2 as coupled weight "
            f"decay, SGD or Adam with weight_decay=2*lam), that rec.log_batch() received the "
            f"indices of every sample (and micro-batch) used in this step, that no gradient carries over from "
            f"an earlier backward (optimizer.zero_grad() clears only the optimizer's parameters: use "
            f"model.zero_grad()), and that the model is deterministic in training mode (a layer that draws from a "
            f"torch.Generator held outside its modules: pass it as TrajectoryRecorder(generators=[...]); random "
            f"draws in forward outside nn.Dropout modules, such as F.dropout or torch.rand: pass "
            f"capture_random=True; the same for a forward that reads a buffer it also updates, which is then "
            f"replayed from the recorded buffers). Pass check_gradients=False to record anyway."
            f"{_autocast_hint(autocast, tol)}"
        )
    return GradientCheck(sigma=sigma, mismatch=rel)


def check_loss_decomposes(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    loss: LossRecord,
    inputs: Tensor,
    targets: Tensor,
    weights: Tensor,
) -> str | None:
    r"""Whether a user loss callable equals :math:`\sum_k w_k \ell_k` on one logged micro-batch.

    Parameters
    ----------
    inputs, targets : Tensor
        One logged micro-batch, ``(n, ...)``.
    weights : Tensor
        Its logged weights ``(n,)``.

    Returns
    -------
    str or None
        A message naming the loss and the fix when the callable's batch value differs from the
        weighted sum of its per-sample values (class weights with the default weights,
        ``reduction="sum"``, terms coupling samples); else ``None``. Registered losses and
        micro-batches of one sample are not checked.
    """
    reference = loss.reference
    if reference is None or not loss.name.startswith("custom:") or inputs.shape[0] < 2:
        return None
    state = {n: p.detach() for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
        out = model_output(call_model(model, {**buffers, **state}, inputs))
        mean = float((loss.implementation(out, targets).double() * weights.to(out.device).double()).sum())
        batch = float(reference(out, targets))
    tol = 1e-10 if out.dtype == torch.float64 else 1e-5
    if abs(mean - batch) <= tol * max(abs(batch), abs(mean), 1e-30):
        return None
    return (
        f"Loss {loss.name!r}: on the first logged micro-batch the loss callable gives {batch:.6g}, but the "
        f"logged weights times its per-sample values sum to {mean:.6g}. explaind splits the gradient into "
        f"per-sample terms w_k * grad loss_fn(sample k), exact only when the batch loss is "
        f"sum_k w_k loss_fn(sample k): a "
        f"class-weighted cross entropy (weight=...) normalises by the batch's summed class weights, "
        f"reduction='sum' and terms coupling samples differ too. Fix: pass per-sample weights to "
        f"rec.log_batch(indices, weights) (for class weights w: weights = w[y] / w[y].sum()) and an unweighted "
        f"loss= callable, or use reduction='mean'."
    )
