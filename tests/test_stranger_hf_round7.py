"""Hugging Face ``Trainer`` as people configure it, round 7: exact, or loud naming the cause and the fix.

Most runs train the float64 MLP of tests/test_trainer_options.py (its own mean loss, 25 samples in batches of 4,
gradient accumulation 3: an epoch of 7 micro-batches has steps of 3, 3 and 1; SGD momentum 0.9, gradient check off
unless a case needs it, through ``_train`` and ``_quiet`` of tests/test_stranger_hf_round5.py). The token runs use
the tiny GPT-2 and BERT of tests/_hf_testkit.py and a tiny T5 built from its config. "Exact": replica <= 1e-6
relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to
the slow float64 loop reference (``MappingReference``). The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_hf_round7.py`` prints them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import indexed
from _hf_stranger_kit import note
from _hf_testkit import (
    N_TRAIN,
    VOCAB,
    MappingReference,
    MappingReplayReference,
    classifier_figures,
    cls_data,
    lm_data,
    lm_figures,
    loop_token_loss,
    tiny_bert,
    tiny_gpt2,
    trainer_args,
)
from reference import rel_err
from test_stranger_hf_round5 import _assert_exact, _assert_replayed_exact, _quiet
from test_trainer_options import KeywordLossMLP, N, OwnLossMLP, _data, _train

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset
from explaind.records import LossRecord

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


def _sizes(traj) -> list[int]:
    return [traj.batch(s)[0].numel() for s in range(traj.n_steps)]


# ---------------------------------------------------------------- resuming
def _checkpoint(tmp_path, **settings) -> None:
    """Two steps of 3 micro-batches of the MLP saved at ``checkpoint-2`` (``save_strategy="steps"``)."""
    X, y = _data()
    transformers.Trainer(model=OwnLossMLP(), args=_quiet(tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                                                         **settings),
                         train_dataset=[{"x": X[i], "labels": y[i]} for i in range(N)]).train()


def _resumed(tmp_path, resume, **settings):
    X, y = _data()
    model = OwnLossMLP()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False)
    transformers.Trainer(model=model, args=_quiet(tmp_path, max_steps=5, save_strategy="steps", save_steps=2,
                                                  **settings),
                         train_dataset=indexed(X, y), callbacks=[callback]).train(resume_from_checkpoint=resume)
    return model.eval(), callback.trajectory


def test_resuming_with_ignore_data_skip_restarts_the_epoch_and_is_exact(tmp_path):
    """``ignore_data_skip=True``: the resumed run starts a fresh epoch (steps of 3, 3, 1 micro-batches) at step 2,
    where the run it resumes was at its epoch's last step (1 micro-batch)."""
    _checkpoint(tmp_path)
    model, traj = _resumed(tmp_path, str(tmp_path / "checkpoint-2"), ignore_data_skip=True)
    assert _sizes(traj) == [12, 12, 1]
    assert [float(traj.batch(s)[1][0]) for s in range(3)] == [1 / 12, 1 / 12, 1.0]
    _assert_exact(model, traj)


def test_resuming_the_latest_checkpoint_with_a_linear_schedule_and_adamw_is_exact(tmp_path):
    """``resume_from_checkpoint=True`` finds ``checkpoint-2`` itself; the linear schedule's state and AdamW's moments
    come back with it (the moments' part of the resumed updates is the ``initial_state`` term)."""
    settings = dict(optim="adamw_torch", optim_args=None, lr_scheduler_type="linear", learning_rate=0.05,
                    weight_decay=0.1)
    _checkpoint(tmp_path, **settings)
    model, traj = _resumed(tmp_path, True, **settings)
    assert _sizes(traj) == [1, 12, 12] and traj.initial_state()
    _assert_exact(model, traj)




# ---------------------------------------------------------------- the loss: label smoothing, a compute_loss override
def _smoothed_tokens(logits, labels, eps: float = 0.1):
    """Per-sequence mean over the shifted labels that are not -100 of (1 - eps) NLL + eps mean_v(-log p) (the
    Trainer's LabelSmoother, per sample), vectorised: the recorder's loss."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    active = target != -100
    nll = -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
    per_token = (1 - eps) * nll - eps * logp.mean(-1)
    return (per_token * active).sum(1) / active.sum(1).clamp_min(1)


def _loop_smoothed_tokens(logits, labels, eps: float = 0.1):
    """The same loss one position at a time (the reference's, written independently)."""
    out = []
    for k in range(logits.shape[0]):
        terms = []
        for j in range(labels.shape[1] - 1):
            label = int(labels[k, j + 1])
            if label != -100:
                logp = torch.log_softmax(logits[k, j], dim=-1)
                terms.append((1 - eps) * -logp[label] + eps * -logp.sum() / logp.numel())
        out.append(torch.stack(terms).mean() if terms else logits.sum() * 0)
    return torch.stack(out)


def _token_counts(labels):
    """Counted next-token terms per sequence, (n,): the shifted labels that are not -100."""
    return (labels[:, 1:] != -100).sum(1)


def test_label_smoothing_on_a_causal_lm_with_minus_100_labels_is_exact_to_the_smoothers_float32_sum(tmp_path):
    """``label_smoothing_factor=0.1`` on GPT-2 (the Trainer's LabelSmoother shifts the labels of a causal LM and
    divides by the step's ``num_items_in_batch``), accumulation 2 over micro-batches of unequal token counts; the
    callback is given the smoothed per-sequence token loss with its token counts. The smoother sums the
    log-probabilities in float32 (``dtype=torch.float32``): the residual share is that rounding (measured 4.3e-9),
    which the callback now warns about when training starts, naming the exact route (tests/test_stranger_hf_round8.py
    measures it at rounding level)."""
    ids, labels = lm_data()
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(N_TRAIN)])
    model = tiny_gpt2()
    loss = LossRecord(name="smoothed_causal_lm", implementation=_smoothed_tokens, counts=_token_counts)
    callback = ExplaindTrainerCallback(data, loss=loss, check_gradients=False)
    with pytest.warns(ExplaindWarning, match=r"LabelSmoother, which sums the log-probabilities with dtype=torch."
                                             r"float32.*Fix: label_smoothing_factor=0, compute_loss_func="):
        transformers.Trainer(model=model, args=trainer_args(tmp_path, per_device_train_batch_size=4, max_steps=3,
                                                            gradient_accumulation_steps=2, learning_rate=1e-2,
                                                            label_smoothing_factor=0.1),
                             train_dataset=data, callbacks=[callback]).train()
    traj = callback.trajectory
    test_ids, test_labels = lm_data(3, seed=9)
    X = {"input_ids": test_ids}
    with torch.no_grad():
        truth = model.eval()(**X).logits.reshape(3, -1)
    replica = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth)
    att = explaind.InfluenceEstimator(keep=("train",), target="loss", tol=1e-11, device="cpu").fit(traj).transform(
        X, test_labels)
    ref = MappingReplayReference(traj, X, target="loss", y=test_labels, loss_fn=_loop_smoothed_tokens)
    train = rel_err(att.values, ref.kept(("train",)))
    note(replica=replica, share=att.meta["residual_share"], train=train,
         outcome="loud: ExplaindWarning; exact to the LabelSmoother's float32 sum")
    assert replica <= 1e-6 and att.meta["residual_share"] <= 1e-8 and train <= 1e-9


class ItemsLossTrainer(transformers.Trainer):
    """A ``compute_loss`` override that sums the batch's cross entropy and divides by ``num_items_in_batch``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels, reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())
        return (loss, outputs) if return_outputs else loss


def test_a_compute_loss_override_dividing_by_num_items_in_batch_is_refused_by_the_check_naming_it(tmp_path):
    """The model takes loss keyword arguments, so the Trainer does not divide the override's loss by the 7
    accumulated micro-batches (4 x 6 and 1 samples): each sample weighs 1/25, not its micro-batch's mean / 7 as the
    callback logs it, and no single factor per step relates them. Before, the gradient check's error named
    ``capture_random`` first and nothing of the Trainer; now it names the override and the fix, which is exact."""
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match.*training "
                                              r"forward received no num_items_in_batch.*Fix: return "
                                              r"callback.compute_loss\(outputs, labels, num_items_in_batch\)"):
        _train(tmp_path, KeywordLossMLP(), trainer_cls=ItemsLossTrainer, gradient_accumulation_steps=7, max_steps=2,
               callback_kwargs={"check_gradients": True})
    note(outcome="loud: TrajectoryError (gradient check)")

    class Fixed(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = self.callback.compute_loss(outputs, labels, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    X, y = _data()
    model = KeywordLossMLP()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=True)
    trainer = Fixed(model=model, args=_quiet(tmp_path, gradient_accumulation_steps=7, max_steps=2),
                    train_dataset=indexed(X, y), callbacks=[callback])
    trainer.callback = callback
    trainer.train()
    traj = callback.trajectory
    assert _sizes(traj) == [25, 25] and max(traj.gradient_check()) <= 1e-12
    _assert_exact(model.eval(), traj, outcome="loud: the check names the override; exact with callback.compute_loss")


# ---------------------------------------------------------------- batches: packing, fractions of an epoch, sizes
def test_the_flattening_collator_packing_each_batch_into_one_row_is_exact(tmp_path):
    """``DataCollatorWithFlattening`` concatenates a batch's unpadded sequences into one row with ``position_ids``
    restarting at every sequence (padding-free training); the model keeps the sequences apart by those positions,
    so the recorder's padded rows give the same per-sample gradients (checked at every step). Given the packing
    collator, ``train_data`` refuses its one row for 24 items naming the fix (before: a raw ``IndexError`` from the
    recorder's first step)."""
    ids, labels = lm_data()
    keep = labels != -100
    data = IndexedDataset([{"input_ids": ids[i][keep[i]].tolist(), "labels": labels[i][keep[i]].tolist()}
                           for i in range(N_TRAIN)])
    with pytest.raises(ConfigError, match=r"collate_fn=DataCollatorWithFlattening returned \{'input_ids': \(1, 134\).*"
                                          r"for 24 items, not one row per item.*Fix: pass a collator that pads"):
        data.train_data(collate_fn=transformers.DataCollatorWithFlattening())
    model = tiny_gpt2()
    widths = []
    model.register_forward_pre_hook(lambda m, a, k: widths.append(tuple(k["input_ids"].shape))
                                    if "explaind_index" in k else None, with_kwargs=True)
    callback = ExplaindTrainerCallback(({"input_ids": ids}, labels), loss="causal_lm", check_gradients=True)
    transformers.Trainer(model=model, args=trainer_args(tmp_path, per_device_train_batch_size=4, max_steps=3,
                                                        learning_rate=1e-2, remove_unused_columns=False),
                         train_dataset=data, data_collator=transformers.DataCollatorWithFlattening(),
                         callbacks=[callback], compute_loss_func=callback.compute_loss).train()
    assert all(w[0] == 1 for w in widths)  # one packed row per batch
    assert max(callback.trajectory.gradient_check()) <= 1e-12
    got = lm_figures(model, callback.trajectory)
    note(replica=got["replica"], share=got["residual_share"], train=got["train"],
         outcome="exact with padded rows; loud: ConfigError from train_data(collate_fn=the packing collator)")
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train"] <= 1e-9


def test_half_an_epoch_stops_inside_the_first_epoch_and_is_exact(tmp_path):
    """``num_train_epochs=0.5``: the Trainer runs ceil(0.5 x 3) = 2 of the epoch's 3 steps."""
    model, traj, trainer = _train(tmp_path, max_steps=-1, num_train_epochs=0.5,
                                  callback_kwargs={"check_gradients": False})
    assert trainer.state.global_step == 2 and _sizes(traj) == [12, 12]
    _assert_exact(model, traj)


def test_auto_find_batch_size_is_exact(tmp_path):
    """``auto_find_batch_size=True`` runs the training loop inside accelerate's batch-size search (no memory error on
    the CPU, so the size stays 4)."""
    model, traj, _ = _train(tmp_path, auto_find_batch_size=True, callback_kwargs={"check_gradients": False})
    assert _sizes(traj) == [12, 12, 1, 12]
    _assert_exact(model, traj)


def test_sgd_with_the_trainers_weight_decay_spares_biases_and_layer_norms_and_is_exact(tmp_path):
    """``optim="sgd"`` with ``weight_decay=0.1`` on BERT: the Trainer's group without decay holds every bias and
    LayerNorm weight (14 tensors), the other the 11 weight matrices and embeddings."""
    ids, mask, y = cls_data()
    data = IndexedDataset([{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(N_TRAIN)])
    model = tiny_bert()
    callback = ExplaindTrainerCallback(data, loss="cross_entropy", attention_mask="bidirectional",
                                       check_gradients=True)
    trainer = transformers.Trainer(model=model, args=trainer_args(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3, learning_rate=0.05,
        optim="sgd", weight_decay=0.1), train_dataset=data, callbacks=[callback])
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    spared = [names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert len(spared) == 14 and all(n.endswith("bias") or "LayerNorm" in n for n in spared)
    got = classifier_figures(model.eval(), callback.trajectory)
    note(replica=got["replica"], share=got["residual_share"], train=got["train"])
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train"] <= 1e-9


# ---------------------------------------------------------------- evaluation between the recorded steps
def test_evaluation_at_the_start_and_every_two_steps_keeps_a_dropout_run_exact(tmp_path):
    """``eval_on_start=True`` evaluates before the first step (model.eval() and back); the dropout masks of every
    micro-batch are replayed by the check and by the reference (``MappingReplayReference``)."""
    model, traj, trainer = _train(tmp_path, OwnLossMLP(dropout=0.3), evaluate=True, eval_strategy="steps",
                                  eval_steps=2, eval_on_start=True, callback_kwargs={"check_gradients": True})
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 3  # before step 0, after 2 and 4
    assert max(traj.gradient_check()) <= 1e-12
    _assert_replayed_exact(model, traj)


def test_evaluating_on_the_training_set_itself_is_exact(tmp_path):
    """``eval_dataset`` is the callback's ``IndexedDataset``: its evaluation batches carry the positions too (the
    Trainer's default collator keeps them), and the callback leaves them out of the logged micro-batches."""
    X, y = _data()
    train = indexed(X, y)
    model = OwnLossMLP()
    callback = ExplaindTrainerCallback(train, loss="cross_entropy", check_gradients=False)
    trainer = transformers.Trainer(model=model, args=_quiet(tmp_path, eval_strategy="steps", eval_steps=1),
                                   train_dataset=train, eval_dataset=train, callbacks=[callback])
    trainer.train()
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 4
    assert _sizes(callback.trajectory) == [12, 12, 1, 12]
    _assert_exact(model.eval(), callback.trajectory)


def _t5():
    """T5, one encoder and one decoder layer, 8-wide, gated GELU, every dropout 0, float64 norms."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                                num_heads=2, relative_attention_num_buckets=4, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                                feed_forward_proj="gated-gelu")  # smooth: the reference has no kinks to split at
    model = transformers.T5ForConditionalGeneration(cfg).to(torch.float64)
    for module in list(model.modules()):  # T5's norms compute their variance in float32: float64 twins
        for name, child in list(module.named_children()):
            if type(child).__name__ == "T5LayerNorm":
                norm = torch.nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, dtype=torch.float64)
                setattr(module, name, norm)
    return model


def test_seq2seq_trainer_t5_generating_at_every_evaluation_is_exact(tmp_path):
    """``Seq2SeqTrainer`` with ``predict_with_generate=True``: generation (evaluation mode, no gradients) between the
    steps; T5 trains on its own token loss and the callback records the decoder inputs it builds from the labels.
    T5's loss is the micro-batch's token mean whatever ``num_items_in_batch`` it is passed, and the Trainer, seeing
    loss keyword arguments, does not divide it by the 2 accumulated micro-batches: the callback's default weights
    (the step's token shares) are refused by the check naming ``normalization='micro_batch'``, with which the factor
    2 of every step is measured and the run is exact."""
    gen = torch.Generator().manual_seed(4)
    src, labels = torch.randint(2, VOCAB, (N_TRAIN + 2, 6), generator=gen), torch.randint(2, VOCAB, (N_TRAIN + 2, 4),
                                                                                          generator=gen)
    labels[::3, -1] = -100
    data = IndexedDataset([{"input_ids": src[i], "labels": labels[i]} for i in range(N_TRAIN)])
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0, eval_strategy="steps", eval_steps=1, predict_with_generate=True,
        generation_max_length=4, per_device_eval_batch_size=4)
    held_out = [{"input_ids": src[i], "labels": labels[i]} for i in range(4)]
    callback = ExplaindTrainerCallback(data, loss="token_cross_entropy", check_gradients=True)
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match.*"
                                              r"normalization='auto' chose 'step'.*Fix: "
                                              r"ExplaindTrainerCallback\(\.\.\., normalization='micro_batch', "
                                              r"check_gradients=True\)"):
        transformers.Seq2SeqTrainer(model=_t5(), args=args, train_dataset=data, callbacks=[callback],
                                    eval_dataset=held_out).train()
    note(outcome="loud: TrajectoryError (gradient check); exact with normalization='micro_batch'")
    model = _t5()
    callback = ExplaindTrainerCallback(data, loss="token_cross_entropy", check_gradients=True,
                                       normalization="micro_batch")
    trainer = transformers.Seq2SeqTrainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                                          eval_dataset=held_out)
    trainer.train()
    traj = callback.trajectory
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 3
    assert max(traj.gradient_check()) <= 1e-12
    X = {"input_ids": src[N_TRAIN:], "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(
        labels[N_TRAIN:])}
    with torch.no_grad():
        truth = model.eval()(**X).logits.reshape(2, -1)
    target = [VOCAB + 3, 2 * VOCAB + 5]  # per test input: one logit at the second and third decoder position
    replica = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth)
    att = explaind.InfluenceEstimator(keep=("train",), target=target, tol=1e-11, device="cpu").fit(traj).transform(X)
    ref = MappingReference(traj, X, loss_fn=lambda out, t: loop_token_loss(out, t, shift=False), target=target,
                           panels=4)
    assert float(ref.quad_error.abs().max()) <= 1e-11
    train = rel_err(att.values, ref.kept(("train",)))
    note(replica=replica, share=att.meta["residual_share"], train=train)
    assert replica <= 1e-6 and att.meta["residual_share"] <= 1e-9 and train <= 1e-9
