r"""Training recipes that write the weights besides the optimizer's update, named where a run meets them.

Two families of recipes change the parameters outside the update an optimizer adapter models
(docs/maths.md §3):

* **Sharpness-aware minimisation** (SAM, ASAM): the loop takes the gradient at perturbed weights
  :math:`\theta_s + \epsilon_s`, writes :math:`\theta_s` back (``p.data = old_p`` or ``p.sub_(e_w)``) and
  steps. The step's gradient is then no gradient at :math:`\theta_s`, where explaind recomputes every
  per-sample gradient, so the step has no exact split over samples.
  :func:`written_since_backward_message` names it; the recorder sees it as a parameter whose storage or
  version counter moved between the ``backward()`` that last reached it and ``optimizer.step()``
  (:meth:`explaind.trajectory._gradients.GradientTap.written_since_backward`).
* **Optimizer wrappers** (Lookahead, a SAM class holding its ``base_optimizer``): an optimizer object
  whose ``step`` calls another one and then writes the weights (Lookahead's slow-weight sync). No adapter
  handles the wrapper; :func:`wrapper_note` names the inner optimizer it found and what can be recorded.

The exact alternative for both is the one for any update that no elementwise adapter expresses: the
parameters saved after every step, explained as macro-steps with ``Trajectory.from_checkpoints``
(replica, step and group axes exact along the straight segments; no split over samples).
"""

from __future__ import annotations

from typing import Any

__all__ = ["written_since_backward_message", "perturbed_gradient_message", "wrapper_note", "inner_optimizers"]

#: Attribute names under which optimizer wrappers keep the optimizer they wrap (Lookahead, SAM, ...).
_INNER_NAMES = ("base_optimizer", "optimizer", "base", "inner", "inner_optimizer", "_optimizer", "opt")

_CHECKPOINTS_FIX = ("save the parameters after every optimizer.step() and explain the run with "
                    "explaind.Trajectory.from_checkpoints(checkpoints, model) (replica, step and group axes "
                    "exact along the straight segments; no split over samples)")


def written_since_backward_message(s: int, names: list[str], checked: bool) -> str:
    """Names parameters written between the ``backward()`` that produced their gradient and step ``s``'s
    ``optimizer.step()``.

    Parameters
    ----------
    s : int
        The step.
    names : list of str
        The parameters written (at most five are shown).
    checked : bool
        ``True``: the sentence that leads a failed gradient check's hint; ``False``: a warning that no gradient
        check can run at this step.

    Returns
    -------
    str
    """
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    head = (f" At step {s} the parameter(s) {shown} were written" if checked else
            f"Step {s}: the parameter(s) {shown} were written")
    tail = ("" if checked else
            "; no gradient check can run here (check_gradients off or no train_data), so the difference is "
            "left in the residual")
    return (head + " after the backward() that produced their gradient and before optimizer.step() (in place, or "
            "by assigning p.data): the optimizer then steps from other values than those the gradient was taken "
            "at, as sharpness-aware minimisation (SAM, ASAM) does when it takes the gradient at theta + e and "
            "writes theta back before the step. explaind recomputes every per-sample gradient at the parameters "
            "the step starts from, so such a step has no exact split over samples" + tail + ". Fix: record the "
            "base optimizer's run without the perturbation, or " + _CHECKPOINTS_FIX + ".")


def perturbed_gradient_message(s: int, form: str, rho: float, rel: float) -> str:
    """Names a step whose gradient is the logged batch's gradient at SAM's or ASAM's perturbation of the weights,
    found by :func:`explaind.trajectory._perturbed.perturbed_gradient_hint` when the gradient check of step ``s``
    failed (the perturbation written and undone through ``p.data``, which no version counter shows).

    Parameters
    ----------
    s : int
        The step.
    form : {"SAM", "ASAM"}
        The perturbation that matched: ``rho * g / ||g||`` or ``rho * T^2 g / ||T g||`` with ``T = |theta|``.
    rho : float
        The fitted radius.
    rel : float
        The relative distance of the loop's gradient from the batch's gradient at that perturbation.

    Returns
    -------
    str
    """
    shape = "rho * g / ||g||" if form == "SAM" else "rho * |theta|^2 * g / || |theta| * g ||"
    return (f" At step {s} the loop's gradient is the logged batch's gradient at theta + e, e = {shape} with "
            f"rho = {rho:.4g} (g the batch's gradient at theta; relative difference {rel:.2g}), not at the "
            f"parameters optimizer.step() starts from: {form}'s perturbation, added before the second backward() and "
            f"taken back before the step through p.data (p.data.add_(e_w), p.data.sub_(e_w)), writes that torch's "
            f"version counter does not count, so they were not seen when made. explaind recomputes every "
            f"per-sample gradient at the parameters the step starts from, so such a step has no exact split over "
            f"samples. Fix: record the base optimizer's run without the perturbation, or " + _CHECKPOINTS_FIX + ".")


def inner_optimizers(optimizer: Any) -> list[tuple[str, Any]]:
    """``(attribute, optimizer)`` pairs of the optimizers ``optimizer`` holds under a wrapper's usual attribute
    names (``base_optimizer``, ``optimizer``, ``base``, ...)."""
    from torch.optim import Optimizer  # torch is imported by every caller already

    found = []
    for attr in _INNER_NAMES:
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, Optimizer) and inner is not optimizer:
            found.append((attr, inner))
    return found


def wrapper_note(optimizer: Any) -> str:
    """For an optimizer that wraps another (Lookahead, a SAM class): which one it wraps and what can be recorded;
    ``""`` for any other optimizer.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer no adapter handles.

    Returns
    -------
    str
    """
    found = inner_optimizers(optimizer)
    if not found:
        return ""
    attr, inner = found[0]
    name, inner_name = type(optimizer).__name__, type(inner).__name__
    return (f" {name} wraps a {inner_name} (its attribute '{attr}'): a wrapper whose step writes the weights "
            f"besides its inner optimizer's update (Lookahead's sync of slow and fast weights, SAM's perturbation "
            f"and restore) is no update an adapter can express, and given the inner {inner_name} the recorder "
            f"refuses those writes (weights changed outside optimizer.step(), a gradient taken at other weights "
            f"than the step's). Fix: record the {inner_name} alone, without "
            f"the wrapper, or {_CHECKPOINTS_FIX}.")
