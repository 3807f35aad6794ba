r"""Recording a Lightning run with :class:`ExplaindLightningCallback`.

The callback holds a :class:`~explaind.TrajectoryRecorder` on the LightningModule (or one of its
submodules) and its optimizer for the whole of ``trainer.fit``. The training dataloader serves an
:class:`~explaind.integrations.IndexedDataset`; ``on_train_batch_start`` takes the positions out
of the batch (so ``training_step`` never sees them) and ``on_after_backward`` logs the micro-batch.

Manual optimization (``automatic_optimization=False``) goes through the same hooks: ``self.manual_backward(loss)``
runs ``on_after_backward`` (the micro-batch is logged with its mean's weights :math:`n_k / \sum_{j \in m} n_j`),
and ``opt.step()`` of the ``LightningOptimizer`` steps the torch optimizer the recorder hooks. A loss the
``training_step`` divides by :math:`k` before ``manual_backward`` (accumulation over :math:`k` batches) is a global
factor of the step that the recorder's gradient check measures (:math:`c_s`); ``self.clip_gradients`` by norm is
measured likewise. ``ModelPruning`` (masks between steps) is refused.

Lightning divides the loss of every micro-batch by ``accumulate_grad_batches`` = :math:`K`, and the
loss of a batch is the mean over its counted terms, so micro-batch :math:`m` is logged with
:math:`w_k = n_k / (K \sum_{j \in m} n_j)` (docs/maths.md §1). Lightning runs the last micro-batch of
a step inside ``optimizer.step(closure)``; the recorder takes the step's gradient once the closure
has run, after Lightning's gradient clipping, so ``gradient_clip_val`` is measured as a scale
:math:`c_s`. With a float16 ``MixedPrecision`` plugin Lightning scales the loss with the plugin's
``GradScaler``; the callback hands ``trainer.precision_plugin.scaler`` to the recorder, which records
each step's loss scale :math:`S_s` as ``amp_scale`` (``"bf16-mixed"`` needs no scaler; ``"bf16-true"`` and
``"16-true"``, half-precision parameters, are refused). The first forward of the recorded module in each
micro-batch is compared with the recorded rows (:meth:`RecordingCore._check_batch`: random augmentation is
refused, as are the batches of several training dataloaders), and the recorder is closed at ``on_fit_end``,
after every callback's ``on_train_end`` (so the averaged weights ``StochasticWeightAveraging`` or
``EMAWeightAveraging`` write there are warned about).
docs/guide_own_model.md has the walk-through.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from ..exceptions import ConfigError, TrajectoryError

try:
    import lightning.pytorch as pl
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ConfigError(f"explaind.integrations.ExplaindLightningCallback needs lightning ({exc}); install it with "
                      f"pip install 'explaind[lightning]'.") from exc
from ..trajectory._common import ModelHook, note_full_graph
from ._core import RecordingCore
from .data import MaskForm, step_weights

__all__ = ["ExplaindLightningCallback"]

logger = logging.getLogger(__name__)


class ExplaindLightningCallback(pl.Callback, RecordingCore):
    """Record a Lightning ``Trainer.fit`` run through :class:`~explaind.TrajectoryRecorder`.

    Parameters
    ----------
    train_data : IndexedDataset or (X, y)
        The training set the dataloader serves (an :class:`IndexedDataset`, whose
        :meth:`~IndexedDataset.train_data` gives the recorder's ``(X, y)``), or explicit ``(X, y)``.
    loss : str, LossRecord or callable
        The per-sample loss, e.g. ``"cross_entropy"`` or ``"causal_lm"``.
    module : str, optional
        Attribute of the LightningModule to record (e.g. ``"model"`` for a wrapped Hugging Face model);
        default the LightningModule itself, whose ``forward`` must take the inputs ``X``.
    attention_mask : {"keep", "bidirectional", "causal", "key_padding"}
        With an :class:`IndexedDataset`: store a 2-D ``attention_mask`` as the equivalent 4-D mask.
    **recorder_kwargs
        Passed to :class:`~explaind.TrajectoryRecorder` (``store=``, ``check_gradients=``, ...); not
        ``grad_scaler``, which the callback takes from the precision plugin.
    """

    framework = "lightning.Trainer(callbacks=[...])"
    framework_scaler = "the precision plugin's GradScaler (trainer.precision_plugin.scaler)"
    framework_resume = "trainer.fit(..., ckpt_path=...)"
    framework_checkpoint = " (a ModelCheckpoint saving at that global step, e.g. every_n_train_steps dividing it)"
    framework_optimizer = "configure_optimizers"
    framework_optimizer_fix = "Fix: return torch.optim.SGD, Adam or AdamW from configure_optimizers."
    framework_batch_edit = (" (in Lightning also a batch hook of the LightningModule or DataModule that edits the "
                            "batch: on_before_batch_transfer, transfer_batch_to_device, on_after_batch_transfer; give "
                            "the callback train_data as that hook leaves it)")

    def __init__(self, train_data: Any, *, loss: Any, module: str | None = None,
                 attention_mask: MaskForm = "keep", **recorder_kwargs: Any):
        self._setup(train_data, loss, attention_mask, recorder_kwargs)
        self._module = module
        self._current: Tensor | None = None
        self._logged: Tensor | None = None  # the batch logged last, logged again by a backward after its step
        self._relogged = False  # whether this batch was logged again (dropped at its end unless a step used it)
        self._unchecked = False  # the current micro-batch's first forward of the recorded module is still to come

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            manual = ("" if pl_module.automatic_optimization else
                      " With manual optimization (a GAN's generator and discriminator steps) each optimizer steps on "
                      "a loss of its own, which is no per-sample loss of the recorded model on its training items "
                      "(a generator's loss has no training sample; a discriminator's couples real items with "
                      "generated ones), so the steps cannot be split over the training samples.")
            raise ConfigError(f"ExplaindLightningCallback records runs with one optimizer; configure_optimizers "
                              f"returned {len(trainer.optimizers)}. explaind decomposes the updates of one optimizer "
                              f"(another one stepping the model's parameters is an edit it cannot split over "
                              f"samples).{manual} Fix: return one optimizer with a parameter group per part of the "
                              f"model (per-group learning rates and weight decay are recorded), e.g. "
                              f"torch.optim.SGD([{{'params': a.parameters(), 'lr': 0.1}}, "
                              f"{{'params': b.parameters()}}], lr=0.01); or record one part on its own loss in a "
                              f"plain loop (docs/guide_own_model.md, 'Manual optimization').")
        model = pl_module if self._module is None else getattr(pl_module, self._module, None)
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"module={self._module!r}: the LightningModule has no submodule of that name; pass the "
                              f"attribute name of the model to record (e.g. module='model') or None.")
        if self._module is not None:
            _refuse_parameters_outside(pl_module, model, self._module, trainer.optimizers[0])
        algorithm = getattr(trainer, "gradient_clip_algorithm", None)
        if trainer.gradient_clip_val and str(getattr(algorithm, "value", algorithm)) == "value":
            raise ConfigError(
                f"pl.Trainer(gradient_clip_val={trainer.gradient_clip_val}, gradient_clip_algorithm='value') clips "
                f"every gradient entry on its own, which changes the step's direction by a different factor per "
                f"coordinate: the step is then no weighted sum of the samples' gradients and cannot be decomposed. "
                f"Allowed: gradient_clip_algorithm='norm' (one factor per step, recorded exactly as c_s). Fix: "
                f"pl.Trainer(gradient_clip_val=..., gradient_clip_algorithm='norm'), or no clipping."
            )
        if any(type(c).__name__ == "ModelPruning" for c in trainer.callbacks):
            raise ConfigError(
                "ModelPruning masks the parameters between steps (torch.nn.utils.prune renames each pruned weight to "
                "'<name>_orig' and multiplies it by a mask in a forward pre-hook), so the model's function changes "
                "outside optimizer.step() and the steps after a pruning are no steps of the recorded parameters; the "
                "masks are made permanent when training ends. Fix: remove ModelPruning from the Trainer's callbacks "
                "and prune the model after training (explain the recorded run, then prune), or train without it.")
        precision = str(getattr(trainer, "precision", ""))
        if precision in ("bf16-true", "16-true"):
            raise ConfigError(
                f"pl.Trainer(precision={precision!r}) holds the parameters themselves in "
                f"{'bfloat16' if precision.startswith('bf') else 'float16'}: every update is rounded to 8 or 11 "
                f"significant bits, which no decomposition of the steps over samples reproduces (and the callback's "
                f"train_data stays in its own dtype). Allowed: '64-true', '32-true', 'bf16-mixed', '16-mixed' "
                f"(autocast with float32 weights, recorded with the autocast tolerance). Fix: "
                f"pl.Trainer(precision='bf16-mixed'), or '64-true' for float64 exactness."
            )
        self._check_keywords(model)
        self._start(model, trainer.optimizers[0], getattr(trainer.precision_plugin, "scaler", None),
                    step=int(trainer.global_step))
        averaging = [type(c).__name__ for c in trainer.callbacks if any(
            k.__name__ in ("StochasticWeightAveraging", "WeightAveraging") for k in type(c).__mro__)]
        if averaging:  # EMAWeightAveraging and other WeightAveraging callbacks too
            self.recorder.final_hint = (
                f" Here {averaging[0]} wrote the average of the weights it kept (over epochs or steps) into the model "
                f"when training ended; that average is no point of the recorded trajectory: remove the callback to "
                f"explain the model training ends with, or explain traj.params(traj.n_steps).")
        if not pl_module.automatic_optimization:
            self.recorder.framework_hint = (
                " Under Lightning manual optimization the callback logs each batch at self.manual_backward(...) "
                "with the weights of its mean over the callback's loss=, and the check measures one factor per "
                "step (a loss / k): a backward of another loss, or several manual_backward calls with different "
                "terms on one batch, is not that. Fix: give the callback the per-sample loss training_step "
                "backpropagates, with one manual_backward per batch.")
        self._hook = model.register_forward_pre_hook(ModelHook(self._take_inputs), with_kwargs=True)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.recorder is None:
            return
        if not (isinstance(batch, MutableMapping) and self.index_key in batch):
            _refuse_combined_batches(batch, batch_idx, self.index_key)
            raise TrajectoryError(
                f"Training batch {batch_idx} has no {self.index_key!r}: the training dataloader must serve an "
                f"explaind.integrations.IndexedDataset, collated to a mapping (torch's default collate does)."
            )
        self._current = torch.as_tensor(batch.pop(self.index_key)).detach().to("cpu", torch.long).reshape(-1)
        self._logged, self._relogged = None, False
        self._unchecked = True

    def _take_inputs(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: compare the first training forward of each micro-batch with the recorded rows."""
        if not (self._unchecked and self._current is not None and module.training and torch.is_grad_enabled()):
            return
        self._unchecked = False
        if len(args) == 1 and not kwargs:
            self._check_batch(self._current, args[0])
        elif not args and kwargs:
            self._check_batch(self._current, kwargs)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        """Log the batch at its backward; under manual optimization a backward after an optimizer step on the same
        batch (several steps per batch, one per parameter subset as in a GAN-shaped loop) logs it again."""
        if self.recorder is None:
            return
        if self._current is None and not pl_module.automatic_optimization and not getattr(
                self.recorder, "_pending", None):
            self._current, self._relogged = self._logged, self._logged is not None
        if self._current is None:
            return
        (w,) = step_weights(self._loss, self._data, [self._current], "micro_batch", self._dtype)
        self.recorder.log_batch(self._current, w / trainer.accumulate_grad_batches)
        self._logged, self._current = self._current, None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Drop a batch logged again (a backward after an optimizer step on it) that no step used before the batch
        ended: a backward for logging (a gradient norm) whose gradients ``training_step`` zeroed, as the run did."""
        pending = getattr(self.recorder, "_pending", None)
        if self._relogged and pending:
            logger.info("Training batch %d: a backward after its optimizer step was not followed by another step; "
                        "its gradients are not recorded as a step.", batch_idx)
            pending.clear()
        self._relogged = False

    def on_before_zero_grad(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Drop the micro-batches logged since the last optimizer step: Lightning zeroes their gradients without
        stepping on them (``on_train_batch_start`` returned -1 inside an accumulation, so the epoch ended before its
        step; the next epoch's first batch zeroes what was accumulated). Before, they were recorded as part of the
        next step (residual share 0.36, or a gradient-check error that named no Lightning hook)."""
        pending = getattr(self.recorder, "_pending", None)
        if pending and pending[-1].finite is not False:  # a step GradScaler skipped: the recorder drops it itself
            logger.warning("Lightning zeroed the gradients of %d logged micro-batch(es) before any optimizer step "
                           "used them (an epoch cut short inside an accumulation, e.g. on_train_batch_start "
                           "returning -1); they are dropped from the recording, as from the run.", len(pending))
            pending.clear()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Close the recorder once every callback's ``on_train_end`` has run (``StochasticWeightAveraging``
        writes its averaged weights there), so the recorder's final check sees the model the user gets."""
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        note_full_graph(exception)
        self.close()

    def close(self) -> None:
        """Close the recorder, then remove the model hook (``on_fit_end`` does it)."""
        self._stop()


def _refuse_parameters_outside(pl_module: Any, model: torch.nn.Module, module: str, optimizer: Any) -> None:
    """Refuse an optimizer that steps parameters of the LightningModule outside the recorded submodule ``module``.

    ``training_step`` then trains a function of more parameters than the recorded model's (a temperature or a loss
    weight of the LightningModule, say), which no decomposition over the recorded model reproduces. Before, the
    recorder's refusal named a parameter position and a plain loop's fix (build the optimizer from the model's
    parameters), not the LightningModule's attribute nor ``module=``.
    """
    inside = {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in pl_module.named_parameters()}
    outside = [names.get(id(p), f"a tensor of shape {tuple(p.shape)}") for group in optimizer.param_groups
               for p in group["params"] if id(p) not in inside]
    if outside:
        raise ConfigError(
            f"ExplaindLightningCallback(module={module!r}) records the LightningModule's attribute {module!r}, but "
            f"configure_optimizers also steps its parameter(s) {outside}, outside it: training_step trains a function "
            f"of those too, so the recorded model is not what is trained. Fix: make them part of the recorded model "
            f"(parameters of self.{module}, used in its forward), or record the LightningModule itself (module=None, "
            f"its forward computing what training_step passes to the loss); parameters not meant to train stay out "
            f"of configure_optimizers.")


def _refuse_combined_batches(batch: Any, batch_idx: int, index_key: str) -> None:
    """Refuse a training batch that holds the batches of several dataloaders, each with its positions.

    ``trainer.fit(module, {"a": loader_a, "b": loader_b})`` (or a list of loaders, or a ``CombinedLoader``) gives
    ``training_step`` one batch per loader. Before, this was refused with a message about the collation of one
    ``IndexedDataset``, which named neither the cause nor the fix.
    """
    parts: Any = ()
    if isinstance(batch, Mapping):
        parts = batch.items()
    elif isinstance(batch, (list, tuple)):
        parts = enumerate(batch)
    names = [key for key, part in parts if isinstance(part, Mapping) and index_key in part]
    if names:
        raise ConfigError(
            f"Training batch {batch_idx} holds the batches of several training dataloaders ({names}: a dict or list "
            f"of loaders given to trainer.fit, or a CombinedLoader), each with its own {index_key!r}. The callback "
            f"records one training set, trained through one batch per step: the positions of different loaders "
            f"index different datasets (or count the same samples twice), and training_step combines the loaders' "
            f"losses in a way the callback does not know. Fix: serve all items through one IndexedDataset (e.g. "
            f"IndexedDataset(torch.utils.data.ConcatDataset([...]))) and one DataLoader, and give the callback "
            f"that dataset."
        )
