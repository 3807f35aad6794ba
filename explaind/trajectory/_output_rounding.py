"""Warn when a float64 model's training gradient arrives at its output rounded to float32.

A float64 run is decomposed at float64 rounding only if the loss the loop differentiates is computed in float64 from
the model's outputs. Something between the output and the loss that casts to float32 (Lightning Fabric's
``precision="64-true"`` casts the outputs of its wrapped module back to torch's default dtype; ``logits.float()``,
as transformers' ``ForCausalLMLoss``, ``ForMaskedLMLoss`` and ``ForTokenClassification`` do (the own loss of GPT-2
and many other models); a loss written in float32) makes every gradient that reaches the output a float32 number:
the step's gradient carries float32 rounding (about 1e-8 relative), which the gradient check allows within its
float64 tolerance and which no per-sample float64 loss reproduces: it lands in the residual (a share near 1e-8, far
below the estimators' warning threshold), without a word. :class:`OutputRounding` hooks the gradient of the model's
float64 outputs in the loop's training backward and warns (``ExplaindWarning``) the first time every entry of it is
a float32 number; it also writes the finding into the manifest's ``extras`` (key :data:`EXTRAS_KEY`), so that the
estimators' residual-share warning on the stored run names it as a cause (explaind/estimators/residual.py).
A float64 loss gives gradients with random low mantissa bits; gradients with fewer than three distinct nonzero
magnitudes (``out.sum()``, an L1 or hinge loss: ``±1/n``), or whose magnitudes all use fewer than 16 significant bits
(a linear loss with dyadic sample weights), say nothing and are skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ExplaindWarning
from ._common import ModelHook

__all__ = ["EXTRAS_KEY", "MAX_CHECKED", "OutputRounding", "float32_rounded", "leading_part"]

#: The fewest distinct nonzero magnitudes of a gradient whose float32 rounding is taken as a sign of a cast.
MIN_DISTINCT = 3
#: The fewest significant bits (of float32's 24) that some entry must use: simple values (``w_k / n`` with
#: dyadic weights) are float32 numbers without any cast.
MIN_BITS = 16
#: About how many entries of each output gradient are checked (whole leading rows): a language model's logits'
#: gradient holds batch x length x vocabulary entries, and the check runs at every training backward until it warns.
MAX_CHECKED = 1 << 16
#: The key of ``manifest.extras`` under which a run whose output gradients were rounded to float32 says so.
EXTRAS_KEY = "output_rounding"


def leading_part(grad: Tensor) -> Tensor:
    """The leading rows of ``grad`` (a view) holding about :data:`MAX_CHECKED` entries, at least one row."""
    if grad.dim() == 0 or grad.numel() <= MAX_CHECKED:
        return grad
    return grad[: max(1, MAX_CHECKED * grad.shape[0] // grad.numel())]


def float32_rounded(grad: Tensor | None) -> bool:
    """Whether every entry of the float64 ``grad`` is a float32 number, at least :data:`MIN_DISTINCT` distinct
    nonzero magnitudes occur and one of them uses at least :data:`MIN_BITS` significant bits (so that the rounding
    is not that of a few simple values such as ``1/n`` or dyadic weights); ``None`` (a gradient ``torch.compile``
    does not hand over): no."""
    if not isinstance(grad, Tensor) or grad.dtype != torch.float64 or grad.numel() < MIN_DISTINCT:
        return False
    if not bool((grad.float().double() == grad).all()):  # the usual case of a float64 loss: out at once
        return False
    nonzero = torch.unique(grad[grad != 0].abs())
    if nonzero.numel() < MIN_DISTINCT:
        return False
    mantissa = (torch.frexp(nonzero).mantissa * 2.0 ** 24).to(torch.int64)  # exact: float32 numbers, 24 bits
    lowest = mantissa & -mantissa  # the lowest set bit: 24 - log2(lowest) significant bits
    return bool((24 - torch.log2(lowest.double())).max() >= MIN_BITS)


def _float64_leaves(out: Any) -> Iterator[Tensor]:
    """The float64 tensors requiring grad in a model output (a tensor, a tuple or list, a mapping, a ModelOutput)."""
    if isinstance(out, Tensor):
        if out.dtype == torch.float64 and out.requires_grad:
            yield out
    elif isinstance(out, dict):
        for value in out.values():
            yield from _float64_leaves(value)
    elif isinstance(out, (tuple, list)):
        for value in out:
            yield from _float64_leaves(value)


class OutputRounding:
    """A forward hook on a float64 model that checks the gradients reaching its outputs in the loop's backward.

    Parameters
    ----------
    model : nn.Module
        The recorded model; nothing is hooked unless its first parameter is float64.
    paused : callable
        ``paused()`` is true while the recorder runs the model itself (its gradient check): those forwards are
        not the loop's.
    notes : dict, optional
        The manifest's ``extras``: the warning's finding is stored there under :data:`EXTRAS_KEY`.
    """

    def __init__(self, model: nn.Module, paused: Any, notes: dict[str, Any] | None = None):
        first = next(model.parameters(), None)
        self._model = model
        self._on = first is not None and first.dtype == torch.float64
        self._paused = paused
        self._notes = notes
        self._handle: Any = None
        self.warned = False

    def attach(self) -> None:
        if self._on:
            self._handle = self._model.register_forward_hook(ModelHook(self._forward))

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _forward(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.warned or self._paused() or not torch.is_grad_enabled():
            return
        for tensor in _float64_leaves(out):
            if not torch._C._functorch.is_functorch_wrapped_tensor(tensor):
                tensor.register_hook(self._gradient)

    def _gradient(self, grad: Tensor | None) -> None:  # None under torch.compile's backward
        checked = leading_part(grad) if isinstance(grad, Tensor) else grad
        if self.warned or not float32_rounded(checked):
            return
        self.warned = True
        if self._notes is not None:
            self._notes[EXTRAS_KEY] = (f"the training gradient reaching the output of the float64 model "
                                       f"{type(self._model).__name__} was rounded to float32 (a cast before the loss)")
        warnings.warn(
            f"The training gradient reaching the output of the float64 model {type(self._model).__name__} is rounded "
            f"to float32 (all {checked.numel()} entries checked are float32 numbers): the loop casts the outputs to "
            f"float32 before the loss (Lightning Fabric(precision='64-true') casts its module's outputs back to "
            f"torch's default dtype, float32; the model's own loss through transformers' ForCausalLMLoss, "
            f"ForMaskedLMLoss or ForTokenClassification, which call logits.float(); a loss computed in float32). The "
            f"run's gradients then carry float32 rounding (about 1e-8 relative) that no float64 per-sample loss "
            f"reproduces: the gradient check passes within its float64 tolerance, and the residual holds the rounding "
            f"(a residual share near 1e-8), which the per-sample scores miss. Fix: compute the loss in float64 (with "
            f"Fabric: torch.set_default_dtype(torch.float64) before training, or Fabric(precision='32-true') with the "
            f"model built in float64, model.double(); with the Hugging Face Trainer: "
            f"compute_loss_func=callback.compute_loss; docs/guide_own_model.md, 'Fabric and Accelerate').",
            ExplaindWarning, stacklevel=2)
