r"""The residual share of an influence query, and a loud message naming its likely cause.

The residual :math:`E_s` is what the model of each update (the optimizer adapter's recurrence
fed with gradients recomputed from the training data) leaves of the recorded
:math:`\Delta\theta_s` (docs/maths.md §4). Completeness holds whatever it is, but the per-sample
scores explain only the data part: a residual share above rounding level means they miss part of
the change. :func:`check_residual` measures the share
(:meth:`~explaind.kernel.attribution.Attribution.residual_share`), stores it in the attribution's
``meta`` and, above the tolerance, warns (or raises with ``strict``) naming what in the run
likely caused it and how to fix it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError, UnsupportedModelError, warn_at_caller
from ..kernel.attribution import Attribution
from ..kernel.jumps import (
    INFERENCE,
    NO_GRAD,
    function_sites,
    grad_off_sites,
    hook_sites,
    singular_sites,
    stop_sites,
)
from ..models import gradient_hooks
from ._residual_tol import autocast_statement, resolve_residual_tol

__all__ = ["JACOBIAN_TERMS", "METAGRADIENT_TERMS", "PATH_TERMS", "check_finite", "check_residual", "residual_causes",
           "check_quadrature", "refuse_non_finite"]

#: An explained change within this many machine epsilons of the outputs is named as rounding by the quadrature warning.
ROUNDING_CHANGE = 1e4
#: Audited relative residual of the adapter above which it is named as a cause.
AUDIT_TOL = 1e-6
#: A step's audited gap ``||E_s||`` within this many unit roundoffs of ``||theta_{s+1}||`` is the rounding of the
#: stored parameters to their dtype (about 0.55 on a float32 AdamW run, docs/cli.md "explaind influence").
ROUNDING_UNITS = 2.0
#: Growth of ``||theta_s||`` over the window's first step beyond which the run is named as diverged.
GROWTH = 1e3
#: An audit above this (the stored parameters' rounding a percent of a step) names the updates' size, not the
#: float32 gradients, as the cause on a run below float64.
TINY_AUDIT = 1e-2
#: At most this many steps' parameters are read to find the growth (evenly spaced beyond it, ends included).
GROWTH_READS = 512


def _stochastic_modules(model: nn.Module) -> list[str]:
    """Modules whose training-mode forward differs from evaluation mode: dropout and batch normalisation."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(f"{name or type(module).__name__} (dropout p={module.p:g})")
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            found.append(f"{name or type(module).__name__} (batch statistics)")
    return found


def residual_causes(traj: Any, window: tuple[int, int]) -> list[str]:
    """Likely causes of a large residual in the steps ``window`` of ``traj``, each with its fix (sentences)."""
    start, stop = window
    causes = []
    steps = getattr(traj.manifest, "steps", None) or []
    autocast = sorted({str(r.autocast) for r in steps[start:stop] if getattr(r, "autocast", None)})
    if autocast:
        causes.append(f"the loop's forward ran under torch.autocast ({', '.join(autocast)}) while the engine "
                      f"recomputes each sample's gradient without it, so the residual holds the autocast rounding "
                      f"of the loop's gradients (the dtype's unit roundoff, 4.9e-4 for float16 and 3.9e-3 for "
                      f"bfloat16, times 0.33 to 14 on the repository's runs, docs/recording.md 'Mixed precision'); "
                      f"this is expected — accept it with a larger residual_tol, or train "
                      f"without autocast for a split at rounding level")
    rounded = (getattr(traj.manifest, "extras", None) or {}).get("output_rounding")
    if rounded:
        causes.append(f"the recorder noted while recording that {rounded}: the run's gradients carry float32 "
                      f"rounding (about 1e-8 relative) that no float64 per-sample loss reproduces, so the residual "
                      f"holds it (a share near 1e-8) — compute the loss in float64 (Fabric: "
                      f"torch.set_default_dtype(torch.float64) before training, or precision='32-true' with a float64 "
                      f"model; the Hugging Face Trainer: compute_loss_func=callback.compute_loss; "
                      f"docs/guide_own_model.md, 'Fabric and Accelerate')")
    half = sorted({str(t.dtype).removeprefix("torch.") for t in traj.params(start).values()
                   if t.dtype in (torch.float16, torch.bfloat16)})
    if half:
        causes.append(f"the parameters themselves are stored in {', '.join(half)}: every step's update is rounded "
                      f"to that precision when it is added to the parameters (unit roundoff 3.9e-3 for bfloat16, "
                      f"4.9e-4 for float16, relative to each parameter), and no per-sample term carries that "
                      f"rounding — train with float32 master weights (torch.autocast for the half-precision "
                      f"compute) for a split at rounding level")
    stochastic = _stochastic_modules(traj.model)
    replayed = bool(getattr(traj.manifest, "random_capture", False))
    if stochastic and not replayed:
        causes.append(f"the model has layers whose training forward differs from the evaluation-mode forward the "
                      f"engine recomputes gradients with: {', '.join(stochastic[:5])}, and the run did not capture "
                      f"the random state of its forwards — record it again with TrajectoryRecorder(..., "
                      f"capture_random='auto') (the default) so masks and batch statistics are replayed exactly")
    elif stochastic:
        causes.append(f"the dropout masks and batch statistics of {', '.join(stochastic[:5])} are replayed from the "
                      f"captured random states; a replay on another device or library version than the recording "
                      f"draws other masks — explain on the device the run was recorded on")
    recurrent = [name or type(m).__name__ for name, m in traj.model.named_modules() if isinstance(m, nn.RNNBase)]
    if recurrent:
        causes.append(f"the model has recurrent layers ({', '.join(recurrent[:5])}): if its forward unpacks a packed "
                      f"sequence with pad_packed_sequence without total_length, a training batch is padded to its "
                      f"longest sequence but an input explained alone to its full padded length, so a head that "
                      f"reads the padding (a mean over all time steps) computes another function — pass "
                      f"total_length=x.shape[1] (docs/maths.md, 'Recurrent layers')")
    hooked = gradient_hooks(traj.model)
    if hooked:
        causes.append(f"the model has gradient hooks ({', '.join(hooked[:4])}{', ...' if len(hooked) > 4 else ''}), "
                      f"which change what backward() left in .grad (and so the recorded update) but no output; the "
                      f"engine recomputes each sample's gradient without them, so a hook that clips, rescales or "
                      f"edits gradients leaves its edit in the residual — remove such hooks (one that only reads "
                      f"gradients is fine) and scale a layer's update with a parameter group's lr instead")
    grown = _growth_cause(traj, start, stop)
    if grown:
        causes.insert(0, grown)
    audit = np.asarray(traj.audit(), dtype=np.float64)[start:stop]
    dtype = traj.params(start)[traj.param_names[0]].dtype
    still = np.flatnonzero(np.isposinf(audit))  # theta_s+1 == theta_s exactly, the modelled update not zero
    if still.size:
        causes.append(_still_cause(dtype, still + start))
    audit = np.where(np.isposinf(audit), 0.0, audit)
    gaps = None
    if audit.size and np.isfinite(audit).all() and float(audit.max()) > AUDIT_TOL:
        gaps = _beyond_rounding(traj, audit, start)
        if gaps is None:  # the audit is the rounding of the stored parameters (named above for half precision)
            worst = int(np.argmax(audit)) + start
            if dtype == torch.float64 or (not half and float(audit.max()) > TINY_AUDIT):
                causes.append(_tiny_update_cause(traj, float(audit.max()), worst))
            elif not half:
                causes.append(_float32_cause(traj, float(audit.max()), worst))
        else:
            worst = int(np.argmax(gaps)) + start
            causes.append(f"the optimizer adapter does not reproduce the recorded update (traj.audit() reaches "
                          f"{float(gaps.max()):.2g} at step {worst}, beyond the rounding of the stored parameters): "
                          f"an optimizer option, a parameter group or a change of the trainable parameters it does "
                          f"not model, or the optimizer's momentum edited between steps in a way the recorder's watch "
                          f"does not see (through .data, in fewer entries than the stride of its sample of each "
                          f"buffer) — check the audit per step")
    elif dtype == torch.float32 and not half and still.size < audit.size and np.isfinite(audit).all():
        # every update reproduced below AUDIT_TOL: the loop's float32 gradients are what the float64 recomputation
        # does not repeat (a diverging run's huge activations make their rounding large)
        causes.append(_float32_cause(traj, float(audit.max()), int(np.argmax(audit)) + start, rounding=False))
    scales = np.array([float(traj.grad_scale(s)) for s in range(start, stop)])
    if scales.size and np.any(np.abs(scales - 1.0) > 1e-12):
        causes.append(f"gradients were rescaled at {int(np.sum(np.abs(scales - 1.0) > 1e-12))} step(s) (recorded "
                      f"c_s from {scales.min():.3g} to {scales.max():.3g}): clipping or loss scaling — with "
                      f"torch.amp.GradScaler, c_s must be the scale after unscale_ (about 1)")
    checked = np.asarray(traj.gradient_check(), dtype=np.float64)[start:stop]
    measured = checked[np.isfinite(checked)]
    if measured.size and float(measured.max()) > 1e-6:
        worst = int(np.nanargmax(checked)) + start
        causes.append(f"the recorder's gradient check measured a mismatch up to {float(measured.max()):.2g} (step "
                      f"{worst}, traj.gradient_check()) between the loop's gradient and the one recomputed from the "
                      f"data: the loss, the data or the forward pass differ from the loop's (autocast rounding "
                      f"shows up here too)")
    elif measured.size:
        skipped = [str(s + start) for s in np.flatnonzero(~np.isfinite(checked))]
        named = ", ".join(skipped[:8]) + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        causes.append(f"the gradient check passed at the checked steps, so look at the steps it did not check ("
                      f"{named}: check_gradients=True checks every step and sees there a loss weight that changes, "
                      f"as a loss-weight schedule's does, or another batch backwarded), and at "
                      "what the check cannot see: it runs the model as it was at that step, while the engine replays "
                      "every step with the model as it is now, so a value the forward or the loss callable reads that "
                      "is neither a parameter nor a buffer and changed during training (a temperature or schedule kept"
                      " as a Python attribute or in the loss callable's closure, a module-level global the forward "
                      "reads, an EMA teacher's targets, a DQN target network the loss callable reads, a hook on every "
                      "module registered or removed since with torch.nn.modules.module.register_module_forward_hook, "
                      "an environment variable the forward reads through os.environ or a global torch setting such "
                      "as torch.use_deterministic_algorithms or torch.set_default_dtype, changed since) makes the "
                      "recomputed gradients differ — derive it in forward from a buffer the forward itself "
                      "updates (an integer step counter), whose changes are recorded per step (a target network: its "
                      "weights as buffers the training forward copies every k steps, with capture_random=True); keep "
                      "global hooks as they were in training, and environment variables and torch settings too")
    else:
        causes.append("the loss or the training data the engine recomputes gradients with may differ from the "
                      "loop's (a custom or class-weighted loss, data augmentation, a reordered train_data); no "
                      "gradient check ran — record with check_gradients=True, which compares them on a spread of "
                      "steps" + ("" if replayed else "; a forward that draws random numbers no module shows "
                                 "(F.dropout, F.scaled_dot_product_attention with dropout_p > 0, torch.rand, "
                                 "np.random) or updates a buffer it reads needs capture_random=True"))
    return causes


def _norm(params: dict[str, torch.Tensor]) -> float:
    """``||theta||`` over every tensor, in float64."""
    return sum(float(t.double().square().sum()) for t in params.values()) ** 0.5


def _growth_cause(traj: Any, start: int, stop: int) -> str | None:
    r"""The run diverged in the window: :math:`\|\theta_s\|` beyond :data:`GROWTH` times
    :math:`\|\theta_{start}\|` (``None`` otherwise), with the window that ends before it grew.

    Up to :data:`GROWTH_READS` steps are read (evenly spaced in a longer window, its ends included).
    """
    steps = np.unique(np.linspace(start, stop, min(stop - start + 1, GROWTH_READS)).round().astype(int))
    norms = np.array([_norm(traj.params(int(s))) for s in steps])
    positive = norms[norms > 0]
    if not np.isfinite(norms).all() or not positive.size:
        return None
    first = float(positive[0])  # a model started at zero: its first norm above it
    if not float(norms.max()) > GROWTH * first:
        return None
    peak = int(np.argmax(norms))
    beyond = int(steps[int(np.argmax(norms > GROWTH * first))])
    fine = int(steps[max(int(np.argmax(norms > GROWTH * first)) - 1, 0)])
    return (f"the run diverged: |theta_s| grew from {first:.3g} to {norms[peak]:.3g} at step "
            f"{int(steps[peak])} (beyond {GROWTH:g}x its start first at step {beyond}); at that scale the rounding of "
            f"the gradients and of the stored parameters, relative to those values, outweighs the change of the "
            f"outputs being explained, and an output that grew and fell again (dead ReLU units) cancels it — explain "
            f"the steps before it grew (steps=({start}, {max(fine, start + 1)})), or lower the learning rate")


def _still_cause(dtype: torch.dtype, steps: np.ndarray) -> str:
    """Why a step whose parameters did not move at all leaves a residual: its update was rounded away."""
    name = str(dtype).removeprefix("torch.")
    listed = ", ".join(str(int(s)) for s in steps[:6]) + (" ..." if steps.size > 6 else "")
    return (f"at {steps.size} step(s) of the window ({listed}) the stored parameters did not move at all "
            f"(theta_s+1 == theta_s, traj.audit() inf) although the update the adapter models from the step's "
            f"gradient is not zero: in {name} an update below half a unit in the last place of a parameter is "
            f"rounded away when it is added (a learning rate too small for {name}), so the data part of those "
            f"steps is cancelled by the residual and moved nothing — raise the learning rate"
            + ("" if dtype == torch.float64 else ", or train in float64"))


def _beyond_rounding(traj: Any, audit: np.ndarray, start: int) -> np.ndarray | None:
    r"""The audit of the steps whose gap exceeds the rounding of the stored parameters (others 0), ``None`` if none.

    A step's audited gap :math:`\|E_s\| = \mathrm{audit}_s \|\Delta\theta_s\|` is rounding when it is within
    :data:`ROUNDING_UNITS` unit roundoffs of :math:`\|\theta_{s+1}\|` in the parameters' dtype (in float64 only
    when the updates themselves are near that rounding: a learning rate so small that
    :math:`\|\Delta\theta_s\| / \|\theta_{s+1}\|` approaches 1e-16 / AUDIT_TOL).
    """
    names = traj.param_names
    dtype = traj.params(start)[names[0]].dtype
    if not dtype.is_floating_point:
        return audit
    unit = torch.finfo(dtype).eps / 2
    beyond = np.zeros_like(audit)
    for k in np.flatnonzero(audit > AUDIT_TOL):
        current, following = traj.params(start + int(k)), traj.params(start + int(k) + 1)
        step = sum(float((following[n].double() - current[n].double()).square().sum()) for n in names) ** 0.5
        size = sum(float(following[n].double().square().sum()) for n in names) ** 0.5
        if audit[k] * step > ROUNDING_UNITS * unit * size:
            beyond[k] = audit[k]
    return beyond if beyond.any() else None


def _tiny_update_cause(traj: Any, largest: float, step: int) -> str:
    """Why a run leaves a residual although its updates are reproduced to rounding: they are that small."""
    before, after = traj.params(step), traj.params(step + 1)
    moved = sum(float((after[n].double() - before[n].double()).square().sum()) for n in traj.param_names) ** 0.5
    size = sum(float(after[n].double().square().sum()) for n in traj.param_names) ** 0.5
    dtype = str(after[traj.param_names[0]].dtype).removeprefix("torch.")
    return (f"the updates are at the rounding level of the {dtype} parameters: at step {step} |theta_s+1 - theta_s| "
            f"is {moved / max(size, 1e-300):.2g} of |theta_s+1| and traj.audit() reaches {largest:.2g}, within "
            f"{ROUNDING_UNITS:g} unit roundoffs of |theta_s+1|, so each stored update carries the rounding of "
            f"theta_s + update (up to half an ulp of every parameter), which no per-sample term carries — a learning "
            f"rate this small moves the model by little more than rounding; raise it"
            + ("" if dtype == "float64" else " or train in float64")
            + ", or accept the share with a larger residual_tol")


def _float32_cause(traj: Any, largest: float, step: int, rounding: bool = True) -> str:
    """Why a run in a dtype below float64 leaves a residual although its updates are reproduced to rounding
    (``rounding``: the audit was checked within :data:`ROUNDING_UNITS` unit roundoffs; else it is below
    :data:`AUDIT_TOL`)."""
    dtype = str(traj.params(0)[traj.param_names[0]].dtype).removeprefix("torch.")
    within = (f"within {ROUNDING_UNITS:g} unit roundoffs of |theta_s+1|" if rounding
              else f"below the adapter threshold {AUDIT_TOL:g} of a step")
    return (f"the run was trained in {dtype}: its updates are reproduced to the rounding of the stored parameters "
            f"(traj.audit() up to {largest:.2g}, at step {step}, {within}), but the loop's gradients are {dtype} "
            f"sums, rounded relative to their per-sample terms, and the engine recomputes them in float64; where "
            f"a gradient nearly cancels, an Adam-type optimizer "
            f"(which divides by sqrt(v)+eps) turns that rounding into a step of order lr, and large activations or "
            f"logits (a diverging run) make it large, and the residual holds it "
            f"— train in float64 (explaind train --dtype float64, or model.double()) for a residual at rounding "
            f"level")


#: How :func:`check_finite` names the derivatives that were not finite, per estimator path.
JACOBIAN_TERMS = ("the reverse-mode Jacobians of keep with 'param' or 'train' (forward-mode derivatives, which keep=() "
                  "and ('step',) take, select the branch's tangent and stay finite)")
PATH_TERMS = "the path derivatives (forward mode, torch.func.jvp)"
METAGRADIENT_TERMS = ("the reverse-mode derivatives of the outputs at theta_stop that start the metagradient sweep "
                      "(KernelReplica and InfluenceEstimator(keep=()), forward mode, stay finite)")


def check_finite(att: Attribution, owner: str, how: str) -> None:
    """Refuse an attribution whose terms are NaN or inf at test inputs where the model's outputs are finite.

    Such terms come from derivatives, not values: reverse-mode Jacobians multiply the derivative of a branch
    ``torch.where`` does not select by 0, and ``0 * NaN`` is NaN (``sqrt`` or ``log`` of values outside their domain
    at the test inputs only, which the training inputs never reached). Completeness cannot hold there, and a NaN
    share would raise no warning, so this is an error naming the inputs, the cause and the fix. ``how`` names the
    derivatives (:data:`JACOBIAN_TERMS`, :data:`PATH_TERMS`, :data:`METAGRADIENT_TERMS`).

    Raises
    ------
    UnsupportedModelError
        Naming the test inputs whose terms are not finite.
    """
    terms = [t for t in (att.values, att.regularization, att.residual, att.quadrature_error,
                         getattr(att, "buffers", None)) if t is not None]
    refuse_non_finite([att.initial, att.final], terms, owner, "the attribution holds", how)


def refuse_non_finite(ends: list[Tensor], terms: list[Tensor], owner: str, what: str, how: str) -> None:
    """Raise :class:`UnsupportedModelError` naming the test inputs (first axis) where every tensor of ``ends``
    (the model's outputs) is finite and one of ``terms`` is not (see :func:`check_finite`)."""
    def finite_rows(t: Tensor) -> Tensor:
        flat = t.reshape(t.shape[0], -1)
        ok = torch.isfinite(flat.sum(1))  # a finite sum has only finite terms (NaN and inf propagate)
        if not bool(ok.all()):  # an overflowing sum of finite terms: look at those rows term by term
            ok[~ok] = torch.isfinite(flat[~ok]).all(1)
        return ok

    def rows(tensors: list[Tensor]) -> Tensor:
        return torch.stack([finite_rows(t) for t in tensors]).all(0)

    ok_ends, ok_terms = rows(ends), rows(terms)
    bad = [i for i in range(len(ok_ends)) if bool(ok_ends[i]) and not bool(ok_terms[i])]
    if not bad:
        return
    raise UnsupportedModelError(
        f"{owner}: {what} NaN or inf at test inputs {bad[:8]}{' ...' if len(bad) > 8 else ''} where the model's "
        f"outputs are finite: {how} are not finite there. The usual causes: torch.where (or a mask) choosing "
        f"between branches one of which is NaN or inf where it is not chosen (sqrt, log or a division of values "
        f"outside their domain, reached at these inputs and not by the training inputs), whose derivative times 0 "
        f"is NaN; or sqrt at 0, as in a norm written sqrt((h ** 2).sum()) of a vector that is 0 at these inputs "
        f"(ReLU units all off), whose derivative is infinite. Fix: apply the selection to the branch's input too "
        f"(the double where), torch.where(h > 0, torch.sqrt(torch.where(h > 0, h, 1.0)), h); "
        f"torch.linalg.vector_norm(h, dim=-1), whose derivative at 0 is 0, for a hand-written norm; then train and "
        f"explain that model, or explain other inputs.")


def check_residual(att: Attribution, traj: Any, window: tuple[int, int], *, tol: float | str, strict: bool,
                   owner: str) -> float:
    """Store the residual share in ``att.meta``; above ``tol`` (a number, or ``"auto"``: the run's rounding level,
    explaind/estimators/_residual_tol.py) warn (``strict``: raise) naming the likely causes.

    Raises
    ------
    TrajectoryError
        With ``strict`` when the share exceeds ``tol``.
    """
    share = att.residual_share()
    att.meta["residual_share"] = share
    limit = resolve_residual_tol(tol, traj, window, att.meta.get("promoted_casts"), att.final.dtype)
    att.meta["residual_tol"] = limit.value
    if limit.autocast is not None:
        att.meta["expected_residual_share"] = limit.expected()
    if not share > limit.value:
        return share
    causes = "; ".join(f"({i + 1}) {c}" for i, c in enumerate(residual_causes(traj, window)))
    size = float(att.final.abs().amax())
    change = float((att.final - att.initial).abs().amax())
    still = ""
    if change <= ROUNDING_CHANGE * torch.finfo(att.final.dtype).eps * size:  # a share of (almost) nothing
        res = att.residual
        residual = float(res.reshape(res.shape[0], -1, res.shape[-1]).sum(1).abs().amax())
        still = (f" The outputs hardly moved: the explained change is {change / max(size, 1e-300):.2g} of the "
                 f"outputs (0: not at all), at the rounding of their {str(att.final.dtype).removeprefix('torch.')} "
                 f"values, so the share divides by almost nothing; the residual itself is "
                 f"{residual / max(size, 1e-300):.2g} of the outputs, and the per-sample scores hold its opposite.")
    if limit.autocast is not None:
        still += autocast_statement(limit, share)
    message = (f"{owner}: residual share {share:.3g} > residual_tol={limit.label}: {100 * share:.3g}% of the "
               f"explained change g(theta_stop) - g(theta_start) is residual, not split over training samples, so the "
               f"per-sample scores miss it.{still} Likely causes: {causes}. Raise residual_tol to accept it, or "
               f"pass strict=True to make this an error.")
    if strict:
        raise TrajectoryError(message)
    warn_at_caller(message)
    return share


def check_quadrature(att: Attribution, rule: str, *, tol: float, owner: str, jumps: tuple[str, ...] = (),
                     jacobian: bool = False) -> float:
    r"""Store the quadrature-error share in ``att.meta``; above ``tol`` warn naming the rule and the fix (or the
    ``jumps``, calls of the forward whose output can jump or that stop the gradient: explaind/kernel/jumps.py).
    ``jacobian``: the values came from reverse-mode Jacobians, which stop at a ``torch.no_grad()`` block of the
    forward where forward-mode derivatives do not.

    The share is :math:`\sum_{x,o} |\sum_s \text{quadrature\_error}|` over
    :math:`\sum_{x,o} |g(\theta_{stop}) - g(\theta_{start})|`: the part of the change the path
    integrals missed. The ``"left"`` rule (TracIn) is first order by design and is not warned about.
    """
    err = att.quadrature_error
    err = err.reshape(err.shape[0], -1, err.shape[-1]).sum(1).abs()
    share = float(err.sum() / (att.final - att.initial).abs().sum().clamp_min(torch.finfo(err.dtype).tiny))
    att.meta["quadrature_share"] = share
    if share > tol and rule != "left":
        fix = ("a smaller tol; where pairs stopped at the cap of evaluations (kink-dense paths: the adaptive "
               "rule's warning says 'stopped at the cap'), a smaller tol does not help: raise the cap (max_evals=, "
               "4096 by default), or use quadrature='midpoint', nodes=N, whose error falls about like 1/N"
               if rule == "adaptive"
               else "quadrature='adaptive' or more nodes")
        change = float((att.final - att.initial).abs().amax())
        size = float(att.final.abs().amax())
        frozen, off = grad_off_sites(jumps, INFERENCE), grad_off_sites(jumps, NO_GRAD)
        hooks = hook_sites(jumps)
        others = [j for j in jumps if j not in frozen and j not in off and j not in hooks]
        plain_off = [j for j in off if j not in function_sites(off)]  # no_grad blocks, not a Function's forward
        if change <= ROUNDING_CHANGE * torch.finfo(att.final.dtype).eps * size:
            fix = (f"a larger learning rate, or explain a run that moved: the explained change is only "
                   f"{change / max(size, 1e-300):.2g} of the outputs themselves, near the rounding of their "
                   f"{str(att.final.dtype).removeprefix('torch.')} values, which the exact endpoint values carry and "
                   f"no integral does (no tol or rule removes it)")
        elif frozen:
            fix = (f"torch.no_grad() instead of torch.inference_mode() in the forward: "
                   f"{'; '.join(frozen[:4])} reads parameter-dependent values in inference "
                   f"mode, which no derivative passes through, so the output moves where the gradient does not; "
                   f"no_grad gives the same values and training gradients, and forward-mode derivatives (the "
                   f"replica, keep without 'param' and 'train') run through it")
        elif jacobian and off and not plain_off and not others:
            fix = (f"an explanation by forward-mode derivatives: {'; '.join(off[:4])} runs in the forward of a custom "
                   f"torch.autograd.Function, whose backward, which the reverse-mode Jacobians of keep with 'param' or "
                   f"'train' follow as the training gradient did, is not the derivative of its forward, which the "
                   f"output follows (its jvp), when the Function changes gradients on purpose (a gradient reversal "
                   f"layer, a straight-through estimator); no tol or rule integrates that. KernelReplica and keep=() "
                   f"or ('step',) run its jvp and are exact on this model if that jvp is the derivative of its "
                   f"forward (else the replica's quadrature warning names the Function too). 'param' and 'train' "
                   f"take forward-mode Jacobians (exact) when the dot-product test of the backward against the jvp "
                   f"finds them apart, which needs a jvp (torch.autograd.Function.jvp, with setup_context and "
                   f"generate_vmap_rule=True): give the Function one equal to the derivative of its forward")
        elif jacobian and hooks and not others:
            fix = (f"an explanation by forward-mode derivatives: {'; '.join(hooks[:4])} registers a gradient hook "
                   f"in the forward, which the backward, and so the reverse-mode Jacobians of keep with 'param' or "
                   f"'train', follow as the training gradient did, while the output does not (a hook that changes "
                   f"gradients, as lambda g: -g for a gradient reversal layer); no tol or rule integrates that. "
                   f"KernelReplica and keep=() or ('step',) are exact on this model; 'param' and 'train' take "
                   f"forward-mode Jacobians (exact) when the dot-product test of the backward finds them apart, "
                   f"which failed to run here: a forward without gradient-changing hooks for the run you want "
                   f"explained")
        elif jacobian and plain_off:
            fix = (f"an explanation by forward-mode derivatives, which run through torch.no_grad(): "
                   f"{'; '.join(plain_off[:4])} reads parameter-dependent values with the "
                   f"gradient off (a torch.no_grad() or set_grad_enabled(False) block, or a @torch.no_grad() "
                   f"function), where the reverse-mode Jacobians of keep with 'param' or 'train' stop, as the "
                   f"training gradient did, while the output moves with those values (no tol or rule integrates "
                   f"that). KernelReplica and keep=() or ('step',) are exact on this model; for exact 'param' or "
                   f"'train' scores, a forward without torch.no_grad() around parameter-dependent values for the "
                   f"run you want explained")
        elif others and len(stop_sites(others)) == len(others):  # only detaches: a straight-through jump is below
            fix = (f"a forward without .detach() on parameter-dependent values (nor functions torch gives no "
                   f"derivative) for the run you want explained: {'; '.join(stop_sites(others)[:4])} stops their "
                   f"gradient, so the output moves where the gradient does not, and no tol or rule integrates that "
                   f"(the quadrature warning says more)")
        elif others and len(singular_sites(others)) == len(others):
            fix = (f"matrices that stay invertible along every step: {'; '.join(others[:4])} takes log|det|, which "
                   f"is -inf where a matrix turns singular, and no tol or rule integrates across that (a smaller "
                   f"learning rate; the quadrature warning says more)")
        elif others:
            fix = (f"a continuous forward for the run you want explained: the forward applies calls whose output can "
                   f"jump as the parameters move ({'; '.join(others[:4])}), and no tol or rule integrates across a "
                   f"jump (the quadrature warning names the kinds and their relaxations)")
        warn_at_caller(f"{owner}: quadrature error share {share:.3g} > {tol:g} with quadrature={rule!r}: the path "
                       f"integrals miss {100 * share:.3g}% of the explained change (it is kept in quadrature_error, "
                       f"so completeness holds, but the scores do not include it). Use {fix}.")
    return share
