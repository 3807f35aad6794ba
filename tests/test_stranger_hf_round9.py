"""Hugging Face ``Trainer`` as people configure it, round 9: exact, or loud naming the cause and the fix.

The runs train the float64 MLP of tests/test_trainer_options.py (its own mean loss, 25 samples in batches of 4,
gradient accumulation 3: an epoch of 7 micro-batches has steps of 3, 3 and 1; SGD momentum 0.9, gradient check off
so that nothing it measures hides a wrong weight, through ``_train`` and ``_assert_exact`` of
tests/test_stranger_hf_round5.py). "Exact": replica <= 1e-6 relative to the trained model in evaluation mode,
residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference
(``MappingReference``). The figures go to ``_hf_stranger_kit.MEASURED`` (``python tests/hf_strangers_table.py
test_stranger_hf_round9.py`` prints them).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from _framework_testkit import NoisyItems
from _hf_stranger_kit import note
from _hf_testkit import N_TRAIN, lm_data, lm_figures, run_args, tiny_gpt2
from test_stranger_hf_round5 import _assert_exact, _assert_replayed_exact, _quiet
from test_stranger_hf_round7 import _sizes
from test_trainer_options import LearningRates, OwnLossMLP, _data, _train

from explaind.exceptions import ConfigError, ExplaindWarning
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

OPTIONS = {  # TrainingArguments no other test sets
    "cosine_warmup_with_min_lr": dict(lr_scheduler_type="cosine_warmup_with_min_lr", warmup_steps=2, max_steps=6,
                                      lr_scheduler_kwargs={"min_lr_rate": 0.1}),
    "warmup_stable_decay_1_sqrt": dict(lr_scheduler_type="warmup_stable_decay", warmup_steps=1, max_steps=6,
                                       lr_scheduler_kwargs={"num_decay_steps": 3, "decay_type": "1-sqrt",
                                                            "min_lr_ratio": 0.2}),
    "greedy_on_eval_loss": dict(lr_scheduler_type="greedy", max_steps=6, eval_strategy="steps", eval_steps=1,
                                lr_scheduler_kwargs={"patience": 1, "factor": 0.5}),
    "split_batches": dict(accelerator_config={"split_batches": True}),
    "uneven_batches": dict(accelerator_config={"even_batches": False, "non_blocking": True}),
    "persistent_workers_two_epochs": dict(dataloader_num_workers=2, dataloader_persistent_workers=True,
                                          dataloader_prefetch_factor=1, max_steps=-1, num_train_epochs=2),
    "logging_first_step": dict(logging_strategy="steps", logging_steps=2, logging_first_step=True),
    "sequential_sampling": dict(train_sampling_strategy="sequential"),
    "sgd_maximize": dict(optim_args="momentum=0.9,maximize=True", learning_rate=0.01),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_trainer_options_are_exact(tmp_path, option):
    rates = LearningRates()
    model, traj, trainer = _train(tmp_path, callback_kwargs={"check_gradients": False}, extra_callbacks=[rates],
                                  evaluate="eval_strategy" in OPTIONS[option], **OPTIONS[option])
    steps = trainer.state.global_step
    if option == "greedy_on_eval_loss":
        assert len(set(rates.rates)) > 1  # the greedy schedule moved the rate

    assert traj.n_steps == steps and _sizes(traj)[:4] == [12, 12, 1, 12][:min(steps, 4)]
    _assert_exact(model, traj)


def test_optimizer_cls_and_kwargs_given_to_the_trainer_is_exact(tmp_path):
    """``Trainer(optimizer_cls_and_kwargs=(torch.optim.SGD, {...}))``: the Trainer builds that optimizer over its
    parameter groups (weight decay 0.01 on the weights, none on the biases) with Nesterov momentum."""
    trainer_cls = functools.partial(transformers.Trainer, optimizer_cls_and_kwargs=(
        torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "lr": 0.1}))
    model, traj, trainer = _train(tmp_path, trainer_cls=trainer_cls, weight_decay=0.01,
                                  callback_kwargs={"check_gradients": False})
    groups = trainer.optimizer.param_groups
    assert type(trainer.optimizer.optimizer) is torch.optim.SGD and groups[0]["nesterov"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01]
    _assert_exact(model, traj)


def test_dropout_with_dataloader_worker_processes_over_two_epochs_is_exact(tmp_path):
    """Two worker processes: each epoch's loader draws the workers' base seed from the main generator between the
    training forwards, whose dropout states the callback captures per micro-batch (gradient check every step)."""
    model, traj, _ = _train(tmp_path, OwnLossMLP(dropout=0.3), max_steps=-1, num_train_epochs=2,
                            dataloader_num_workers=2, callback_kwargs={"check_gradients": True})
    assert traj.n_steps == 6 and max(traj.gradient_check()) <= 1e-12
    _assert_replayed_exact(model, traj)


def test_evaluation_every_epoch_with_batch_eval_metrics_keeps_a_dropout_run_exact(tmp_path):
    """Dropout 0.3, two epochs, evaluation (in evaluation mode, on a batch metric) at the end of each epoch and
    ``eval_accumulation_steps=1``; the gradient check replays every micro-batch's masks."""
    calls = []

    def metric(pred, compute_result):
        calls.append(compute_result)
        return {"n": float(len(calls))} if compute_result else None

    model, traj, trainer = _train(
        tmp_path, OwnLossMLP(dropout=0.3), trainer_cls=functools.partial(transformers.Trainer, compute_metrics=metric),
        evaluate=True, max_steps=-1, num_train_epochs=2, eval_strategy="epoch", batch_eval_metrics=True,
        eval_accumulation_steps=1, callback_kwargs={"check_gradients": True})
    assert traj.n_steps == 6 and calls.count(True) == 2 and max(traj.gradient_check()) <= 1e-12
    _assert_replayed_exact(model, traj)


def test_worker_processes_drawing_random_augmentation_are_refused(tmp_path):
    """``dataloader_num_workers=2`` over a dataset whose ``__getitem__`` adds fresh noise: each worker process
    draws from its own seed, so the model trains on other inputs than any the callback can hold. Refused at the
    first micro-batch, with the check off too, naming the augmentation and the fix."""
    train = IndexedDataset(NoisyItems(*_data()))
    callback = ExplaindTrainerCallback(train, loss="cross_entropy", check_gradients=False)
    trainer = transformers.Trainer(model=OwnLossMLP(), args=_quiet(tmp_path, dataloader_num_workers=2),
                                   train_dataset=train, callbacks=[callback])
    with pytest.raises(ConfigError, match=r"micro-batch 1: the model received 'x' that differ from the recorded "
                                          r"training items.*random augmentation.*Fix: draw the masks or "
                                          r"augmentations once, before training"):
        trainer.train()
    note(outcome="loud: ConfigError (augmentation in worker processes)")


@pytest.mark.parametrize("loss", ["models_own", "compute_loss_func"])
def test_a_float64_causal_lm_on_transformers_own_loss_is_warned_and_exact_through_compute_loss_func(tmp_path, loss):
    """transformers' ``ForCausalLMLoss`` calls ``logits.float()``: a float64 GPT-2 trained on its own loss trains on
    float32-rounded gradients (gradient check above 1e-9, inside the float64 tolerance). Before: no word; now an
    ``ExplaindWarning`` at the first backward naming the loss and ``compute_loss_func=callback.compute_loss``, with
    which the run is exact and not warned."""
    ids, labels = lm_data()
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(N_TRAIN)])
    model = tiny_gpt2()
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    trainer = transformers.Trainer(model=model, args=run_args(tmp_path, max_steps=3), train_dataset=data,
                                   callbacks=[callback],
                                   compute_loss_func=callback.compute_loss if loss == "compute_loss_func" else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        trainer.train()
    rounded = [str(w.message) for w in caught if "rounded to float32" in str(w.message)]
    figures = lm_figures(model, callback.trajectory)
    if loss == "models_own":
        assert len(rounded) == 1 and "ForCausalLMLoss" in rounded[0]
        assert "compute_loss_func=callback.compute_loss" in rounded[0]
        assert 1e-9 < max(callback.trajectory.gradient_check()) < 1e-7
        note(replica=figures["replica"], share=figures["residual_share"], train=figures["train"],
             outcome="loud: ExplaindWarning (the model's loss calls logits.float())")
        assert figures["residual_share"] > 1e-12  # the float32 rounding, far above float64's
    else:
        assert not rounded and max(callback.trajectory.gradient_check()) <= 1e-12
        note(replica=figures["replica"], share=figures["residual_share"], train=figures["train"])
        assert figures["replica"] <= 1e-6 and figures["residual_share"] <= 1e-12 and figures["train"] <= 1e-9
