"""Which parameters one optimizer step moves, and how the recorder models the ones it does not.

A torch optimizer updates exactly the parameters of its ``param_groups`` that hold a gradient
(``p.grad is not None``); frozen parameters whose gradient was set to ``None``, parameters outside
the optimizer and those no backward reached keep their value. The recorder therefore decides
per step, from the live optimizer (so ``add_param_group`` and freezing mid-run are seen):

* a recorded parameter the optimizer does not step gets ``LinearUpdate(a=1, b=0, P=0)`` (it does
  not move; a momentum buffer it holds is carried unchanged, as torch does);
* a stepped parameter whose gradient no backward produced in this step must hold an exact zero
  gradient (``zero_grad(set_to_none=False)``): its update keeps the optimizer's coefficients with
  ``b = n = 0``, so no data term enters at that step; a non-zero leftover gradient is refused;
* a parameter frozen when recording started is stored as a constant: stepping it later is refused
  with the fix (``record_frozen=True``);
* a parameter frozen when recording started (a constant) must keep its stored value: edited by
  hand during recording (``p.data.mul_``, ``p.copy_``, ``load_state_dict``) the model no longer is
  the one the trajectory evaluates, and the edit is no term of the decomposition (unlike a buffer,
  whose changes are recorded per step). It is refused at the next step
  (:func:`frozen_edit_message`) and warned about when recording ends;
* a recorded parameter must hold, when the next step begins, the value recorded after the previous
  one: a change made outside ``optimizer.step()`` (``p.data`` edits such as weight clipping, an EMA
  or ``load_state_dict`` written into the model, another optimizer) is no term of the recurrence,
  and the next step's gradients would be taken at parameters the trajectory does not hold. It is
  refused at the next step (:func:`edited_parameters`, :func:`edit_message`) and warned about when
  recording ends.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ..recurrence import LinearUpdate
from ._gradients import _same

__all__ = [
    "UNCHANGED",
    "called_by_grad_scaler",
    "check_optimizer_params",
    "collect_updates",
    "edit_list",
    "edit_message",
    "edited_parameters",
    "foreign_parameters",
    "frozen_edit_message",
    "own_update",
    "refuse_unknown_grad_scaler",
    "stepped_parameters",
    "stepped_without_backward",
    "without_gradient_input",
]

logger = logging.getLogger("explaind.trajectory.recorder")


def foreign_parameters(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Any = None) -> str | None:
    """A message when the optimizer holds tensors that are not parameters of ``model``; those a loss module
    (``loss``, an ``nn.Module``) owns are named with it."""
    model_ids = {id(p) for p in model.parameters()}
    foreign = [
        (g, i, p)
        for g, group in enumerate(optimizer.param_groups)
        for i, p in enumerate(group["params"])
        if id(p) not in model_ids
    ]
    if not foreign:
        return None
    listed = "; ".join(f"group {g} position {i} shape {tuple(p.shape)}" for g, i, p in foreign)
    averaged = ""
    if isinstance(model, torch.optim.swa_utils.AveragedModel):
        averaged = (" The recorder was given a torch.optim.swa_utils.AveragedModel: its parameters are a copy that "
                    "update_parameters() averages outside the optimizer. Record the model the optimizer trains "
                    "(the trajectory then ends at its last iterate, not at the average).")
    held = {id(p): n for n, p in loss.named_parameters()} if isinstance(loss, nn.Module) else {}
    owned = [held[id(p)] for _, _, p in foreign if id(p) in held]
    if owned:
        averaged += (f" The loss module {type(loss).__name__} owns {owned}: the path kernel differentiates the model's "
                     f"outputs, so a tensor the loss trains is not part of the explained function. Fix: move it "
                     f"into the model (a wrapper module holding the model and {owned[0]!r}, whose forward returns "
                     f"the outputs the loss reads, e.g. model(x) / {owned[0]}.exp() for a learned temperature) and "
                     f"pass a loss without parameters (F.cross_entropy); the tensor is then recorded and explained "
                     f"with the others.")
    return (
        f"The optimizer holds {len(foreign)} parameter tensor(s) that are not parameters of the model: {listed}. "
        f"Build the optimizer (and every add_param_group) from parameters of the model passed to the recorder."
        f"{averaged}"
    )


def renamed_parameters(model: nn.Module, params: dict[str, nn.Parameter]) -> str | None:
    """A message when a recorded parameter is no longer the model's parameter of its name (``None`` otherwise).

    ``torch.nn.utils.prune`` (Lightning's ``ModelPruning``) re-registers a pruned ``weight`` as ``weight_orig`` and
    computes ``weight`` from it and a mask in a forward pre-hook, ``torch.nn.utils.parametrize`` likewise: the
    model's function then changes outside ``optimizer.step()``, and the engine, which replays every step by
    parameter name, would evaluate another function.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    gone = [n for n, p in params.items() if named.get(n) is not p]
    if not gone:
        return None
    now = {id(p): n for n, p in named.items()}
    listed = ", ".join(f"{n} (now {now[id(params[n])]!r})" if id(params[n]) in now else f"{n} (no longer a parameter)"
                       for n in gone[:8]) + (f" and {len(gone) - 8} more" if len(gone) > 8 else "")
    if any("._orig_mod." in f".{now.get(id(params[n]), '')}" for n in gone):
        from .._compiled import FALLBACK_FIX

        return (f"the recorded parameter(s) {listed} are no longer the model's parameters of those names: a submodule "
                f"was replaced by its torch.compile wrapper (an OptimizedModule, which holds the module's parameters "
                f"under '_orig_mod') after the recorder started. explaind replays every step by parameter name, and "
                f"a compiling backend draws dropout masks and other random numbers with its own generator, which no "
                f"replay repeats. Fix: compile before the recorder starts (then {FALLBACK_FIX}), or record the "
                f"uncompiled model.")
    return (f"the recorded parameter(s) {listed} are no longer the model's parameters of those names, so the model's "
            f"function changed outside optimizer.step() (torch.nn.utils.prune and Lightning's ModelPruning rename a "
            f"pruned weight to '<name>_orig' and multiply it by a mask in a forward pre-hook; "
            f"torch.nn.utils.parametrize moves it under 'parametrizations'). explaind replays every step by "
            f"parameter name, so the earlier steps would be replayed with another function. Fix: prune or "
            f"parametrize before the recorder starts (and keep it for the whole run), or after recording, on the "
            f"explained model.")


def check_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, Tensor],
                           loss: Any = None) -> None:
    """Raise :class:`TrajectoryError` when the optimizer holds tensors that are not ``model``'s (see
    :func:`foreign_parameters`, which names those the ``loss`` module owns); log the recorded ``params`` the
    optimizer does not hold."""
    message = foreign_parameters(model, optimizer, loss)
    if message is not None:
        raise TrajectoryError(message)
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
    idle = [n for n, p in params.items() if id(p) not in in_opt]
    if idle:
        logger.info("Recorded parameters not in the optimizer (recorded as not moving while outside it): %s", idle)


def stepped_parameters(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    constants: dict[str, nn.Parameter],
    step: int,
) -> list[str]:
    """Names of the recorded parameters ``optimizer.step()`` is about to update (in the optimizer, with a gradient).

    Parameters
    ----------
    params : dict of str to Parameter
        The recorded parameters.
    constants : dict of str to Parameter
        Parameters stored as constants (frozen when recording started, without ``record_frozen``).
    step : int
        Step number (messages).

    Raises
    ------
    TrajectoryError
        When the optimizer would update a parameter stored as a constant, or holds a tensor that is
        not a parameter of the model (``add_param_group`` with foreign tensors).
    """
    # renamed first: a parametrization registered mid-run also leaves the optimizer holding the old tensor
    message = renamed_parameters(model, params) or foreign_parameters(model, optimizer)
    if message is not None:
        raise TrajectoryError(f"Step {step}: {message}")
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    moving = [n for n, p in constants.items() if id(p) in in_opt]
    if moving:
        raise TrajectoryError(
            f"Step {step}: optimizer.step() would update {', '.join(moving)}, which had requires_grad=False when the "
            f"recorder started and is therefore stored as a constant of the trajectory. Fix: create the recorder "
            f"with record_frozen=True (every parameter is recorded; a frozen one as not moving while frozen), or "
            f"keep the parameter frozen and its .grad None."
        )
    return [n for n, p in params.items() if id(p) in in_opt]


def stepped_without_backward(tap: Any, seen: dict[str, Tensor], s: int) -> set[str]:
    """Stepped parameters no backward reached in this step (an exact zero ``.grad``; a leftover is refused)."""
    out = set()
    for n, g in seen.items():
        if tap.reached(n):
            continue
        if bool(g.any()):
            raise TrajectoryError(
                f"Step {s}: optimizer.step() would update {n} with a gradient that no backward() of this step "
                f"produced (left over from an earlier step, or set by hand); the recorder can only attribute "
                f"gradients of the logged batch. Fix: zero it or set it to None before the step "
                f"(model.zero_grad() clears every parameter; optimizer.zero_grad() only the optimizer's). A "
                f"gradient computed with torch.autograd.grad and assigned to .grad (or one from torch.func.grad over "
                f"functional_call) is not seen as this step's (nothing tells it from a leftover): compute it "
                f"with loss.backward(), the same gradient, accumulated into .grad where the recorder observes it. "
                f"Float32 master weights whose .grad is "
                f"copied from a half-precision copy's backward are refused so too: record the float32 model and "
                f"train it under torch.autocast(device_type=..., dtype=torch.bfloat16), the same half-precision "
                f"arithmetic, recorded (docs/engine.md, 'float32 and half-precision runs')."
            )
        out.add(n)
    return out


def own_update(u: LinearUpdate) -> LinearUpdate:
    """``u`` with detached copies of its tensor coefficients (an adapter may reuse its buffers next step)."""
    values = vars(u)
    if not any(isinstance(v, Tensor) for v in values.values()):
        return u
    return LinearUpdate(**{k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in values.items()})


def _is_zero(value: Any) -> bool:
    if isinstance(value, Tensor):
        return not bool(value.any())
    return float(value) == 0.0


def without_gradient_input(name: str, update: LinearUpdate, step: int) -> LinearUpdate:
    """``update`` with the gradient removed (``b = n = 0``) for a parameter stepped with an exact zero gradient.

    Raises
    ------
    TrajectoryError
        When the update has coupled weight decay (``lambda_c != 0``): it enters through the same
        coefficients as the gradient, so the step cannot be expressed without a gradient term.
    """
    if not _is_zero(update.lambda_c):
        raise TrajectoryError(
            f"Step {step}: {name} received no gradient from backward() in this step, but the optimizer stepped it "
            f"with a zero .grad and coupled weight decay, which the recurrence cannot express without a gradient "
            f"term. Fix: set its .grad to None when it gets no gradient (optimizer.zero_grad(set_to_none=True), "
            f"the default), or use decoupled weight decay (AdamW)."
        )
    return dataclasses.replace(update, b=0.0, n=0.0)


def refuse_unknown_grad_scaler(scaler: Any, step: int) -> None:
    """Raise when ``optimizer.step()`` runs inside ``GradScaler.step`` but the recorder was given no scaler."""
    if scaler is None and called_by_grad_scaler():
        raise TrajectoryError(
            f"Step {step}: optimizer.step() is called by torch.amp.GradScaler.step, but the recorder does "
            f"not know the scaler, so the loss scale of each step cannot be recorded. Fix: "
            f"TrajectoryRecorder(..., grad_scaler=scaler). Inside ExplaindTrainerCallback or "
            f"ExplaindLightningCallback the scaler is taken from accelerate's prepared optimizer "
            f"(`.scaler`) or Lightning's precision plugin (`.scaler`); a plugin that keeps it elsewhere "
            f"needs the plain-loop recorder (docs/guide_own_model.md, 'Mixed precision'). In a Lightning Fabric loop: "
            f"grad_scaler=fabric.strategy.precision.scaler; in an accelerate loop: grad_scaler=accelerator.scaler "
            f"(docs/guide_own_model.md, 'Fabric and Accelerate')."
        )


#: The update of a recorded parameter the optimizer did not step.
UNCHANGED = LinearUpdate(a=1.0, b=0.0, P=0.0)


def collect_updates(params: dict[str, Tensor], by_id: dict[int, LinearUpdate], no_input: Any,
                    step: int, fresh: bool = False) -> dict[str, LinearUpdate]:
    """One update per recorded parameter from the adapter's ``after_step`` (keyed by ``id(param)``).

    A parameter the adapter did not report gets :data:`UNCHANGED`; one stepped without gradient
    input (in ``no_input``) gets :func:`without_gradient_input`; tensor coefficients are copied,
    unless ``fresh`` (the adapter's ``fresh_tensors``: they are new and the adapter never touches them again).
    """
    out = {}
    for n, p in params.items():
        u = by_id.get(id(p))
        if u is None:
            out[n] = UNCHANGED
            continue
        u = u if fresh else own_update(u)
        out[n] = without_gradient_input(n, u, step) if n in no_input else u
    return out


def called_by_grad_scaler(depth: int = 8) -> bool:
    """Whether ``optimizer.step()`` is being called by ``torch.amp.GradScaler.step`` (inspects the caller frames)."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.amp.GradScaler):
            return True
        frame = frame.f_back
    return False


def edited_parameters(params: dict[str, nn.Parameter], recorded: dict[str, Tensor]) -> list[tuple[str, float]]:
    r"""Recorded parameters whose live value differs from the last recorded one, with the relative change.

    Parameters
    ----------
    params : dict of str to Parameter
        The live recorded parameters.
    recorded : dict of str to Tensor
        :math:`\theta_s` as recorded (after the previous step, or when recording started).

    Returns
    -------
    list of (str, float)
        ``(name, ||p - theta_s[name]|| / ||theta_s[name]||)`` for every parameter that changed (by value:
        ``p.data`` edits do not bump the version counter); empty when none did.
    """
    out = []
    for name, p in params.items():
        ref = recorded.get(name)
        if ref is None or _same(p.detach(), ref):
            continue
        live = p.detach().to(ref.device, torch.float64)
        base = float(ref.double().norm())
        out.append((name, float((live - ref.double()).norm()) / (base if base > 0 else 1.0)))
    return out


def edit_list(edited: list[tuple[str, float]]) -> str:
    """The first five edited parameters of :func:`edited_parameters` with their relative change, and how many more."""
    listed = ", ".join(f"{n} (relative change {r:.3g})" for n, r in edited[:5])
    return listed + (f" and {len(edited) - 5} more" if len(edited) > 5 else "")


def retyped_hint(params: dict[str, nn.Parameter], recorded: dict[str, Tensor]) -> str:
    """For recorded parameters whose dtype is no longer the recorded one: the module that converted them, named, and
    the fix; ``""`` when none changed dtype (a change of dtype alone leaves the relative change near 0)."""
    changed = [(n, recorded[n].dtype, p.dtype) for n, p in params.items()
               if n in recorded and p.dtype != recorded[n].dtype]
    if not changed:
        return ""
    shown = ", ".join(f"{n} ({was} -> {now})" for n, was, now in changed[:5])
    return (f" The parameter(s) {shown} changed dtype: a module converted its own parameters, a module.to(dtype) "
            f"inside forward (the routers of SwitchTransformers and NLLB-MoE run `self.classifier = "
            f"self.classifier.to(self.dtype)`, config.router_dtype='float32' in any model dtype), so the optimizer "
            f"steps parameters of another dtype than the ones recorded; such a forward also writes p.data, which "
            f"torch.func refuses, so it cannot be replayed as it is. Fix: a forward that leaves its parameters "
            f"alone; for those routers, router.dtype = the model's dtype and router.classifier.to = lambda *args, "
            f"**kwargs: router.classifier on every router before recording.")


def edit_message(edited: list[tuple[str, float]], step: int, start: int) -> str:
    """The error of step ``step`` whose parameters changed outside ``optimizer.step()`` (``start``: first recorded)."""
    since = "recording started" if step == start else f"step {step - 1} was recorded"
    text = (
        f"Step {step}: the parameter(s) {edit_list(edited)} changed outside optimizer.step() since {since}: an edit of "
        f"p.data or an in-place write (weight clipping, an EMA or load_state_dict written into the model, "
        f"Lookahead's sync of slow and fast weights after its inner optimizer's step), or "
        f"another optimizer stepping them. explaind decomposes only the recorded optimizer's updates, and this "
        f"step's gradients were taken at parameters the trajectory does not hold, so it cannot be recorded exactly "
        f"(nothing was stored for it; the {step - start} step(s) recorded before are kept). Fix: make such changes "
        f"before `with rec:` or after it, express them through the optimizer (e.g. weight_decay instead of "
        f"shrinking the weights), or record a model holding only the parameters this optimizer trains. Two "
        f"optimizers over one model (SGD for one part, Adam for another) are not recorded: train every part with "
        f"one optimizer, a parameter group per part (its own lr, weight_decay, momentum or betas). A recipe whose "
        f"writes are part of training (Lookahead) is explained from the parameters saved after every step, "
        f"explaind.Trajectory.from_checkpoints(checkpoints, model) (no split over samples)."
    )
    note = _undone_note(edited)  # SAM through p.data: named right after the first sentence
    head = text.index(" explaind decomposes only")
    return text[:head] + note + text[head:] if note else text


#: Largest relative change that is read as the rounding of a write and its undo (float64 and float32 alike).
UNDONE = 1e-6


def _undone_note(edited: list[tuple[str, float]]) -> str:
    """For changes no larger than the rounding of a write and its undo: SAM's perturbation through ``p.data``."""
    if not edited or max(r for _, r in edited) > UNDONE:
        return ""
    return (f" Every change is at most {UNDONE:g} relative, the rounding a write and its undo leave ((p + e) - e): "
            f"sharpness-aware minimisation (SAM, ASAM) written through p.data (p.data.add_(e_w) before the second "
            f"backward(), p.data.sub_(e_w) before the step), whose step's gradient was taken at theta + e. With the "
            f"gradient check on (check_gradients='auto', the default) the recorder names the perturbation at step 0. "
            f"Such a step has no exact split over samples: record the base optimizer's run without the perturbation, "
            f"or explain the saved parameters with explaind.Trajectory.from_checkpoints.")


def frozen_edit_message(edited: list[tuple[str, float]], step: int, start: int) -> str:
    """The error of step ``step`` whose frozen parameters (constants of the trajectory) changed (``start``: first step).

    Parameters
    ----------
    edited : list of (str, float)
        :func:`edited_parameters` of the frozen parameters against their stored values.
    step, start : int
        The step about to be recorded and the first step this recorder records.
    """
    since = "recording started" if step == start else f"step {step - 1} was recorded"
    return (
        f"Step {step}: the frozen parameter(s) {edit_list(edited)} changed since {since}. They had "
        f"requires_grad=False when the recorder started, so the trajectory stores them once, as constants, and "
        f"evaluates every step at those values; an edit of p.data or an in-place write (p.mul_, p.copy_, "
        f"load_state_dict), or a forward that updates a parameter as a running statistic, is no term of the "
        f"decomposition, and this step's gradients were taken at a model the trajectory does not hold, so it cannot "
        f"be recorded exactly (nothing was stored for it; the {step - start} step(s) recorded before are kept). "
        f"Fix: make such changes before `with rec:` or after it; keep a value the forward updates in a buffer "
        f"(module.register_buffer), whose changes are recorded per step; or train the parameter through the "
        f"optimizer (requires_grad=True, or TrajectoryRecorder(..., record_frozen=True) to unfreeze it later). An "
        f"EMA copy of the model kept inside it and updated by hand (a mean teacher, BYOL's or DINO's target "
        f"network) that the recorded forward does not call: keep it outside the recorded model, as its own "
        f"nn.Module or a torch.optim.swa_utils.AveragedModel, and the run is recorded exactly."
    )


def never_stepped_message(logged: int, optimizer: type, edited: list[tuple[str, float]]) -> str:
    """The warning of a recorder left with ``logged`` micro-batches and no step of its optimizer.

    Parameters
    ----------
    logged : int
        Micro-batches logged with ``rec.log_batch`` (none followed by a step of the recorded optimizer).
    optimizer : type
        The recorded optimizer's class.
    edited : list of (str, float)
        :func:`edited_parameters` of the recorded parameters against their values when recording started.
    """
    name = f"{optimizer.__module__}.{optimizer.__qualname__}"
    moved = "" if not edited else (
        f" Yet the parameter(s) {edit_list(edited)} changed: they were updated outside optimizer.step(), by hand "
        f"(p.data.add_(-lr * p.grad) under torch.no_grad()) or by another optimizer object.")
    return (
        f"{logged} micro-batch(es) were logged, but the recorded optimizer ({name}) never stepped, so the trajectory "
        f"holds no step and explains nothing.{moved} Fix: update through optimizer.step() of the optimizer given to "
        f"the recorder: a hand-written p -= lr * p.grad is torch.optim.SGD(model.parameters(), lr=lr) (momentum 0), "
        f"which takes the same steps and is recorded exactly; an update torch has no optimizer for needs an adapter "
        f"(docs/optimizers.md, 'Writing an adapter for another optimizer')."
    )


def second_step_message(step: int) -> str:
    """The error of ``optimizer.step()`` called again with no ``backward`` since the previous step's batch."""
    return (
        f"Step {step}: optimizer.step() was called without a logged batch, and no backward() ran since step "
        f"{step - 1}: the gradients are that step's, unchanged, so this is a second optimizer.step() on one "
        f"backward (a duplicated line, or a step both in the loop and in a helper), an update on a gradient of "
        f"parameters that have moved since. Fix: remove the extra optimizer.step(); for a second update on the same "
        f"batch, run its forward and backward again and log it with rec.log_batch (recorded exactly)."
    )
