r"""What a refusal says when a second optimizer trains part of the run: a GAN's alternating steps.

A GAN's loop steps two optimizers, each on a loss of its own: the discriminator's (its optimizer ``opt_D``) on the
real batch and on the generator's samples ``G(z).detach()``, the generator's (``opt_G``) on ``D(G(z))``. One
recorder observes one optimizer, and neither loss is a per-sample loss of fixed training items: the
discriminator's fake rows move with the generator's parameters at every step (no ``train_data`` holds them), and
the generator's loss involves no training item at all (docs/maths.md §1). What explaind needs for an exact
account of either network's output, and does not have, is a per-step set of inputs made by the loop (the fakes of
the step, their noise replayed) and the other network's parameters as per-step constants of the trajectory.

What is exact today (each measured in tests/test_stranger_round15_more.py):

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

from typing import Any

from torch import Tensor, nn

__all__ = ["GAN_FIX", "extra_forward_hint", "outside_optimizer", "stepped_elsewhere_note", "submodules_called_hint"]

#: The exact alternatives for a run of two alternating optimizers (module docstring).
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


def stepped_elsewhere_note(edited: list[tuple[str, float]], outside: list[str]) -> str:
    """For an edit refusal whose changed parameters are all outside the recorded optimizer: another optimizer
    stepped them, with the two ways out (``""`` when some changed parameter is the recorded optimizer's)."""
    names = [n for n, _ in edited]
    if not names or not set(names) <= set(outside):
        return ""
    return (f" Every changed parameter ({_names(names)}) is in no param group of the recorded optimizer, which "
            f"steps the others: another optimizer stepped them. Parts trained on one per-sample loss with "
            f"two optimizers are recorded as one optimizer with a param group per part. {GAN_FIX}")


def submodules_called_hint(s: int, ran_forward: bool, outside: list[str]) -> str:
    """The failed check's first sentence when no training forward of the recorded model ran in step ``s`` (the loop
    called its submodules) and some trainable parameters are in no group of the recorded optimizer."""
    if ran_forward or not outside:
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
            f"the training (a frozen generator). {GAN_FIX}")
