"""Trainer options as people set them, recorded by ExplaindTrainerCallback: exact, or refused naming the fix.

A float64 MLP that computes its own loss (``forward(x, labels)`` returning a ``ModelOutput``, no ``**kwargs``, so the
Trainer divides each micro-batch's mean by the micro-batches of its step) trained on 25 samples in batches of 4 with
gradient accumulation 3: an epoch of 7 micro-batches has steps of 3, 3 and 1. Checked: the replica against the
trained model in evaluation mode, the residual share, and ``keep=("train",)`` against ``MappingReference``
(tests/_hf_testkit.py, one ``autograd.grad`` per sample). The label-smoothing and padding runs use the tiny BERT
classifier of tests/_hf_testkit.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import indexed
from _hf_testkit import N_TRAIN, VOCAB, MappingReference, assert_classifier_exact, cls_data, tiny_bert
from reference import rel_err
from torch import Tensor, nn
from transformers import (
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, UnknownEntryError
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N, BATCH, ACCUMULATE = 25, 4, 3


class OwnLossMLP(nn.Module):
    """``Linear(5, 8) - Tanh - Dropout - Linear(8, 3)``; with ``labels`` it returns the mean cross entropy too."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).to(DT)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.net(x)
        return SequenceClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels),
                                        logits=logits)


class KeywordLossMLP(OwnLossMLP):
    """The same model taking loss keyword arguments (``**kwargs``): the Trainer no longer divides its loss."""

    def forward(self, x: Tensor, labels: Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        return super().forward(x, labels)


class LearningRates(TrainerCallback):
    """The learning rate of every optimizer step, as the optimizer holds it when it steps."""

    def __init__(self):
        self.rates: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(float(optimizer.param_groups[0]["lr"]))


def _data(n: int = N) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _train(tmp_path, model: nn.Module | None = None, *, trainer_cls=Trainer, extra_callbacks=(), evaluate=False,
           callback_kwargs=None, optimizers=(None, None), **overrides):
    """Train ``model`` (default ``OwnLossMLP()``) with SGD momentum 0.9 at a constant rate, accumulation 3."""
    X, y = _data()
    train = indexed(X, y)
    model = model if model is not None else OwnLossMLP()
    callback = ExplaindTrainerCallback(train, loss="cross_entropy", **(callback_kwargs or {}))
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
                    max_steps=4, learning_rate=0.1, lr_scheduler_type="constant", optim="sgd",
                    optim_args="momentum=0.9", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True,
                    remove_unused_columns=False, report_to=[], save_strategy="no", logging_strategy="no",
                    disable_tqdm=True, seed=0, dataloader_num_workers=0)
    arguments = (Seq2SeqTrainingArguments if trainer_cls is Seq2SeqTrainer else TrainingArguments)(
        **{**settings, **overrides})
    held_out = [{"x": X[i], "labels": y[i]} for i in range(8)] if evaluate else None
    trainer = trainer_cls(model=model, args=arguments, train_dataset=train, eval_dataset=held_out,
                          callbacks=[callback, *extra_callbacks], optimizers=optimizers)
    trainer.train()
    return model.eval(), callback.trajectory, trainer


def _assert_exact(model: nn.Module, traj, *, reference: bool = True) -> None:
    """Replica <= 1e-6 relative to ``model``, residual share <= 1e-9, train scores <= 1e-9 against the reference."""
    X = {"x": torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=DT)}
    with torch.no_grad():
        truth = model(**X).logits
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X)
    assert att.meta["residual_share"] <= 1e-9
    if reference:
        ref = MappingReference(traj, X, loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none"))
        assert rel_err(att.values, ref.kept(("train",))) <= 1e-9


@pytest.mark.parametrize("trainer_cls", [Trainer, Seq2SeqTrainer])
def test_the_epochs_last_step_of_one_micro_batch_is_weighted_as_the_trainer_divides(tmp_path, trainer_cls):
    """Before the fix the callback divided that micro-batch by 3 as well: with the gradient check off, a residual
    share of 0.57; with it on, the check's measured factor hid the wrong weights."""
    model, traj, _ = _train(tmp_path, trainer_cls=trainer_cls, callback_kwargs={"check_gradients": False})
    assert [traj.batch(s)[0].numel() for s in range(4)] == [12, 12, 1, 12]
    for s, w in enumerate([1 / 12, 1 / 12, 1.0, 1 / 12]):  # the micro-batch mean / the step's micro-batches
        assert torch.allclose(traj.batch(s)[1], torch.full_like(traj.batch(s)[1], w), rtol=0, atol=1e-15)
    assert all(traj.grad_scale(s) == 1.0 for s in range(4))
    _assert_exact(model, traj)


SCHEDULES = {
    "cosine_with_restarts": dict(lr_scheduler_type="cosine_with_restarts", warmup_steps=1,
                                 lr_scheduler_kwargs={"num_cycles": 2}),
    "polynomial": dict(lr_scheduler_type="polynomial", lr_scheduler_kwargs={"power": 2.0, "lr_end": 1e-3}),
    "constant_with_warmup": dict(lr_scheduler_type="constant_with_warmup", warmup_steps=2),
    "reduce_lr_on_plateau": dict(lr_scheduler_type="reduce_lr_on_plateau", learning_rate=2.0, eval_strategy="steps",
                                 eval_steps=1, lr_scheduler_kwargs={"patience": 0, "factor": 0.5}),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_learning_rate_schedules_are_exact(tmp_path, schedule):
    rates = LearningRates()
    settings = SCHEDULES[schedule]
    model, traj, _ = _train(tmp_path, extra_callbacks=[rates], evaluate="eval_strategy" in settings,
                            **{"max_steps": 6, **settings})
    assert len(set(rates.rates)) >= 2  # the schedule moved the rate within the run
    _assert_exact(model, traj)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "rmsprop"])  # "sgd": every other run here
def test_optimizers_with_an_adapter_are_exact_with_the_trainers_no_decay_group(tmp_path, optim):
    model, traj, trainer = _train(tmp_path, optim=optim, optim_args=None, weight_decay=0.1, learning_rate=0.05)
    decays = sorted(g["weight_decay"] for g in trainer.optimizer.param_groups)
    assert decays == [0.0, 0.1]  # the biases in the Trainer's group without weight decay
    _assert_exact(model, traj)


def test_an_optimizer_without_an_adapter_is_refused_naming_the_trainers_setting(tmp_path):
    model = OwnLossMLP()
    with pytest.raises(UnknownEntryError, match=r"Trainer\(optimizers=...\)\) gave a torch.optim.lbfgs.LBFGS.*"
                                                r"No optimizer adapter.*Fix: TrainingArguments\(optim='adamw_torch'\)"):
        _train(tmp_path, model, optimizers=(torch.optim.LBFGS(model.parameters(), lr=0.1), None))


def test_the_trainers_adafactor_is_exact(tmp_path):
    """``optim="adafactor"`` builds transformers' Adafactor without relative step or parameter scaling (the other
    options are checked in tests/test_optimizer_hf_adafactor.py); weight decay spares the Trainer's no-decay group."""
    model, traj, trainer = _train(tmp_path, optim="adafactor", optim_args=None, learning_rate=0.05, weight_decay=0.1)
    assert traj.manifest.optimizer_class == "transformers.optimization.Adafactor"
    assert traj.manifest.adapter == "hf_adafactor"
    assert sorted(g["weight_decay"] for g in trainer.optimizer.param_groups) == [0.0, 0.1]
    _assert_exact(model, traj)


def test_torch_adafactor_passed_to_the_trainer_is_exact(tmp_path):
    model = OwnLossMLP()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=0.05, weight_decay=0.1)
    model, traj, _ = _train(tmp_path, model, optimizers=(optimizer, None))
    assert traj.manifest.adapter == "adafactor"
    _assert_exact(model, traj)


def test_evaluation_between_steps_keeps_a_dropout_run_exact(tmp_path):
    """``eval_strategy="steps"``: evaluation forwards (model.eval(), no_grad) between the recorded steps."""
    model, traj, trainer = _train(tmp_path, OwnLossMLP(dropout=0.3), evaluate=True, eval_strategy="steps",
                                  eval_steps=1, callback_kwargs={"check_gradients": True})
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 4
    assert max(traj.gradient_check()) <= 1e-12  # every step's dropout masks replayed
    _assert_exact(model, traj, reference=False)  # the loop reference does not replay masks


def test_drop_last_never_logs_the_dropped_samples(tmp_path):
    model, traj, _ = _train(tmp_path, dataloader_drop_last=True)
    assert [traj.batch(s)[0].numel() for s in range(4)] == [12] * 4  # 6 batches of 4: two steps of 3 per epoch
    assert len(set(torch.cat([traj.batch(s)[0] for s in range(2)]).tolist())) == 24
    _assert_exact(model, traj)


class MeanLossTrainer(Trainer):
    """A ``compute_loss`` override returning each micro-batch's mean, as people write it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


def test_a_compute_loss_override_is_exact_with_the_loss_scale_the_check_measures(tmp_path):
    """The model takes loss keyword arguments, so the Trainer takes the override's loss as normalised over the step
    and does not divide it: the gradient is the sum of the micro-batches' means, 3x the logged weights."""
    model, traj, _ = _train(tmp_path, KeywordLossMLP(), trainer_cls=MeanLossTrainer)
    assert [round(traj.grad_scale(s), 12) for s in range(4)] == [3.0, 3.0, 1.0, 3.0]
    _assert_exact(model, traj)


def _resume(tmp_path, optim: str):
    """Two steps of 3 micro-batches saved at ``checkpoint-2``, then a new model and callback resumed to step 5."""
    X, y = _data()
    first = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
                 max_steps=2, optim=optim, learning_rate=0.1, lr_scheduler_type="constant", use_cpu=True,
                 remove_unused_columns=False, report_to=[], save_strategy="steps", save_steps=2, disable_tqdm=True,
                 seed=0)
    Trainer(model=OwnLossMLP(), args=TrainingArguments(**first),
            train_dataset=[{"x": X[i], "labels": y[i]} for i in range(N)]).train()
    model = OwnLossMLP()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False)
    Trainer(model=model, args=TrainingArguments(**{**first, "max_steps": 5}), train_dataset=indexed(X, y),
            callbacks=[callback]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    return model.eval(), callback.trajectory


def test_resuming_from_a_checkpoint_with_adamw_state_is_exact_with_its_initial_state_term(tmp_path):
    """``resume_from_checkpoint`` restores AdamW's moments and step count: the recording starts from them, the
    part of the three resumed updates that the first moments carry is the ``initial_state`` term, and the rest
    still splits over the resumed steps' samples (docs/maths.md §4, "Optimizer state at the start")."""
    model, traj = _resume(tmp_path, "adamw_torch")
    assert traj.n_steps == 3 and sorted(traj.initial_state()) == sorted(n for n, _ in model.named_parameters())
    _assert_exact(model, traj)
    X = {"x": torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=DT)}
    att = explaind.InfluenceEstimator(keep=("step",), tol=1e-11, device="cpu").fit(traj).transform(X)
    carried = att.initial_state.abs().sum() / (att.final - att.initial).abs().sum()
    assert carried >= 1e-2 and att.completeness_error() <= 1e-12  # a real share of the change, in its own term


def test_resuming_plain_sgd_records_the_resumed_steps_weighted_by_their_place_in_the_epoch(tmp_path):
    """The resumed run starts at the epoch's third step, its one micro-batch undivided; the gradient check is off."""
    model, traj = _resume(tmp_path, "sgd")
    assert [traj.batch(s)[0].numel() for s in range(3)] == [1, 12, 12]
    assert [float(traj.batch(s)[1][0]) for s in range(3)] == [1.0, 1 / 12, 1 / 12]
    _assert_exact(model, traj)


# ---------------------------------------------------------------- BERT: label smoothing, dynamic padding
def _bert_items(dynamic: bool) -> list[dict]:
    ids, mask, y = cls_data()
    if dynamic:  # unpadded token lists, padded per batch by the collator
        return [{"input_ids": ids[i][mask[i].bool()].tolist(), "labels": int(y[i])} for i in range(N_TRAIN)]
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(N_TRAIN)]


def _bert_args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-2, weight_decay=0.01, max_grad_norm=1.0, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                             **overrides)


def _smoothed(out: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(out, target, label_smoothing=0.1)


def test_the_trainers_label_smoother_is_exact_with_the_smoothed_loss_callable(tmp_path):
    train = IndexedDataset(_bert_items(dynamic=False))
    model = tiny_bert()
    callback = ExplaindTrainerCallback(train, loss=_smoothed, attention_mask="bidirectional")
    with pytest.warns(ExplaindWarning, match=r"label_smoothing_factor=0.1\) trains this float64 model through the "
                                             r"Trainer's LabelSmoother"):
        Trainer(model=model, args=_bert_args(tmp_path, label_smoothing_factor=0.1), train_dataset=train,
                callbacks=[callback]).train()
    traj = callback.trajectory
    # the LabelSmoother sums the log-probabilities in float32: the gradients match to its rounding (measured up to
    # 5e-9), within the float64 check's tolerance, not to 1e-15
    assert float(np.nanmax(traj.gradient_check())) <= 1e-7  # steps 0 and 1 checked
    assert_classifier_exact(model.eval(), traj, loss_fn=lambda out, t: F.cross_entropy(
        out, t, label_smoothing=0.1, reduction="none"), max_share=1e-8)  # that rounding: measured 9.3e-10


def test_label_smoothing_factor_with_a_named_loss_is_refused_naming_the_smoothed_callable(tmp_path):
    """Before, with the gradient check off, the unsmoothed per-sample gradients were recorded without a word."""
    train = IndexedDataset(_bert_items(dynamic=False))
    callback = ExplaindTrainerCallback(train, loss="cross_entropy", attention_mask="bidirectional",
                                       check_gradients=False)
    trainer = Trainer(model=tiny_bert(), args=_bert_args(tmp_path, label_smoothing_factor=0.1), train_dataset=train,
                      callbacks=[callback])
    with pytest.raises(ConfigError, match=r"label_smoothing_factor=0.1\) makes the Trainer train on the "
                                          r"label-smoothed loss.*loss='cross_entropy'.*Fix: give the callback the "
                                          r"smoothed loss"):
        trainer.train()


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the ids ``"0" .. "29"`` (id 0 pads), built in memory."""
    from tokenizers import Tokenizer, models

    vocab = {str(i): i for i in range(VOCAB)} | {"[UNK]": VOCAB}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   pad_token="0")


def test_dynamic_padding_and_length_grouped_batches_are_exact(tmp_path):
    """``DataCollatorWithPadding`` pads each batch to its longest item; the recorder holds the set padded to the
    longest item of all (``train_data(collate_fn=collator)``), the same function under the attention mask."""
    train = IndexedDataset(_bert_items(dynamic=True))
    collator = DataCollatorWithPadding(_tokenizer())
    widths = []
    callback = ExplaindTrainerCallback(train.train_data(collate_fn=collator, attention_mask="bidirectional"),
                                       loss="cross_entropy", check_gradients=True)
    model = tiny_bert()
    def width(module, args, kwargs):  # the Trainer's training forwards carry the positions (the recorder's do not)
        if "explaind_index" in kwargs:
            widths.append(kwargs["input_ids"].shape[1])

    model.register_forward_pre_hook(width, with_kwargs=True)
    Trainer(model=model, args=_bert_args(tmp_path, train_sampling_strategy="group_by_length"), train_dataset=train,
            data_collator=collator, callbacks=[callback]).train()
    traj = callback.trajectory
    assert len(set(widths)) >= 2  # batches of different widths were trained
    assert max(traj.gradient_check()) <= 1e-12
    assert_classifier_exact(model.eval(), traj)
