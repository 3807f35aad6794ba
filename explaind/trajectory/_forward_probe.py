r"""The recorder's probe on the loop's training forwards, and the hint it feeds to a failed gradient check.

* :class:`AutocastProbe` (forward pre-hooks on the model and its children) notes whether the loop's
  forwards since the last step ran under ``torch.autocast`` and in which dtype, keeps (references to)
  the first positional input of each training forward, and syncs the
  :class:`~explaind.trajectory._gradients.GradientTap` so a parameter unfrozen mid-run is hooked;
  its :class:`~explaind.trajectory._output_rounding.OutputRounding` warns when a float64 model's
  training gradient reaches its output rounded to float32.
* :func:`loop_inputs_hint` compares those inputs with the rows of ``train_data`` at the logged
  indices, and :data:`LOOP_TERMS` names the terms a loop adds to the loss of the logged samples:
  both are sentences of the failed gradient check's error
  (docs/recording.md, "What the gradient check checks, and when").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._weight_writes import extra_forward_hint
from ._common import ModelHook
from ._gradients import GradientTap
from ._loop_hints import KeywordProbe
from ._output_cotangents import OutputCotangents
from ._output_rounding import OutputRounding

__all__ = ["AutocastProbe", "LOOP_TERMS", "loop_inputs_hint"]


#: At most this many training forwards' inputs, and this many bytes of them, are kept per step (references, no
#: copies, released at the step: a loop that accumulates large batches keeps them alive no longer than that).
_KEPT_INPUTS, _KEPT_BYTES = 64, 64 * 2 ** 20


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


#: The failed gradient check's sentence on terms the loop adds to or takes from the loss of the logged samples.
LOOP_TERMS = (
    "a penalty on the parameters added to the loss by hand is no loss of the samples: express an L2 penalty "
    "lam*||theta||^2 as coupled weight decay, SGD or Adam with weight_decay=2*lam; one anchored at pretrained weights "
    "theta_0 (L2-SP, lam*||theta - theta_0||^2) as that weight decay on offsets delta = theta - theta_0 that the "
    "model adds to theta_0 held as buffers, and EWC's Fisher-weighted one as an output column the forward returns and "
    "the loss callable adds (each exact); a penalty on activations (AWD-LSTM's activation regularisation, "
    "hidden.pow(2).mean() added in the loop) likewise: return the activations as output columns and let the loss "
    "callable add it, exact per sample; an L1 penalty or a penalty on input gradients taken with create_graph=True, "
    "as WGAN-GP's, has none: leave it out of the run you record; MAML's inner step or a policy gradient's actions "
    "taken in the loop: move them into forward (torch.func.grad; actions as output columns, capture_random=True); "
    "targets the loop computes from the model (FixMatch's pseudo-labels, a teacher's predictions) are no targets of "
    "train_data: return what they come from as output columns (the weak view's logits; a mean teacher as buffers the "
    "training forward moves) and compute them, detached, in the loss callable; rows the loop keeps by their losses "
    "(hard-example mining, small-loss selection, co-teaching) are the step's samples: log only them, "
    "rec.log_batch(idx[keep]), and give two networks that choose rows for each other a recorder each"
)


def loop_inputs_hint(inputs: list[Tensor], rows: Any) -> str:
    """The failed gradient check's first sentence when the step's training forwards received other inputs than
    ``rows``, the rows of ``train_data`` at the logged indices (a tensor); ``""`` when they match, or when the
    forwards cannot be lined up with the rows (a count of rows or a kind of dtype that differs: nothing is claimed).
    Integer inputs (token ids) are compared exactly: ids cut, padded or masked in the loop are other rows too."""
    if not inputs or not isinstance(rows, Tensor) or any(t.dtype.is_floating_point != rows.dtype.is_floating_point
                                                         or t.dtype == torch.bool for t in [*inputs, rows]):
        return ""
    fix = ("explaind recomputes every gradient from those rows, so inputs made anew for each batch (random "
           "augmentation in the loop or in a Dataset's __getitem__, with any num_workers; a collate_fn that pads each "
           "batch to its own length; a sequence-length curriculum that cuts each batch) or taken from another dataset "
           "(a curriculum stage) are other samples. Fix: pass as train_data exactly what the model trains on: "
           "augmentations drawn once before recording, every row padded to one length with forward masking the "
           "padding, each stage's dataset concatenated with its indices offset by the rows before it, a curriculum's "
           "length computed in forward from a step counter the training forward counts up in a buffer "
           "(capture_random=True). Noise drawn anew at every step (a diffusion model's timestep and noise, a masked "
           "autoencoder's mask, word2vec's negative samples) makes each step's rows samples of their own: stack every "
           "step's draws as rows of train_data and log the step's own rows, or draw them inside the model's training "
           "forward and record with capture_random=True.")
    if len(inputs) == 1 and inputs[0].shape[0] == rows.shape[0] and inputs[0].shape[1:] != rows.shape[1:]:
        return (f" The model's training forward of this step received inputs of shape {tuple(inputs[0].shape)}, where "
                f"train_data's rows at the logged indices have shape {tuple(rows.shape)}: {fix}")
    if len(inputs) == 1 and inputs[0].shape[0] > rows.shape[0] and inputs[0].shape[1:] == rows.shape[1:]:
        return (f" The model's training forward of this step received {inputs[0].shape[0]} rows where "
                f"{rows.shape[0]} were logged: rows the loop adds to the batch (a frozen generator's samples for a "
                f"discriminator, negatives drawn for a contrastive loss) are training samples too. Fix: stack them "
                f"in train_data (drawn before recording, one row per step and slot) and log their indices with the "
                f"batch's, rec.log_batch(torch.cat([idx, extra_idx])).")
    if sum(t.shape[0] for t in inputs) != rows.shape[0] or any(t.shape[1:] != rows.shape[1:] for t in inputs):
        return extra_forward_hint(inputs, rows)  # a discriminator's second forward on generated samples
    got = torch.cat([t.detach().to(rows.device, torch.float64) for t in inputs]).flatten(1)
    want = rows.detach().to(torch.float64).flatten(1)
    gap = (got - want).abs()
    bound = 1e-6 * max(1.0, float(want.abs().max())) if rows.dtype.is_floating_point else 0.0
    bad = int((gap.amax(1) > bound).sum()) if gap.numel() else 0
    if not bad:
        return ""
    return (f" The model's training forward(s) of this step received inputs that differ from train_data's rows at "
            f"the logged indices ({bad} of {rows.shape[0]} rows, largest difference {float(gap.max()):.3g}): {fix}")


class AutocastProbe:
    """Forward pre-hooks on the model and its children: the autocast dtype of the loop's forwards since the last step.

    The children's hooks see an autocast that the model's own ``forward`` enters (accelerate, and so
    the Hugging Face ``Trainer``, wraps ``model.forward`` in ``torch.autocast``).

    Parameters
    ----------
    model : nn.Module
        The recorded model.
    tap : GradientTap
        Synchronised on every forward, so a parameter unfrozen mid-run is snapshotted from its first backward.
    device_type : str
        ``"cpu"``, ``"cuda"``, ... of the parameters.
    notes : dict, optional
        The manifest's ``extras``, where :class:`OutputRounding` notes a float32 cast before the loss.
    """

    _RANK = {torch.float16: 2, torch.bfloat16: 3}

    def __init__(self, model: nn.Module, tap: GradientTap, device_type: str, notes: dict[str, Any] | None = None):
        self._model, self._tap, self._device = model, tap, device_type
        self.dtype: torch.dtype | None = None
        self.paused = False
        #: the first positional input of each training forward since the last step (for :func:`loop_inputs_hint`)
        self.inputs: list[Tensor] = []
        self._kept_bytes = 0
        self._handles: list[Any] = []
        self.rounding = OutputRounding(model, lambda: self.paused, notes)  # a float32 cast before a float64 loss
        self.keywords = KeywordProbe(model, lambda: self.paused)  # keyword arguments of the training forwards
        self.cotangents = OutputCotangents(model, lambda: self.paused)  # the loss's derivative at the outputs

    def attach(self) -> None:
        self.rounding.attach()
        self.keywords.attach()
        self.cotangents.attach()
        self._handles = [self._model.register_forward_pre_hook(ModelHook(self._hook))]
        self._handles += [child.register_forward_pre_hook(ModelHook(self._inner)) for child in self._model.children()]

    def detach(self) -> None:
        self.rounding.detach()
        self.keywords.detach()
        self.cotangents.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module: nn.Module, args: Any) -> None:
        if self.paused:
            return
        self._tap.sync()
        if module.training and torch.is_grad_enabled() and args and isinstance(args[0], Tensor) \
                and len(self.inputs) < _KEPT_INPUTS and self._kept_bytes + _bytes(args[0]) <= _KEPT_BYTES:
            self.inputs.append(args[0])
            self._kept_bytes += _bytes(args[0])
        self._inner(module, args)

    def _inner(self, module: nn.Module, args: Any) -> None:
        if not self.paused and torch.is_autocast_enabled(self._device):
            dt = torch.get_autocast_dtype(self._device)
            if self.dtype is None or self._RANK.get(dt, 1) > self._RANK.get(self.dtype, 1):
                self.dtype = dt

    def reset(self) -> None:
        """Forget the forward passes of the finished step."""
        self.dtype = None
        self.inputs, self._kept_bytes = [], 0
        self.keywords.reset()
        self.cotangents.reset()
