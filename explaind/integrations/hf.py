r"""Recording a Hugging Face ``transformers.Trainer`` run with :class:`ExplaindTrainerCallback`.

The callback holds a :class:`~explaind.TrajectoryRecorder` on the Trainer's model and (unwrapped)
optimizer for the whole of ``trainer.train()``. The training set is an
:class:`~explaind.integrations.IndexedDataset`: the callback wraps the training dataloader's
collator in :class:`~explaind.integrations.data.IndexCollate`, so each batch carries the positions
of its samples, and a forward pre-hook on the model takes them out before the model sees them.
Each micro-batch is logged right after its backward (``on_substep_end``, and ``on_pre_optimizer_step``
for the last one of a step; gradient clipping is measured by the recorder as :math:`c_s`), with
weights :math:`w_{s,k}`:

* when the Trainer normalises the loss by ``num_items_in_batch`` (the model accepts loss keyword
  arguments, or ``compute_loss_func`` is set), :math:`w_k = n_k / N` with :math:`N` the value the Trainer
  passed (it counts the labels itself, not always as the loss does);
* otherwise the micro-batch's mean divided by the micro-batches :math:`M_s` of its step, as the
  Trainer divides it: ``gradient_accumulation_steps``, and fewer at the last step of an epoch whose
  batches are not a multiple of it (``_step_micro_batches`` follows the Trainer's epoch loop; a step
  with another count is refused).

The recorder measures clipping and the learning-rate schedule itself; autocast (``bf16=True``, and
``fp16=True`` where accelerate supports it) is recorded with the gradient check's autocast tolerance.
Under ``fp16=True`` accelerate scales the loss with its ``GradScaler`` (``accelerator.scaler``, also
held by the prepared optimizer as ``optimizer.scaler``); the callback hands that scaler to the
recorder, which records each step's loss scale :math:`S_s` as ``amp_scale`` and the unscaled
gradient's factor as :math:`c_s` (1 without clipping). On the CPU accelerate runs ``fp16=True``
without autocast and without a scaler, in float32. The model's inputs of every training forward are compared
with the recorded rows on a spread of micro-batches (:meth:`RecordingCore._check_batch`: a collator that masks at
random is refused), and with ``remove_unused_columns=True`` the recorded inputs leave out the entries the
Trainer removes. docs/guide_own_model.md has the walk-through.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ..exceptions import ConfigError, TrajectoryError, warn_at_caller

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ConfigError(f"explaind.integrations.ExplaindTrainerCallback needs transformers ({exc}); install it with "
                      f"pip install 'explaind[hf]'.") from exc
from ..outputs import model_output
from ..trajectory._common import ModelHook, TrainData
from ..trajectory._random import draws_masks
from ._core import RecordingCore
from .data import IndexCollate, MaskForm, step_weights

__all__ = ["ExplaindTrainerCallback"]

logger = logging.getLogger(__name__)


class ExplaindTrainerCallback(TrainerCallback, RecordingCore):
    r"""Record a ``transformers.Trainer`` run through :class:`~explaind.TrajectoryRecorder`.

    Parameters
    ----------
    train_data : IndexedDataset or (X, y)
        The training set, the same object given to the Trainer as ``train_dataset`` (an
        :class:`IndexedDataset`; its :meth:`~IndexedDataset.train_data` gives the recorder's ``(X, y)``)
        or explicit ``(X, y)`` whose rows are the dataset's items.
    loss : str, LossRecord or callable
        The per-sample loss of the recorder, e.g. ``"causal_lm"`` or ``"cross_entropy"``.
    normalization : {"auto", "step", "micro_batch"}
        How the Trainer normalises the loss of a step (module docstring). ``"auto"``: ``"step"`` when
        the model's forward or :meth:`compute_loss` received ``num_items_in_batch``, else ``"micro_batch"``.
    attention_mask : {"keep", "bidirectional", "causal", "key_padding"}
        With an :class:`IndexedDataset`: store a 2-D ``attention_mask`` as the equivalent 4-D mask
        (needed for Hugging Face models whose 2-D mask handling cannot run under ``torch.func.vmap``).
    **recorder_kwargs
        Passed to :class:`~explaind.TrajectoryRecorder` (``store=``, ``check_gradients=``, ...); not
        ``grad_scaler``, which the callback takes from accelerate.

    Attributes
    ----------
    recorder : TrajectoryRecorder or None
        Created at ``on_train_begin``.
    """

    framework = "transformers.Trainer(callbacks=[...])"
    framework_scaler = "accelerate's GradScaler (TrainingArguments(fp16=True))"
    framework_resume = "trainer.train(resume_from_checkpoint=...)"
    framework_replace_callback = " (trainer.remove_callback(old); trainer.add_callback(new))"
    framework_checkpoint = " (the Trainer saves it as <output_dir>/checkpoint-<step> when save_steps divides the step)"
    framework_optimizer_fix = ("Fix: TrainingArguments(optim='adamw_torch'), 'adamw_torch_fused', 'sgd', 'rmsprop', "
                               "'adagrad' or 'adafactor', or pass an optimizer with an adapter as Trainer(optimizers="
                               "(optimizer, None)).")

    def __init__(self, train_data: Any, *, loss: Any,
                 normalization: Literal["auto", "step", "micro_batch"] = "auto",
                 attention_mask: MaskForm = "keep", **recorder_kwargs: Any):
        if normalization not in ("auto", "step", "micro_batch"):
            raise ConfigError(f"normalization={normalization!r} is not allowed. Choose one of: 'auto', 'step', "
                              f"'micro_batch'.")
        self._setup(train_data, loss, attention_mask, recorder_kwargs)
        self._normalization = normalization
        self._pending: list[tuple[Tensor, float | None]] = []  # positions, the Trainer's num_items_in_batch
        self._collate: tuple[Any, Any] | None = None
        self._logged = 0  # micro-batches logged in the current step
        self._label_smoothing = 0.0  # TrainingArguments.label_smoothing_factor, read when training starts
        self._loss_kwargs = False  # the model's forward takes loss keyword arguments (num_items_in_batch)
        self._epoch_batches: int | None = None  # micro-batches per epoch (len of the training dataloader)
        self._epoch_start = 0  # a global step at which an epoch of the Trainer's loop starts
        self._divided = False  # a micro-batch of the current step was weighted as divided by the accumulation
        self._decoder_from_labels = False  # decoder_input_ids were added to the recorded inputs from the labels

    def compute_loss(self, outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
        r"""A ``compute_loss_func`` for the Trainer: the recorder's loss, in the model's dtype.

        :math:`\sum_k n_k \ell_k / N` with :math:`N` = ``num_items_in_batch`` (or the batch's own
        :math:`\sum_k n_k`), exactly the decomposition the recorder logs. Hugging Face's own causal-LM loss
        computes in float32 even for a float64 model; this one keeps float64 runs exact.

        Raises
        ------
        ConfigError
            With ``TrainingArguments(label_smoothing_factor > 0)``: the Trainer applies its label smoother
            only without ``compute_loss_func``, so the run would silently train without label smoothing.
        """
        if self._label_smoothing:
            self.close()  # the model and dataloader are left as they were before training
            raise ConfigError(
                f"TrainingArguments(label_smoothing_factor={self._label_smoothing}) has no effect when the Trainer "
                f"is given compute_loss_func=callback.compute_loss: the Trainer smooths labels only in its own "
                f"loss, so this run would train without label smoothing. Fix: set label_smoothing_factor=0 and give "
                f"the callback the smoothed loss, loss=lambda out, y: F.cross_entropy(out, y, "
                f"label_smoothing={self._label_smoothing}); or drop compute_loss_func= and keep the Trainer's label "
                f"smoother, giving the callback that same loss= callable."
            )
        if labels is None:
            self.close()
            raise ConfigError(
                f"The Trainer called compute_loss_func=callback.compute_loss with labels=None: the batch reached it "
                f"without {self._label_key!r}. With TrainingArguments(remove_unused_columns=True), the default, the "
                f"Trainer keeps only the model's forward arguments and its label_names (for a question-answering "
                f"head start_positions and end_positions, not 'labels'). Fix: TrainingArguments(label_names="
                f"[{self._label_key!r}]), which keeps that entry for compute_loss_func, or remove_unused_columns=False."
            )
        logits = model_output(outputs)
        per_sample = self._loss.implementation(logits, labels)
        counts = (torch.ones_like(per_sample) if self._loss.counts is None
                  else self._loss.counts(labels).to(per_sample.dtype))
        if num_items_in_batch is not None and self._pending:
            self._pending[-1] = (self._pending[-1][0], float(num_items_in_batch))
        total = counts.sum().clamp_min(1) if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        return (counts * per_sample).sum() / total.to(per_sample.device, per_sample.dtype)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if self.recorder is not None and self.recorder._active and getattr(args, "auto_find_batch_size", False):
            self._retry_with_smaller_batch(train_dataloader)
        if getattr(args, "neftune_noise_alpha", None) is not None:
            raise ConfigError(
                f"TrainingArguments(neftune_noise_alpha={args.neftune_noise_alpha}) adds noise to the embeddings "
                f"through a forward hook that the Trainer removes when training ends, so no later forward can draw "
                f"it again and the per-sample scores would miss it (the residual would carry most of the run). "
                f"Fix: train with neftune_noise_alpha=None, or draw the noise in a layer of the model (it is then "
                f"replayed with TrajectoryRecorder(capture_random=True))."
            )
        _refuse_inductor_masks(args, model)
        self._label_smoothing = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
        if self._label_smoothing and any(p.dtype == torch.float64 for p in model.parameters()):
            warn_at_caller(
                f"TrainingArguments(label_smoothing_factor={self._label_smoothing}) trains this float64 model "
                f"through the Trainer's LabelSmoother, which sums the log-probabilities with dtype=torch.float32: "
                f"the backward of that sum carries the smoothing term's gradient, label_smoothing_factor / "
                f"(num_items_in_batch x vocabulary), rounded to float32, a per-step rounding of one term that no "
                f"per-sample loss reproduces, so the residual share stays near 1e-9 instead of float64 rounding "
                f"(1e-14). Fix: label_smoothing_factor=0, compute_loss_func=callback.compute_loss and the smoothed "
                f"per-sample loss as the callback's loss= (docs/guide_own_model.md, 'Hugging Face Trainer'); a float32 "
                f"model is at its own rounding either way.")
        optim = getattr(args, "optim", None)
        self.framework_optimizer = (f"The Trainer's optimizer (TrainingArguments(optim="
                                    f"{getattr(optim, 'value', optim)!r}), or Trainer(optimizers=...))")
        try:
            self._epoch_batches = len(train_dataloader) if train_dataloader is not None else None
        except TypeError:  # an iterable dataset: the Trainer then counts max_steps * accumulation batches per epoch
            self._epoch_batches = None
        # resumed with ignore_data_skip=True the Trainer starts a whole epoch at the checkpoint's step
        self._epoch_start = int(state.global_step) if getattr(args, "ignore_data_skip", False) else 0
        # as the Trainer decides whether it divides the loss by the accumulated micro-batches
        forward = inspect.signature(model.forward).parameters.values()
        self._loss_kwargs = getattr(model, "accepts_loss_kwargs", None)
        if self._loss_kwargs is None:
            self._loss_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in forward)
        self._drop_unused_columns(model, args)
        self._refuse_square_mask(model)
        self._decoder_from_labels = self._add_decoder_inputs(model)
        self._refuse_tensors_outside(model, getattr(optimizer, "optimizer", optimizer))
        # accelerate wraps the torch optimizer; under fp16 the wrapper holds accelerate's GradScaler
        self._start(model, getattr(optimizer, "optimizer", optimizer), getattr(optimizer, "scaler", None),
                    step=int(state.global_step))
        if getattr(args, "load_best_model_at_end", False):
            self.recorder.final_hint = (
                " Here TrainingArguments(load_best_model_at_end=True) loaded the best checkpoint's weights into the "
                "model when training ended, an earlier point of the trajectory than its end: to explain the model "
                "training ends with, record with load_best_model_at_end=False (or a run that ends at the best "
                "checkpoint's step s, max_steps=s).")
        self._hook = model.register_forward_pre_hook(ModelHook(self._take_index), with_kwargs=True)
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        if loader is not None:
            self._collate = (loader, loader.collate_fn)
            loader.collate_fn = IndexCollate(loader.collate_fn, self.index_key)

    def _retry_with_smaller_batch(self, loader: Any) -> None:
        """``auto_find_batch_size=True``: the Trainer caught an out-of-memory error and trains again from the start
        with a smaller batch; the abandoned attempt's recording is dropped (refused if it took steps)."""
        self._restore_collate()
        self._pending.clear()
        self._logged, self._divided = 0, False
        size = getattr(loader, "total_batch_size", None) or getattr(loader, "batch_size", None)
        self._abandon_attempt(
            f"TrainingArguments(auto_find_batch_size=True) started training again with a batch of {size}",
            f"TrainingArguments(per_device_train_batch_size={size}, auto_find_batch_size=False), the batch that "
            f"fits, so that training runs once from the start.")

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._log(args, state)  # a micro-batch that does not end the step: its backward is done

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._log(args, state)
        if self.recorder is not None and not self._logged:
            raise TrajectoryError(
                f"Step {state.global_step}: no training batch carried {self.index_key!r}. Give the Trainer the "
                f"IndexedDataset as train_dataset (explaind.integrations.IndexedDataset(dataset))."
            )
        expected = self._step_micro_batches(args, state)
        if self._divided and self._logged != expected:
            self.close()
            raise TrajectoryError(
                f"Step {state.global_step}: the Trainer ran {self._logged} micro-batches, but an epoch of "
                f"{self._epoch_batches} batches with gradient_accumulation_steps={args.gradient_accumulation_steps} "
                f"gives this step {expected}, the number each micro-batch's mean was divided by in the recorded "
                f"weights. Fix: pass compute_loss_func=callback.compute_loss to the Trainer, which normalises every "
                f"step by the samples it has (recorded as they are), or normalization='step' when the model divides "
                f"its loss by num_items_in_batch."
            )
        self._logged, self._divided = 0, False

    def _step_micro_batches(self, args: Any, state: Any) -> int:
        r"""The micro-batches the Trainer accumulates in the current step, :math:`M_s` (its epoch loop's rule).

        An epoch of :math:`L` batches has :math:`\lceil L / K \rceil` steps of :math:`K` =
        ``gradient_accumulation_steps`` micro-batches, the last one of :math:`L \bmod K` when that is not 0;
        without a dataloader length every step has :math:`K`. Step ``global_step`` is step
        ``global_step mod`` :math:`\lceil L / K \rceil` of its epoch (also after resuming from a checkpoint), counted
        from the checkpoint's step where ``TrainingArguments(ignore_data_skip=True)`` starts a whole epoch there.
        """
        K = int(args.gradient_accumulation_steps)
        if not self._epoch_batches:
            return K
        per_epoch = -(-self._epoch_batches // K)
        place = (int(state.global_step) - self._epoch_start) % per_epoch
        return (self._epoch_batches % K or K) if place == per_epoch - 1 else K

    def _log(self, args: Any, state: Any) -> None:
        """Log the micro-batch whose backward just ended (one forward per ``log_batch``, so random states replay)."""
        if self.recorder is None or not self._pending:
            return
        if len(self._pending) > 1:
            raise TrajectoryError(f"{len(self._pending)} training forwards carried {self.index_key!r} between two "
                                  f"backward passes; explaind expects one forward per micro-batch.")
        idx, total = self._pending.pop()
        mode = self._normalization if self._normalization != "auto" else ("step" if total is not None else
                                                                          "micro_batch")
        if self._normalization == "auto" and mode == "step" and int(args.gradient_accumulation_steps) > 1:
            self.recorder.framework_hint = (
                " The Trainer passed num_items_in_batch to the model, so the callback weighted each sample by its "
                "share of the step's counted items (normalization='auto' chose 'step') and the Trainer did not "
                "divide the loss by gradient_accumulation_steps; a model whose own loss ignores num_items_in_batch "
                "(a plain mean, as the ...ForTokenClassification heads of transformers compute it) trains on the sum "
                "of the micro-batches' means instead. Fix: ExplaindTrainerCallback(..., normalization='micro_batch', "
                "check_gradients=True), whose check measures the factor the Trainer leaves in at every step, or "
                "compute_loss_func=callback.compute_loss.")
        if self._normalization == "auto" and total is None and self._loss_kwargs and \
                int(args.gradient_accumulation_steps) > 1:
            self.recorder.framework_hint = (
                " The model's forward takes loss keyword arguments, so the Trainer does not divide the loss by "
                "gradient_accumulation_steps, yet the training forward received no num_items_in_batch: the loss came "
                "from a compute_loss override that calls the model itself and normalises the step as it likes "
                "(e.g. by num_items_in_batch), which the callback cannot see. Fix: return callback.compute_loss("
                "outputs, labels, num_items_in_batch) from the override (the loss the callback records), or "
                "compute_loss_func=callback.compute_loss instead of the override.")
        elif mode == "micro_batch" and int(args.gradient_accumulation_steps) > 1:
            self.recorder.framework_hint = (
                " The callback weighted each micro-batch's mean by 1 / (the micro-batches of its step), as the Trainer "
                "divides a loss by gradient_accumulation_steps; a compute_loss_func= of your own that divides by "
                "num_items_in_batch (the step's count, which the callback does not see) weights every sample of the "
                "step by 1 / num_items_in_batch instead, which differs where a step's micro-batches differ in size "
                "(the last batches of an epoch). Fix: compute_loss_func=callback.compute_loss, which computes the "
                "callback's loss= (explaind.batch_coupled_loss(terms) too) and records num_items_in_batch, or return "
                "callback.compute_loss(outputs, labels, num_items_in_batch) from your own.")
        if self._label_smoothing and self._loss_name is not None:
            self.close()
            raise ConfigError(
                f"TrainingArguments(label_smoothing_factor={self._label_smoothing}) makes the Trainer train on the "
                f"label-smoothed loss (its LabelSmoother), but the callback was given loss={self._loss_name!r}, "
                f"which does not smooth: the recorded per-sample gradients would not be those of the run. Fix: give "
                f"the callback the smoothed loss, loss=lambda out, y: F.cross_entropy(out, y, "
                f"label_smoothing={self._label_smoothing}) (docs/guide_own_model.md, 'Hugging Face Trainer'); with "
                f"a compute_loss_func= or compute_loss of your own the Trainer ignores label_smoothing_factor, so "
                f"set it to 0."
            )
        (w,) = step_weights(self._loss, self._data, [idx], mode, self._dtype, total if mode == "step" else None)
        if mode == "micro_batch":  # the Trainer divides each micro-batch mean by the micro-batches of the step
            w = w / self._step_micro_batches(args, state)
            self._divided = True
        self.recorder.log_batch(idx, w)
        self._logged += 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the recorder and detach from the model and dataloader (``on_train_end`` does it)."""
        try:
            self._stop()
        finally:
            self._restore_collate()

    def _restore_collate(self) -> None:
        """Give the training dataloader its own collator back."""
        if self._collate is not None:
            loader, original = self._collate
            loader.collate_fn = original
            self._collate = None

    def _drop_unused_columns(self, model: Any, args: Any) -> None:
        """Leave out of the recorded inputs the item entries the Trainer removes before the model sees them.

        With ``TrainingArguments(remove_unused_columns=True)`` (the default) the Trainer's collator drops every
        entry that is no parameter name of ``model.forward`` (a ``**kwargs`` parameter keeps none of them);
        explaind calls ``model(**X)``, so ``X`` drops them too (before: a ``TypeError`` from the recorder's first
        forward, or, for a ``forward`` that takes ``**kwargs``, other inputs than the run's).
        """
        if not getattr(args, "remove_unused_columns", False) or self._items is None or \
                not isinstance(self._items[0], dict):
            return
        columns = set(inspect.signature(model.forward).parameters)
        X, y = self._items
        unused = sorted(k for k in X if k not in columns)
        if unused:
            self._items = ({k: v for k, v in X.items() if k in columns}, y)
            self._data = TrainData(self._items)
            logger.info("%s: the items' entries %s are left out of the recorded inputs, as the Trainer removes them "
                        "(remove_unused_columns=True).", type(model).__name__, unused)

    def _refuse_square_mask(self, model: Any) -> None:
        """Refuse a square 4-D ``(n, 1, L, L)`` source mask for an encoder-decoder (``attention_mask="bidirectional"``).

        The model applies the source mask in its cross-attention too, whose queries are the decoder's positions:
        a square mask has the source's length there (before: a raw ``RuntimeError`` about tensor sizes from the
        recorder's first gradient check).
        """
        mask = self._items[0].get("attention_mask") if self._items is not None and isinstance(self._items[0], dict) \
            else None
        cfg = getattr(model, "config", None)
        if getattr(cfg, "is_encoder_decoder", False) and isinstance(mask, Tensor) and mask.dim() == 4 and \
                mask.shape[-2] > 1:
            self.close()
            raise ConfigError(
                f"{type(model).__name__} is an encoder-decoder: it applies the source attention_mask in its "
                f"cross-attention too, over the decoder's positions, so the square 4-D mask of shape "
                f"{tuple(mask.shape)} (attention_mask='bidirectional') does not fit there. Fix: "
                f"IndexedDataset.train_data(..., attention_mask='key_padding') or ExplaindTrainerCallback(..., "
                f"attention_mask='key_padding'), the (n, 1, 1, L) mask every query broadcasts over; explain test "
                f"inputs with mask.bool()[:, None, None, :] likewise."
            )

    def _add_decoder_inputs(self, model: Any) -> bool:
        """Add ``decoder_input_ids`` built from the labels to the recorded inputs of an encoder-decoder model.

        Given ``labels`` and no decoder inputs, a Hugging Face encoder-decoder (BART, T5, Marian, ...) builds them
        in ``forward`` as ``prepare_decoder_input_ids_from_labels(labels)`` (the labels shifted right, -100 as the
        padding id). explaind calls ``model(**X)`` without labels, where the model would build them from
        ``input_ids`` instead: a different function. So ``X`` gets the decoder inputs the Trainer's forwards
        build; :meth:`_take_index` refuses a run whose forwards do not receive the labels. A model without that
        method (Whisper) gets them shifted as its config says (:func:`_shift_by_config`).
        """
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        how = "model.prepare_decoder_input_ids_from_labels(labels)"
        if prepare is None:
            prepare, how = _shift_by_config(model)
        if prepare is None or self._items is None or not isinstance(self._items[0], dict):
            return False
        X, y = self._items
        if {"decoder_input_ids", "decoder_inputs_embeds"} & set(X):
            return False
        with torch.no_grad():
            decoder = prepare(labels=torch.as_tensor(y))
        self._data = TrainData(({**X, "decoder_input_ids": decoder}, y))
        logger.info("%s: recording decoder_input_ids = %s, as the model builds them from the labels the Trainer "
                    "passes.", type(model).__name__, how)
        return True

    # ------------------------------------------------------------------ model hook
    def _take_index(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Forward pre-hook: remove the positions from the batch; keep them for training forwards.

        Forwards without positions (the recorder's own gradient check, user calls) pass unchanged; a step
        without any logged micro-batch is refused at ``on_pre_optimizer_step``.
        """
        idx = kwargs.pop(self.index_key, None)
        if idx is not None and module.training and torch.is_grad_enabled():  # not evaluation, not the recorder's
            if self._decoder_from_labels and "labels" not in kwargs:
                self.close()
                raise ConfigError(
                    f"{type(module).__name__} builds its decoder inputs from the labels, and the callback recorded "
                    f"them so (decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)), but the "
                    f"Trainer calls the model without labels (compute_loss_func= or label smoothing take them out), "
                    f"so its decoder inputs come from elsewhere and the recorded gradients would not be the run's. "
                    f"Fix: add 'decoder_input_ids' to every item of the IndexedDataset "
                    f"(model.prepare_decoder_input_ids_from_labels(labels=item['labels'])), so the model and the "
                    f"recorder see the same decoder inputs."
                )
            total = kwargs.get("num_items_in_batch")
            positions = torch.as_tensor(idx).detach().to("cpu", torch.long).reshape(-1)
            try:
                self._check_batch(positions, {k: v for k, v in kwargs.items() if k != self._label_key},
                                  kwargs.get(self._label_key))
            except ConfigError:
                self.close()
                raise
            self._pending.append((positions, None if total is None else float(total)))
        return args, kwargs


def _shift_by_config(model: Any) -> tuple[Callable[..., Tensor] | None, str]:
    """The decoder inputs an encoder-decoder without ``prepare_decoder_input_ids_from_labels`` (Whisper) builds in
    ``forward`` from its labels: shifted right by one, ``config.decoder_start_token_id`` first, -100 as
    ``config.pad_token_id``; with how it is built, in words. ``None`` for a model that is no encoder-decoder or lacks
    either id.

    The gradient check compares the recorded gradients with the run's, so a model that builds them otherwise is
    refused at the checked steps.
    """
    cfg = getattr(model, "config", None)
    start, pad = getattr(cfg, "decoder_start_token_id", None), getattr(cfg, "pad_token_id", None)
    if not getattr(cfg, "is_encoder_decoder", False) or not isinstance(start, int) or not isinstance(pad, int):
        return None, ""

    def shift(labels: Tensor) -> Tensor:
        out = torch.full_like(labels, start)
        out[:, 1:] = labels[:, :-1]
        return out.masked_fill(out == -100, pad)

    return shift, (f"the labels shifted right, config.decoder_start_token_id={start} first and -100 as "
                   f"config.pad_token_id={pad}")


def _refuse_inductor_masks(args: Any, model: torch.nn.Module) -> None:
    """Refuse ``TrainingArguments(torch_compile=True)`` with the inductor backend on a model that draws dropout masks
    unless ``torch._inductor.config.fallback_random`` is set: inductor's compiled forward draws its masks from its own
    random-number generator, not from torch's, whose state the callback captures and replays.

    Raises
    ------
    ConfigError
        Naming the backend, the dropout layers and the two fixes. Before, the first gradient check failed with a
        relative difference of about 0.5 and a list of causes that did not name the compiler.
    """
    backend = getattr(args, "torch_compile_backend", None) or "inductor"
    if not getattr(args, "torch_compile", False) or backend != "inductor":
        return
    layers = [name or type(m).__name__ for name, m in model.named_modules() if draws_masks(m)]
    if not layers:
        return
    import torch._inductor.config as inductor_config  # only for a compiled run

    if inductor_config.fallback_random:
        return
    raise ConfigError(
        f"TrainingArguments(torch_compile=True) compiles the model with the 'inductor' backend, whose compiled forward "
        f"draws the dropout masks of {', '.join(layers[:5])} from inductor's own random-number generator, not from "
        f"torch's generator whose state the callback captures: the replayed forwards would draw other masks (the "
        f"gradient check fails, the residual holds the difference). Fix: torch._inductor.config.fallback_random = "
        f"True before training (inductor then draws as torch does: exact), or "
        f"TrainingArguments(torch_compile_backend='aot_eager').")
