r"""The recorder's gradient check: when it runs, what it compares and how loud it fails.

:func:`check_batch_gradient` recomputes :math:`\sum_k w_{s,k}\nabla\ell_k(\theta_s)` from the logged
batch, the training data and the recorder's loss (``torch.func.functional_call``, float
arithmetic of the parameters, no autocast) and compares it with the raw gradient of the loop's
``backward()`` over the parameters the optimizer steps. It measures the loop's loss scale
:math:`\sigma` (``raw = sigma * recomputed``) and the relative mismatch that remains, which the
trajectory keeps per step (``StepRecord.gradient_check``). :func:`streamed_products` never holds
the recomputed gradient whole: each parameter's is reduced to float64 sums (:class:`StreamedSums`)
and freed as soon as its backward completes it.

:class:`CheckSchedule` decides which steps are checked: by default the first
:data:`AUTO_CHECK_STEPS` steps, every power of :data:`AUTO_CHECK_BASE` and every
:data:`AUTO_CHECK_EVERY`-th step (0, 1, 4, 16, 64, 256, 1024, 2048, 3072, ...), so a run of ``N``
steps pays about ``2 + log4(N) + N / AUTO_CHECK_EVERY`` extra batch gradients: a fault present from
the start is found at step 0, a gradient carried over from the previous step at step 1, and one that
starts at step ``t`` by step ``4 t`` at the latest (docs/recording.md).

:func:`~explaind.trajectory._coupled_loss.check_loss_decomposes` verifies once, on the first logged micro-batch,
that a user loss callable equals the logged weights times its per-sample values (a class-weighted cross entropy
does not): forward passes only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError
from ..inputs import call_model, checkpoint_error
from ..models import backward_hooks_off, gradient_hooks_hint
from ..outputs import model_output
from ..records import LossRecord
from ..unsupported import extra_outputs_hint, loss_only_hint, negated_loss_hint
from ._audit import CHUNK_ELEMENTS as _CHUNK
from ._forward_probe import LOOP_TERMS
from ._random import RandomState, replayed

__all__ = [
    "AUTO_CHECK_STEPS",
    "AUTO_CHECK_BASE",
    "AUTO_CHECK_EVERY",
    "CheckSchedule",
    "GradientCheck",
    "autocast_tolerance",
    "batch_gradient",
    "check_batch_gradient",
    "default_tolerance",
    "StreamedSums",
    "streamed_products",
]

#: With ``check_gradients="auto"``: the first steps checked.
AUTO_CHECK_STEPS = 2
#: With ``check_gradients="auto"``: every power of this base is checked (4, 16, 64, ...).
AUTO_CHECK_BASE = 4
#: With ``check_gradients="auto"``: after the powers, every this many steps.
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


def _is_power(n: int, base: int) -> bool:
    """Whether ``n`` is ``base**k`` for an integer ``k >= 0``."""
    if n < 1:
        return False
    while n % base == 0:
        n //= base
    return n == 1


class CheckSchedule:
    """Which steps the gradient check runs on.

    Parameters
    ----------
    spec : bool, int, "auto" or iterable of int
        ``"auto"``: steps ``0 .. AUTO_CHECK_STEPS-1``, every power of :data:`AUTO_CHECK_BASE` and every
        multiple of :data:`AUTO_CHECK_EVERY` (counted from the first step this recorder records); ``True``: every
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
        return local < AUTO_CHECK_STEPS or _is_power(local, AUTO_CHECK_BASE) or local % AUTO_CHECK_EVERY == 0


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


def _autocast_hint(autocast: torch.dtype | None, tol: float) -> str:
    if autocast is None:
        return ""
    return (
        f" The loop's forward ran under torch.autocast(dtype={autocast}), so its gradient differs from the recomputed "
        f"one (parameters' dtype) at {autocast} rounding; the tolerance {tol:g} allows for that. If the difference "
        f"is autocast rounding of this model, pass gradient_tolerance=<a larger value> to the recorder; the part "
        f"of the update that autocast changes is reported as the residual."
    )


def _weighted_loss(
    model: nn.Module,
    state: dict[str, Tensor],
    loss: LossRecord,
    batch: tuple[Any, Tensor, Tensor],
    sl: slice,
    random: RandomState | None,
    where: str,
    generators: Sequence[torch.Generator],
) -> Tensor:
    r""":math:`\sum_{k \in sl} w_k \ell_k`: one batched forward of the micro-batch ``sl`` under its random state."""
    inputs, targets, weights = batch
    context = replayed(random, inputs.device, where, generators) if random is not None else contextlib.nullcontext()
    with context, backward_hooks_off(model):  # explaind recomputes gradients without them
        out = model_output(call_model(model, state, inputs[sl]))
    per_sample = loss.implementation(out, targets[sl])
    return (weights[sl].to(per_sample.dtype) * per_sample).sum()


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
    wanted = set(names)
    detached = {n: p.detach().requires_grad_(n in wanted) for n, p in params.items()}
    device = next(iter(detached.values())).device.type
    total: Any = 0
    with torch.enable_grad(), torch.autocast(device, enabled=False):
        for sl, state in replay or [(slice(None), None)]:
            total = total + _weighted_loss(model, {**constants, **detached}, loss, batch, sl, state, where, generators)
        ref = torch.autograd.grad(total, [detached[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(detached[n]) if r is None else r) for n, r in zip(names, ref)}


def _products64(raw: Tensor, ref: Tensor, pivot: float) -> tuple[float, float, float, float]:
    r"""``(<raw, ref>, ||ref||^2, ||raw||^2, ||raw - pivot * ref||^2)`` accumulated in float64, a chunk at a time.

    Each operand is cast to float64 by chunks of :data:`~explaind.trajectory._audit.CHUNK_ELEMENTS`
    elements (1 MiB per chunk and operand, the update audit's chunk), so the products of a large
    tensor never hold a float64 copy of it (they run during the check's backward, while its
    activations are alive). The four sums are accumulated chunk after chunk in a float64 tensor
    on the gradients' device and read once (one host synchronisation per parameter, not four per chunk).
    """
    a, b = raw.detach().reshape(-1), ref.detach().reshape(-1)
    acc = torch.zeros(4, dtype=torch.float64, device=a.device)
    for lo in range(0, a.numel(), _CHUNK):
        x, y = a[lo:lo + _CHUNK].double(), b[lo:lo + _CHUNK].double()
        d = x - pivot * y
        acc += torch.stack([torch.dot(x, y), torch.dot(y, y), torch.dot(x, x), torch.dot(d, d)])
    ab, bb, aa, ee = acc.tolist()
    return ab, bb, aa, ee


class StreamedSums:
    r"""The gradient check's float64 sums per parameter, with the pivot scale :math:`p`.

    For each compared parameter :math:`n` (raw :math:`\tilde g_n`, recomputed :math:`r_n`):
    :math:`D_n = \langle \tilde g_n, r_n\rangle`, :math:`R_n = \lVert r_n\rVert^2`,
    :math:`G_n = \lVert \tilde g_n\rVert^2` and :math:`E_n = \lVert \tilde g_n - p\,r_n\rVert^2`.
    :math:`p` is the scale :math:`D_n / R_n` of the first parameter reduced with :math:`R_n > 0`
    (0 before that), one value for all. For any :math:`\sigma`,

    .. math::

        \lVert \tilde g_n - \sigma r_n\rVert^2 = E_n - 2(\sigma - p)(D_n - p R_n) + (\sigma - p)^2 R_n,

    which, when :math:`p` is close to :math:`\sigma`, keeps the float64 resolution of a direct
    :math:`\lVert \tilde g_n - \sigma r_n\rVert` (``G - 2 sigma D + sigma^2 R`` alone cancels
    to about 1e-8 relative).
    """

    def __init__(self) -> None:
        self.pivot: float | None = None
        self.sums: dict[str, tuple[float, float, float, float]] = {}

    def add(self, name: str, raw: Tensor, ref: Tensor) -> None:
        """Reduce one parameter's raw and recomputed gradients (``ref`` may be freed afterwards)."""
        sums = _products64(raw, ref, self.pivot or 0.0)
        if self.pivot is None and sums[1] > 0:
            self.pivot = sums[0] / sums[1]
            sums = _products64(raw, ref, self.pivot)
        self.sums[name] = sums

    def distance_sq(self, sigma: float) -> dict[str, float]:
        r""":math:`\lVert \tilde g_n - \sigma r_n\rVert^2` per parameter (clipped at 0)."""
        p = self.pivot or 0.0
        return {n: max(ee - 2 * (sigma - p) * (ab - p * bb) + (sigma - p) ** 2 * bb, 0.0)
                for n, (ab, bb, _aa, ee) in self.sums.items()}


def streamed_products(
    model: nn.Module,
    constants: dict[str, Tensor],
    params: dict[str, Tensor],
    raw: dict[str, Tensor],
    loss: LossRecord,
    batch: tuple[Any, Tensor, Tensor],
    replay: list[tuple[slice, RandomState]] | None = None,
    where: str = "The gradient check",
    generators: Sequence[torch.Generator] = (),
) -> StreamedSums:
    r"""The float64 sums (:class:`StreamedSums`) of ``raw`` and :math:`r = \sum_k w_k \nabla\ell_k(\theta)`.

    The same forwards as :func:`batch_gradient`, but :math:`r` is never held as a whole: each
    micro-batch is differentiated on its own (``backward`` into fresh leaves; only one micro-batch's
    activations are alive), and during the last micro-batch's backward a post-accumulate-grad hook
    reduces each parameter's finished gradient :math:`r_n` to its four sums and frees it. The
    check's extra memory is therefore the activations of one micro-batch plus (with several
    micro-batches) one gradient set, instead of all micro-batches' activations and a full second
    gradient set.

    Parameters
    ----------
    model, constants, params, loss, batch, replay, where, generators
        As for :func:`batch_gradient`.
    raw : dict of str to Tensor
        The loop's raw gradients :math:`\tilde g_n`, shapes of the parameters; only these names
        are differentiated.

    Returns
    -------
    StreamedSums
        The sums of every name of ``raw``; a parameter the loss does not reach has :math:`r_n = 0`.
    """
    if not raw:
        return StreamedSums()
    leaves = {n: p.detach().requires_grad_(n in raw) for n, p in params.items()}
    wanted = [leaves[n] for n in raw]
    names = {id(leaves[n]): n for n in raw}
    out = StreamedSums()
    last = [False]

    def reduce(leaf: Tensor) -> None:
        if last[0] and leaf.grad is not None:
            name = names[id(leaf)]
            out.add(name, raw[name], leaf.grad)
            leaf.grad = None  # the finished gradient is not kept

    handles = [leaf.register_post_accumulate_grad_hook(reduce) for leaf in wanted]
    device = wanted[0].device.type
    parts = replay or [(slice(None), None)]
    try:
        with torch.enable_grad(), torch.autocast(device, enabled=False):
            for i, (sl, state) in enumerate(parts):
                term = _weighted_loss(model, {**constants, **leaves}, loss, batch, sl, state, where, generators)
                last[0] = i == len(parts) - 1
                if term.requires_grad:
                    try:
                        torch.autograd.backward(term, inputs=wanted)
                    except RuntimeError as exc:  # checkpointing with use_reentrant=True refuses inputs=
                        refused = checkpoint_error(exc)
                        if refused is None:
                            raise
                        raise refused from exc
                del term  # this micro-batch's activations go before the next forward
    finally:
        for h in handles:
            h.remove()
    for n in raw:  # reached by an earlier micro-batch only, or not at all
        if n not in out.sums:
            grad = leaves[n].grad
            out.add(n, raw[n], torch.zeros_like(raw[n]) if grad is None else grad)
    return out


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
    hint: str | Callable[[], str] = "",
) -> GradientCheck:
    r"""Compare the raw gradient with :math:`\sum_k w_k \nabla\ell_k(\theta_s)`; measure :math:`\sigma`.

    With :math:`\tilde g` the raw gradient and :math:`r` the recomputed one over the compared
    parameters, and the float64 sums :math:`D = \langle \tilde g, r\rangle`,
    :math:`R = \lVert r\rVert^2`, :math:`G = \lVert \tilde g\rVert^2` (from
    :func:`streamed_products`, so :math:`r` is never held whole):

    .. math::

        \sigma = D / R, \qquad
        \text{mismatch} = \frac{\lVert \tilde g - \sigma r\rVert}{\max(\sqrt{G}, |\sigma|\sqrt{R})},

    the relative distance of :math:`\tilde g` from the best multiple of :math:`r` (docs/recording.md),
    its numerator from the pivoted sums of :class:`StreamedSums`. Each parameter's share
    :math:`\lVert \tilde g_n - \sigma r_n\rVert / \lVert \tilde g\rVert` comes from its own
    sums, for the message.

    Parameters
    ----------
    model : nn.Module
        Template for ``functional_call`` (its buffers are used as they are).
    params : dict of str to Parameter
        Every recorded parameter (all enter the forward pass).
    raw : dict of str to Tensor
        Raw accumulated gradients of the parameters the optimizer steps (only these names are compared).
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
    hint : str or callable
        A sentence on the likeliest cause, placed first in the message; a callable returning it is
        called only when the check fails (a diagnosis that runs the model again).

    Returns
    -------
    GradientCheck

    Raises
    ------
    TrajectoryError
        When the raw gradient is not ``sigma`` times the recomputed one within ``tol``; the message
        names the loss, the parameters that differ most and the possible causes.
    """
    compared = {n: raw[n] for n in params if n in raw}
    buffers = {n: b.detach().clone() for n, b in {**dict(model.named_buffers()), **(start_buffers or {})}.items()}
    sums = streamed_products(model, buffers, params, compared, loss, batch, replay, f"Step {step}", generators)
    dot = math.fsum(v[0] for v in sums.sums.values())
    sq_ref = math.fsum(v[1] for v in sums.sums.values())
    sq_raw = math.fsum(v[2] for v in sums.sums.values())
    if sq_ref == 0.0 and sq_raw == 0.0:
        return GradientCheck(sigma=1.0, mismatch=0.0)
    sigma = dot / sq_ref if sq_ref > 0 else 0.0
    distance = sums.distance_sq(sigma)
    rel = (math.sqrt(math.fsum(distance.values())) / math.sqrt(max(sq_raw, sq_ref * sigma * sigma, 1e-300))
           if sigma > 0 else 1.0)  # a loop gradient orthogonal or opposite to the recomputed one, or zero
    if rel > tol or sigma <= 0:
        per = [(math.sqrt(d / max(sq_raw, 1e-300)), n) for n, d in distance.items()]
        worst = ", ".join(f"{n} ({v:.2g})" for v, n in sorted(per, reverse=True)[:3])
        replayed = any(state is not None for _, state in replay or ())  # a batch-coupled loss's parts hold None
        hint = (negated_loss_hint(sums, sigma, tol) + loss_only_hint(sums.sums, replayed)
                + extra_outputs_hint(model, batch[0]) + (hint() if callable(hint) else hint)
                + gradient_hooks_hint(model))
        raise TrajectoryError(
            f"Step {step}: the gradient from backward() does not match the gradient of the logged batch under loss "
            f"{loss.name!r} (relative difference {rel:.3g} > tolerance {tol:g}, best scale {sigma:.3g}; largest "
            f"differences: {worst}).{hint} Check that loss= is the loss the loop trains with (a class-weighted or "
            f"label-smoothed loss must be given as that same callable; {LOOP_TERMS}), that rec.log_batch() received "
            f"the indices of every sample (and "
            f"micro-batch) used in this step and of no other, with the loop's weights (a weighted mean sum(w * l) / "
            f"sum(w): rec.log_batch(idx, weights=w / w.sum())) (a guard that skips optimizer.step() after "
            f"rec.log_batch(), on a NaN or a loss spike, leaves that batch logged for the next step: decide before "
            f"rec.log_batch()), that the model saw those rows of train_data as given (inputs mixed or augmented inside"
            f" the loop, as mixup or CutMix do, are other samples: build them before recording and pass them, with "
            f"their soft targets, as train_data; labels flipped at random in the loop, label noise, are other targets:"
            f" draw them once before recording as train_data's targets), that no gradient carries over from an "
            f"earlier backward (optimizer.zero_grad() clears only the optimizer's parameters: use model.zero_grad()), "
            f"and that the model is deterministic in training mode (a layer that draws from a torch.Generator held "
            f"outside its modules: pass it as TrajectoryRecorder(generators=[...]); random draws in forward outside "
            f"nn.Dropout modules, such as F.dropout, F.scaled_dot_product_attention(dropout_p > 0), torch.rand or "
            f"np.random: pass capture_random=True; the same for a forward that reads a buffer it also updates, which "
            f"is then replayed from the recorded buffers). Pass check_gradients=False to record anyway."
            f"{_autocast_hint(autocast, tol)}"
        )
    return GradientCheck(sigma=sigma, mismatch=rel)


def unscaled_without_scaler(s: int, c_in: float) -> TrajectoryError:
    """The error for gradients divided by a power of two between backward and step, with no scaler or check."""
    return TrajectoryError(
        f"Step {s}: between backward() and optimizer.step() every gradient was divided by exactly "
        f"{1 / c_in:g}, the signature of torch.amp.GradScaler.unscale_ (a loss scale), which the recorder "
        f"cannot tell from dividing an unscaled gradient (e.g. averaging micro-batches) without the scaler "
        f"or a gradient check. Fix: TrajectoryRecorder(..., grad_scaler=scaler), or pass train_data so the "
        f"loss scale is measured."
    )
