r"""Whether a step's ``backward()`` draws random numbers: the cause a failed gradient check names first.

The recorder captures the random state before every training forward and replays that forward
(docs/recording.md, "Dropout and batch norm"): the masks of the replay are the masks of the forward. A backward
pass that draws again is invisible to that capture. The common case is activation checkpointing
(``torch.utils.checkpoint.checkpoint``) with ``preserve_rng_state=False``, or a layer drawing from
its own ``torch.Generator`` inside a checkpointed block (``preserve_rng_state`` restores only
torch's global generators): the block's forward runs again inside ``backward()`` with *other*
masks, so the gradient the optimizer saw,

.. math::

    \tilde g_s = J_{\text{recomputed masks}}^\top \nabla_F \ell(F(X_B; \theta_s, \xi_s)),

mixes two mask draws and is the gradient of no single function of :math:`\theta`. No replay can
reproduce it and the gradient check fails. Only on that failure (never on the hot path) the
first replayed micro-batch is run forward and backward once more under its captured state, and
the generators are compared after the forward and after the backward: a difference names the
draw in ``backward()`` and the fix.

:func:`inductor_masks_hint` names the other draw no capture sees: ``torch.compile``'s default backend, inductor,
draws the dropout masks of a compiled forward from its own random-number generator, not from torch's. It names the
compiled callables (explaind/_compiled.py): those the recorder refuses up front, found again at the failed step (a
submodule compiled after recording began), and the user functions dynamo compiled (``torch.compile`` of a training
step that calls the model, of a loss drawing label noise with ``torch.rand``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._compiled import FALLBACK_FIX, compiled_callables, compiled_frames
from ..inputs import call_model
from ..outputs import model_output
from ..records import LossRecord
from ._random import RandomState, draws_masks, replayed

__all__ = ["backward_draw_hint", "draws_in_backward", "inductor_masks_hint"]


def _states(device: torch.device, generators: Sequence[torch.Generator]) -> list[Tensor]:
    """The CPU generator's state, the device's (CUDA) and every private generator's, in that order."""
    out = [torch.get_rng_state()]
    if device.type == "cuda":
        out.append(torch.cuda.get_rng_state(device))
    return out + [g.get_state() for g in generators]


def draws_in_backward(model: nn.Module, state: dict[str, Tensor], loss: LossRecord,
                      batch: tuple[Any, Tensor, Tensor], part: tuple[slice, RandomState],
                      generators: Sequence[torch.Generator] = ()) -> bool:
    r"""Whether ``backward()`` of the micro-batch ``part`` moves a random generator its forward drew from.

    Parameters
    ----------
    model : nn.Module
        Template for ``functional_call`` (training mode, as the loop ran it).
    state : dict of str to Tensor
        Parameters and buffers :math:`\theta_s, \beta_s` of the step; floating parameters are
        differentiated.
    loss : LossRecord
        Per-sample training loss :math:`\ell_k`.
    batch : (inputs, Tensor, Tensor)
        Inputs ``(n, ...)``, targets ``(n, ...)`` and weights ``(n,)`` of the step's logged samples.
    part : (slice, RandomState)
        The micro-batch's positions in ``batch`` and the random state captured before its forward.
    generators : sequence of torch.Generator
        The model's private generators, in the order of ``RandomState.private``.

    Returns
    -------
    bool
        ``True`` when the CPU generator, the device's generator or a private one differs after
        ``backward()`` from its state right after the forward. The caller's generators are left as
        they were.
    """
    sl, random = part
    inputs, targets, weights = batch
    leaves = {n: (t.detach().requires_grad_(True) if t.is_floating_point() else t) for n, t in state.items()}
    wanted = [t for t in leaves.values() if t.requires_grad]
    with torch.enable_grad(), replayed(random, inputs.device, "The backward-draw diagnosis", generators):
        out = model_output(call_model(model, leaves, inputs[sl], plain_checkpoints=False))  # the real recompute
        total = (weights[sl].to(out.dtype) * loss.implementation(out, targets[sl])).sum()
        after_forward = _states(inputs.device, generators)
        torch.autograd.grad(total, wanted, allow_unused=True)
        after_backward = _states(inputs.device, generators)
    return any(not torch.equal(a, b) for a, b in zip(after_forward, after_backward))


def backward_draw_hint(step: int) -> str:
    """The sentence naming a random draw inside ``backward()`` of step ``step`` and the fix."""
    return (f" Step {step}'s backward() draws random numbers that its forward's captured state does not cover "
            f"(replayed, the generators move between the end of the forward and the end of backward()): activation "
            f"checkpointing recomputes the checkpointed block inside backward(), and with "
            f"torch.utils.checkpoint.checkpoint(..., preserve_rng_state=False), or a layer drawing from its own "
            f"torch.Generator inside the block (preserve_rng_state restores only torch's global generators), the "
            f"recomputation draws other dropout masks than the forward did, so the gradient is that of no single "
            f"function and no replay reproduces it. Fix: keep preserve_rng_state=True (the default) and draw inside "
            f"checkpointed blocks from torch's global generator, or switch checkpointing off while recording (it "
            f"does not change the model's function).")


def inductor_masks_hint(model: nn.Module) -> str:
    """The sentence naming inductor's own random draws when ``torch.compile`` compiled something in this process,
    inductor's ``fallback_random`` is off and ``model`` draws masks or compiled code was found; ``""`` otherwise
    (cheap: module lookups first).
    """
    dynamo, config = sys.modules.get("torch._dynamo"), sys.modules.get("torch._inductor.config")
    if dynamo is None or config is None or getattr(config, "fallback_random", True):
        return ""
    if not dynamo.utils.counters["stats"].get("unique_graphs"):
        return ""
    found = [*compiled_callables(model), *(f"{f}, compiled by torch.compile" for f in compiled_frames())]
    if not found and not any(draws_masks(m) for m in model.modules()):
        return ""
    named = f" (compiled: {'; '.join(found[:6])})" if found else ""
    return (f" torch.compile ran in this process{named}: its default backend, inductor, draws the dropout masks "
            f"and other random numbers (torch.rand) of compiled code from its own random-number generator, not "
            f"from torch's generator whose state the recorder captures, so no replay draws them again. Fix: "
            f"{FALLBACK_FIX}.")
