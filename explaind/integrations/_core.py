"""What both framework callbacks share: the training data, the loss, and one recorder per run."""

from __future__ import annotations

import inspect
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError, UnknownEntryError, warn_at_caller
from ..inputs import Inputs
from ..trajectory._common import TrainData, resolve_loss_record
from ..trajectory._start_state import held_state
from ..trajectory.recorder import TrajectoryRecorder
from .data import INDEX_KEY, IndexedDataset, MaskForm

__all__ = ["RecordingCore"]

#: The callback whose recorder is open on a model. A Hugging Face ``Trainer`` has no exception event, so a
#: ``trainer.train()`` that raises leaves its callback's recorder open, with its hooks on the model and optimizer.
_OPEN: weakref.WeakKeyDictionary[nn.Module, RecordingCore] = weakref.WeakKeyDictionary()


class RecordingCore:
    """Holds the recorder of a framework callback: created when training starts, closed when it ends.

    Parameters
    ----------
    train_data : IndexedDataset or (X, y)
        With an :class:`IndexedDataset`, ``(X, y)`` is its :meth:`~IndexedDataset.train_data`.
    loss : str, LossRecord or callable
    attention_mask : {"keep", "bidirectional", "causal", "key_padding"}
        Passed to :meth:`IndexedDataset.train_data`.
    recorder_kwargs : dict
        Passed to :class:`~explaind.TrajectoryRecorder`, except ``grad_scaler``: the framework's loss scaler
        is handed over by the callback when training starts.
    """

    framework = "the framework's trainer"
    framework_scaler = "the framework's GradScaler"
    #: How a run resumed from a framework checkpoint was started, and how the optimizer was chosen (for messages).
    framework_resume = "resuming from a checkpoint"
    #: Where the framework keeps the checkpoint of a step (for messages; with a leading separator).
    framework_checkpoint = ""
    #: How a callback is replaced by a new one (for messages; with a leading separator).
    framework_replace_callback = ""
    framework_optimizer = "the framework's optimizer setting"
    framework_optimizer_fix = "Fix: train with torch.optim.SGD, Adam or AdamW."
    #: The framework's hooks that edit a batch before the model sees it (for messages; with a leading separator).
    framework_batch_edit = ""

    def _setup(self, train_data: Any, loss: Any, attention_mask: MaskForm,
               recorder_kwargs: dict[str, Any]) -> None:
        if "grad_scaler" in recorder_kwargs:
            raise ConfigError(
                f"{type(self).__name__}(grad_scaler=...) is not allowed: the callback hands "
                f"{self.framework_scaler} to the recorder when training starts, so the loss scale of every step "
                f"is the one the framework used. Fix: remove grad_scaler= and configure float16 mixed precision in "
                f"the framework (docs/guide_own_model.md, 'Mixed precision')."
            )
        if isinstance(train_data, IndexedDataset):
            self.index_key, self._label_key = train_data.index_key, train_data.label_key
            train_data = train_data.train_data(attention_mask=attention_mask)
        else:
            self.index_key, self._label_key = INDEX_KEY, "labels"
        #: the (X, y) pair when given as one (an IndexedDataset's items), for inputs the callback derives from y
        self._items = train_data if isinstance(train_data, tuple) and len(train_data) == 2 else None
        self._data = TrainData(train_data)
        self._loss = resolve_loss_record(loss)
        self._loss_name = loss if isinstance(loss, str) else None  # a registered loss, given by its name
        self._kwargs = recorder_kwargs
        self.recorder: TrajectoryRecorder | None = None
        self._hook: Any = None  # the callback's forward pre-hook on the recorded model
        self._dtype = torch.float32
        self._batches_seen = 0  # training micro-batches whose inputs reached the model (for _check_batch)

    @property
    def trajectory(self) -> Any:
        """The recorded trajectory (after or during training)."""
        if self.recorder is None:
            raise TrajectoryError(f"Nothing recorded yet: pass the callback to {self.framework} and train (a run "
                                  f"that stops before training starts, e.g. at a time limit already reached, records "
                                  f"nothing).")
        return self.recorder.trajectory

    def _check_keywords(self, model: nn.Module) -> None:
        """Refuse mapping inputs whose keys ``model.forward`` does not take: explaind calls ``model(**X)``.

        Lightning's ``training_step`` may call the model in any way (``self.model(batch["x"])``); the recorder
        recomputes gradients as ``model(**X)`` with ``X`` the items' entries other than the labels.
        """
        x = self._data.get(torch.arange(1))[0] if not self._data.is_dataset else None
        if not (isinstance(x, Inputs) and isinstance(x.data, dict)):
            return
        try:
            inspect.signature(model.forward).bind(**dict.fromkeys(x.data))
        except TypeError as exc:
            raise ConfigError(
                f"The training items' inputs {sorted(x.data)} are passed to the recorded model as keyword arguments, "
                f"model(**inputs), but {type(model).__name__}.forward{inspect.signature(model.forward)} does not "
                f"take them ({exc}). Fix: name the items' entries as forward's arguments (e.g. {{'input': ..., "
                f"'labels': ...}}), or give the callback train_data=(X, y) with X what training_step passes to the "
                f"model (a tensor for model(x)), keeping the IndexedDataset for the dataloader."
            ) from None

    def _check_batch(self, idx: Tensor, given: Any, labels: Any = None) -> None:
        """Refuse a training batch whose model inputs (or labels) are not the recorded rows ``idx`` of ``(X, y)``.

        explaind recomputes every gradient from the rows of the training items it holds, so inputs drawn anew
        for every batch (a collator that masks tokens at random, ``DataCollatorForLanguageModeling(mlm=True)``;
        random augmentation in ``__getitem__``) are other samples than the recorded ones. Checked on the first
        micro-batches and every 16th after them (a comparison of the batch with the recorded rows); a recorded
        tensor padded wider than the batch (dynamic padding) is compared on the batch's part of it, aligned
        left or right. A packed batch (one row holding the batch's sequences back to back, as
        ``DataCollatorWithFlattening`` builds it) is split where its ``position_ids`` restart (or by ``seq_idx``
        / ``cu_seq_lens_q``) and each sequence compared with its item's recorded row (:func:`_packed_segments`);
        the labels from each sequence's second token on (the collator puts a separator at the first). ``given`` is
        the tensor or mapping the model received; ``labels`` the batch's labels.
        """
        self._batches_seen += 1
        if self._data.is_dataset or not (self._batches_seen <= 4 or self._batches_seen % 16 == 0):
            return
        x, y = self._data.get(idx)
        recorded = x.data if isinstance(x, Inputs) else x
        pairs = ([(k, recorded.get(k), v) for k, v in given.items()] if isinstance(given, dict) and
                 isinstance(recorded, dict) else [("inputs", recorded, given)])
        pairs.append((self._label_key, y, labels))
        segments = _packed_segments(given, idx.numel()) if isinstance(given, dict) else None
        if segments is not None and len(segments) != idx.numel():
            raise ConfigError(
                f"Training micro-batch {self._batches_seen}: the model received one packed row of {len(segments)} "
                f"sequences (split where position_ids restart, or by seq_idx / cu_seq_lens_q) for {idx.numel()} "
                f"items (positions {idx[:8].tolist()}{' ...' if idx.numel() > 8 else ''}), so the recorded rows are "
                f"not the sequences the model trained on: an item without tokens (DataCollatorWithFlattening leaves "
                f"it out) or a collator that packs otherwise. Fix: drop the empty items from the IndexedDataset, or "
                f"train with a collator that packs each item into one sequence of its own position_ids."
            )
        for key, rec, got in pairs:
            differing = (_differing(rec, got) if segments is None else
                         _differing_packed(rec, got, segments, skip=int(key == self._label_key)))
            if differing:
                raise ConfigError(
                    f"Training micro-batch {self._batches_seen}: the model received {key!r} that differ from the "
                    f"recorded training items at those positions in {differing} entries (positions "
                    f"{idx[:8].tolist()}{' ...' if idx.numel() > 8 else ''}). explaind recomputes every gradient from "
                    f"the items it was given, so inputs drawn anew for every batch are other samples than the recorded "
                    f"ones and the scores would not be the run's: a collator that draws at random "
                    f"(DataCollatorForLanguageModeling(mlm=True) masks other tokens every time), random augmentation "
                    f"in the dataset's __getitem__, or a preprocessing step the callback's train_data does not hold"
                    f"{self.framework_batch_edit}. "
                    f"Fix: draw the masks or augmentations once, before training, and train on those fixed items (e.g. "
                    f"mask every item once with the collator and a fixed seed, store input_ids and labels in the "
                    f"items, and train with a collator that only pads); give the callback train_data whose rows are "
                    f"exactly what the model receives (docs/guide_own_model.md, 'Trainer and Lightning options')."
                )

    def _start(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_scaler: Any = None, *,
               step: int = 0) -> None:
        """Create and enter the recorder; ``grad_scaler`` is the framework's ``torch.amp.GradScaler`` or ``None``.

        ``step`` is the framework's optimizer step when training starts (above 0 when it resumed from a
        checkpoint). An optimizer restored with the checkpoint starts the recording from its state: the
        recorder stores its momentum buffers and the ``initial_state`` term of an attribution carries them
        (docs/maths.md §4, "Optimizer state at the start"). What the recorder cannot start from (an adapter
        without ``start_state``) is refused with the framework's resume option named.
        """
        if self.recorder is not None and self.recorder._active:
            taken = self._close_after_error()
            raise TrajectoryError(
                f"This {type(self).__name__}'s previous training run ended in an exception after {taken} recorded "
                f"step(s), and the recording was left open ({self.framework} reports no exception to its callbacks); "
                f"it is closed now, its steps kept in callback.trajectory. Fix: create a new {type(self).__name__} "
                f"for the new run{self.framework_replace_callback}; it records from the model's current weights.")
        if self.recorder is not None:
            raise TrajectoryError(f"This {type(self).__name__} has recorded a run already; create a new one for "
                                  f"every training run.")
        self._close_stale(model)
        held = held_state(optimizer)
        try:
            self.recorder = TrajectoryRecorder(model, optimizer, loss=self._loss, train_data=self._data,
                                              grad_scaler=grad_scaler, **self._kwargs)
            self._dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
            self.recorder.__enter__()
            self._first_step = self.recorder.n_steps  # above 0 for a resumed store
            _OPEN[model] = self
        except UnknownEntryError as exc:
            self.recorder = None
            raise UnknownEntryError(f"{self.framework_optimizer} gave a {type(optimizer).__module__}."
                                    f"{type(optimizer).__name__}: {exc} {self.framework_optimizer_fix}") from None
        except TrajectoryError as exc:
            recorder, self.recorder = self.recorder, None
            if recorder is None or not getattr(recorder, "_resumed", False):
                raise
            raise self._resume_mismatch(recorder, step, exc) from None
        except ConfigError as exc:
            self.recorder = None
            if not (step > 0 and held):
                raise
            raise ConfigError(f"Training started at step {step} with the optimizer state of a checkpoint ({held} "
                              f"parameter(s) hold {type(optimizer).__name__} state) after {self.framework_resume}, "
                              f"and the recording cannot start from it: {exc} Or record the run from step 0 in one "
                              f"call with the callback.") from None

    def _abandon_attempt(self, retry: str, fix: str) -> None:
        """Drop the recording of a training attempt that the framework abandoned after an exception it caught, before
        it trains again from the start (``retry`` says how, for the message).

        An attempt that took no optimizer step changed nothing: its recorder is closed as after an error (no
        end-of-run checks; a store it created is written again from the start by the next one). An attempt that took
        steps has moved the weights, which the framework does not restore, so the new attempt would start from
        weights no recording reaches: refused with ``fix``.
        """
        recorder = self.recorder
        if recorder is None:
            return
        taken = self._close_after_error()
        self.recorder = None
        if taken:
            raise TrajectoryError(
                f"{retry} after an attempt that had already taken {taken} optimizer step(s): the weights those steps "
                f"moved are not set back, so the new attempt starts from weights that no recording reaches (the "
                f"recorded steps belong to the abandoned attempt). Fix: {fix}")
        if self._kwargs.get("store") is not None and not recorder._resumed:
            self._kwargs = {**self._kwargs, "overwrite": True}  # the store the abandoned attempt created, no step
        self._batches_seen = 0

    def _refuse_tensors_outside(self, model: nn.Module, optimizer: Any) -> None:
        """Refuse an optimizer that steps tensors outside ``model`` (a learned temperature or loss weight that a
        Trainer subclass adds in ``create_optimizer``): the run then trains a function of more than the model's
        parameters. Before, the recorder's refusal named a group position and asked to build the optimizer from
        the model's parameters, not where the tensor belongs."""
        inside = {id(p) for p in model.parameters()}
        outside = [f"param_groups[{g}] tensor of shape {tuple(p.shape)}" for g, group in
                   enumerate(getattr(optimizer, "param_groups", ())) for p in group["params"] if id(p) not in inside]
        if outside:
            raise ConfigError(
                f"{self.framework_optimizer} steps {len(outside)} tensor(s) that are not parameters of the model "
                f"{type(model).__name__}: {', '.join(outside)} (e.g. added in a create_optimizer override with "
                f"add_param_group). The run then trains a function of those too (a learned temperature or loss "
                f"weight the loss reads), which the recorded model does not hold. Fix: make each a parameter of the "
                f"model (a wrapper module holding the model and the tensor, whose forward returns what the loss "
                f"reads, e.g. the logits divided by the temperature), which is then recorded and explained; or leave "
                f"it out of the optimizer.")

    def _close_stale(self, model: nn.Module) -> None:
        """Close, with a warning, the recorder another callback left open on ``model`` or on this callback's store
        (a training run that raised, which the framework did not report to its callbacks)."""
        store = self._kwargs.get("store")
        target = Path(store).resolve() if store is not None else None
        for key, owner in list(_OPEN.items()):
            recorder = owner.recorder
            if owner is self or recorder is None or not recorder._active:
                continue
            shared = f"The model {type(model).__name__}" if key is model else None
            if shared is None and target is not None and recorder._store is not None and \
                    Path(recorder._store).resolve() == target:
                shared = f"The store {str(store)!r}"
            if shared is None:
                continue
            taken = owner._close_after_error()
            warn_at_caller(
                f"{shared} still had the open recorder of an earlier {type(owner).__name__}, whose training run ended "
                f"in an exception after {taken} recorded step(s) ({self.framework} reports no exception to its "
                f"callbacks): its hooks on the model and the optimizer, and its lock on its store, would have taken "
                f"this run's batches and steps or refused it. It is closed now (its steps kept in its trajectory, and "
                f"in its store, which resume=True continues), and this callback records the new run.")

    def _close_after_error(self) -> int:
        """Close the open recorder as after an error (no end-of-run checks, a store left incomplete) and remove the
        callback's model hook; returns the steps it recorded in this run."""
        recorder = self.recorder
        taken = recorder.n_steps - getattr(self, "_first_step", 0) if recorder is not None else 0
        try:
            if recorder is not None:
                recorder.__exit__(TrajectoryError, None, None)
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
        return taken

    def _resume_mismatch(self, recorder: TrajectoryRecorder, step: int, exc: Exception) -> TrajectoryError:
        """The refusal of a store given with ``resume=True`` whose last step is not where the framework started.

        The recorder's own advice (``rec.restore()`` before ``with rec:``) is no fix for a callback: the framework
        loads the weights and the optimizer state from its checkpoint, so the store's step and the checkpoint's step
        must be the same.
        """
        stored = int(recorder._n)
        where = (f"started training at step {step}" if step != stored else
                 f"started training at step {step}, the store's, with other weights or optimizer state than those "
                 f"it holds (the checkpoint is not one of the run recorded in this store)")
        return TrajectoryError(
            f"The store {str(recorder._store)!r} goes on from step {stored} (its last step with a stored optimizer "
            f"state), but {self.framework_resume} {where}: the recording can only go on from there ({exc}) Fix: "
            f"resume training from the "
            f"checkpoint of step {stored} of the run recorded in this store{self.framework_checkpoint}, so that the "
            f"weights and the optimizer state are those of the stored step {stored}; or record into another store "
            f"(another store= path, or overwrite=True instead of resume=True).")

    def _stop(self) -> None:
        """Close the recorder, then remove the callback's model hook (``self._hook``): the recorder's end-of-run
        checks compare the model's hooks with those of the last step."""
        for model in [m for m, owner in _OPEN.items() if owner is self]:
            del _OPEN[model]
        try:
            if self.recorder is not None and self.recorder._active:
                self.recorder.__exit__(None, None, None)
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None


def _differing(recorded: Any, given: Any) -> int:
    """How many entries of the tensor ``given`` differ from ``recorded`` (0 when either is no tensor, or when their
    ranks or batch sizes differ: a 4-D attention mask recorded for a 2-D one is not compared).

    Where ``recorded`` is wider than ``given`` along an axis (padded to the longest item of the whole set), the
    batch is compared with the recorded tensor's first and with its last entries along it (right or left
    padding) and the closer alignment counts.
    """
    if not (isinstance(recorded, Tensor) and isinstance(given, Tensor)) or recorded.dim() != given.dim():
        return 0
    if recorded.dim() == 0 or recorded.shape[0] != given.shape[0] or recorded.is_floating_point() != \
            given.is_floating_point():
        return 0
    if any(g > r for g, r in zip(given.shape, recorded.shape)):
        return int(given.numel())  # the batch is wider than every recorded item
    got = given.detach().to(recorded.device, recorded.dtype)
    best = got.numel()
    for side in ("left", "right"):
        part = recorded[tuple(slice(0, g) if side == "left" else slice(r - g, r)
                              for g, r in zip(given.shape, recorded.shape))]
        best = min(best, int((part != got).sum()))
    return best


def _packed_segments(given: dict[str, Any], n: int) -> list[tuple[int, int]] | None:
    """The ``(start, end)`` token ranges of the sequences of a packed batch, or ``None`` for a batch that is not one.

    A packed batch gives the model one row ``(1, T)`` for ``n > 1`` items. Its sequences are found from
    ``cu_seq_lens_q`` (cumulative lengths, ``(k + 1,)``), else from where ``seq_idx`` ``(1, T)`` changes, else from
    where ``position_ids`` ``(1, T)`` do not go on by one (they restart at every sequence). A packed row without
    any of them cannot be split and is not compared (as before); a batch that has a row per item, or whose
    ``(1, T)`` entries hold one sequence (``position_ids`` shared by every row), is no packed batch.
    """
    rows = [v for v in given.values() if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[0] == 1]
    if n <= 1 or not rows or any(isinstance(v, Tensor) and v.dim() >= 2 and v.shape[0] == n for v in given.values()):
        return None  # a batch with a row per item, whose (1, T) entries broadcast (position_ids shared by all)
    T = rows[0].shape[1]
    cu, seq, pos = given.get("cu_seq_lens_q"), given.get("seq_idx"), given.get("position_ids")
    if isinstance(cu, Tensor) and cu.dim() == 1 and cu.numel() >= 2:
        starts = [int(c) for c in cu[:-1]]
    elif isinstance(seq, Tensor) and tuple(seq.shape) == (1, T):
        starts = [0] + (torch.nonzero(seq[0, 1:] != seq[0, :-1]).flatten() + 1).tolist()
    elif isinstance(pos, Tensor) and tuple(pos.shape) == (1, T):
        starts = [0] + (torch.nonzero(pos[0, 1:] != pos[0, :-1] + 1).flatten() + 1).tolist()
    else:
        return None
    return list(zip(starts, [*starts[1:], T])) if len(starts) > 1 else None


def _differing_packed(recorded: Any, given: Any, segments: list[tuple[int, int]], skip: int) -> int:
    """How many entries of the packed row ``given`` ``(1, T, ...)`` differ from the recorded rows ``(n, L, ...)``:
    sequence ``j`` (``segments[j]``) against row ``j`` by :func:`_differing`, from its entry ``skip`` on. Another
    tensor (a per-item one, a mask the packed batch has not) is compared as :func:`_differing` compares it."""
    if not (isinstance(recorded, Tensor) and isinstance(given, Tensor)) or given.dim() < 2 or given.shape[0] != 1 \
            or recorded.dim() != given.dim() or recorded.shape[0] != len(segments) or \
            given.shape[1] != segments[-1][1]:
        return _differing(recorded, given)
    return sum(_differing(recorded[j:j + 1, skip:], given[:, start + skip:end]) for j, (start, end) in
               enumerate(segments))
