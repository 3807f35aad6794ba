r"""Training recipes that write the weights besides the optimizer's update, named where a run meets them.

Three families of recipes change the parameters outside the update an optimizer adapter models
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

* **A second optimizer** (a GAN's alternating steps): a GAN's loop steps two optimizers, each on a loss of its
  own: the discriminator's (its optimizer ``opt_D``) on the real batch and on the generator's samples
  ``G(z).detach()``, the generator's (``opt_G``) on ``D(G(z))``. One
  recorder observes one optimizer, and neither loss is a per-sample loss of fixed training items: the
  discriminator's fake rows move with the generator's parameters at every step (no ``train_data`` holds them), and
  the generator's loss involves no training item at all (docs/maths.md §1). What explaind needs for an exact
  account of either network's output, and does not have, is a per-step set of inputs made by the loop (the fakes of
  the step, their noise replayed) and the other network's parameters as per-step constants of the trajectory.

  What is exact today (tests/test_stranger_round15.py; paradigms round 12 for the frozen generator):

  * either network's parameters saved after every step of its optimizer, explained as macro-steps with
    ``explaind.Trajectory.from_checkpoints(saved, D)``: the replica, step and group axes (no split over samples);
  * the discriminator against a *frozen* generator, its samples drawn before recording and stacked as rows of
    ``train_data`` logged with their batch (a split over real and generated rows).

  The recorder meets the loop in three ways; each refusal names the shape and these alternatives:

  * the whole GAN recorded with ``opt_D``, the loop calling ``model.D`` and ``model.G``: the recorded model's own
    forward never runs (:func:`submodules_called_hint`, at the failed gradient check), and the generator's
    parameters move outside the recorded optimizer (:func:`stepped_elsewhere_note`, when the check is off);
  * the discriminator alone recorded: its forward on the fakes is a second forward of rows that are not the logged
    ones (:func:`extra_forward_hint`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["GAN_FIX", "extra_forward_hint", "inner_optimizers", "outside_optimizer", "perturbed_gradient_message",
           "stepped_elsewhere_note", "submodules_called_hint", "written_since_backward_message", "wrapper_note"]

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
    found by :func:`explaind.trajectory._gradient_fits.perturbed_gradient_hint` when the gradient check of step ``s``
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


#: The exact alternatives for a run of two alternating optimizers (the module docstring's GAN entry).
GAN_FIX = ("A GAN's alternating steps (a generator's and a discriminator's optimizer, each on a loss of its own) "
           "have no exact split over training samples in explaind: the discriminator's fake rows move with the "
           "generator's parameters, so no train_data holds them, and the generator's loss involves no training "
           "item. Exact alternatives: save the discriminator's (or the generator's) parameters after every step of "
           "its optimizer and explain them with explaind.Trajectory.from_checkpoints(saved, model.D) (replica, step "
           "and group axes exact along the straight segments; no split over samples); or, for a split over real and "
           "generated rows, train the discriminator against a frozen generator, its samples drawn before recording "
           "and stacked as rows of train_data, logged with their batch (rec.log_batch(torch.cat([idx, fake_idx]))).")


def outside_optimizer(params: dict[str, nn.Parameter], optimizer: Any) -> list[str]:
    """The recorded parameters that require grad and are in no param group of ``optimizer``."""
    held = {id(p) for g in getattr(optimizer, "param_groups", ()) for p in g["params"]}
    return [n for n, p in params.items() if p.requires_grad and id(p) not in held]


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def stepped_elsewhere_note(edited: list[tuple[str, float]], params: dict[str, nn.Parameter], optimizer: Any) -> str:
    """For an edit refusal whose changed parameters are all outside the recorded ``optimizer``: another optimizer
    stepped them, with the two ways out (``""`` when some changed parameter is the recorded optimizer's)."""
    names, outside = [n for n, _ in edited], outside_optimizer(params, optimizer)
    if not names or not set(names) <= set(outside):
        return ""
    return (f" Every changed parameter ({_names(names)}) is in no param group of the recorded optimizer, which "
            f"steps the others: another optimizer stepped them. Parts trained on one per-sample loss with "
            f"two optimizers are recorded as one optimizer with a param group per part. {GAN_FIX}")


def submodules_called_hint(s: int, ran_forward: bool, params: dict[str, nn.Parameter], optimizer: Any) -> str:
    """The failed check's first sentence when no training forward of the recorded model ran in step ``s`` (the loop
    called its submodules) and some trainable parameters are in no group of the recorded ``optimizer``."""
    outside = [] if ran_forward else outside_optimizer(params, optimizer)
    if not outside:
        return ""
    return (f" At step {s} no training forward of the recorded model ran (the loop called its submodules directly, "
            f"as a GAN's loop calls model.D and model.G), and its parameter(s) {_names(outside)} require grad but are "
            f"in no param group of the recorded optimizer: explaind recomputes the step's gradient through "
            f"model(x) on the logged rows of train_data. {GAN_FIX}")


def extra_forward_hint(inputs: list[Tensor], rows: Tensor) -> str:
    """The failed check's first sentence when the step's training forwards received the logged rows in one forward
    and other rows of the same shape in other forwards (a discriminator's second forward on generated samples)."""
    if len(inputs) < 2 or any(t.shape[1:] != rows.shape[1:] for t in inputs):
        return ""
    same = [t for t in inputs if t.shape == rows.shape and bool((t.detach().to(rows.dtype) == rows).all())]
    if not same:
        return ""
    extra = sum(t.shape[0] for t in inputs) - rows.shape[0] * len(same)
    if extra <= 0:
        return ""
    return (f" The model's training forwards of this step received the {rows.shape[0]} logged rows and, in another "
            f"forward, {extra} rows that are no rows of train_data at the logged indices: rows the loop makes (a "
            f"generator's samples for a discriminator, negatives drawn for a contrastive loss) are training samples "
            f"too. Fix: stack them in train_data (drawn before recording, one row per step and slot) and log their "
            f"indices with the batch's, rec.log_batch(torch.cat([idx, extra_idx])), exact when they do not depend on "
            f"the training (a frozen generator). Adversarial examples made in the loop from the model's input "
            f"gradient (FGSM's x + eps * sign(grad_x loss), PGD's iterations) move with the parameters as well, so no "
            f"train_data holds them: attack a fixed model before recording and train on those rows as train_data "
            f"(exact), or save the parameters after every step and explain them with "
            f"explaind.Trajectory.from_checkpoints (replica, step and group axes, no split over samples). {GAN_FIX}")
