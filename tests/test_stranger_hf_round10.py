"""Hugging Face ``Trainer`` as people configure it, round 10: exact, or loud naming the cause and the fix.

The MLP runs train the float64 MLP of tests/test_trainer_options.py (its own mean loss, 25 samples in batches of 4,
gradient accumulation 3: steps of 3, 3 and 1 micro-batches; SGD momentum 0.9 unless an option says otherwise),
through ``_train`` and ``_assert_exact`` of tests/test_stranger_hf_round5.py; the dropout runs (p=0.3) check every
step's gradient and compare with the loop reference that replays the recorded masks. The token runs train the tiny
GPT-2 of tests/_hf_testkit.py. "Exact": replica <= 1e-6 relative to the trained model in evaluation mode, residual
share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference. The figures go to
``_hf_stranger_kit.MEASURED`` (``python tests/hf_strangers_table.py test_stranger_hf_round10.py`` prints them).

Not here: ``TrainingArguments(group_by_length=True)`` is gone from transformers 5 (its successor,
``train_sampling_strategy="group_by_length"``, is checked in tests/test_trainer_options.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _hf_stranger_kit import note
from _hf_testkit import N_TRAIN, lm_data, lm_figures, run_args, tiny_bert, tiny_gpt2
from test_stranger_hf_gc import PlainReplayReference, _assert_figures, _dropout_gpt2
from test_stranger_hf_round5 import _assert_exact, _assert_replayed_exact
from test_stranger_hf_round7 import _sizes
from test_trainer_options import LearningRates, OwnLossMLP, _bert_args, _bert_items, _tokenizer, _train

from explaind.exceptions import ConfigError, ExplaindWarning
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

OPTIONS = {  # TrainingArguments no other test sets in this combination
    "cosine_with_restarts_three_cycles": dict(lr_scheduler_type="cosine_with_restarts", max_steps=6,
                                              lr_scheduler_kwargs={"num_cycles": 3}),
    "polynomial_warmup_square_root": dict(lr_scheduler_type="polynomial", warmup_steps=2, max_steps=6,
                                          lr_scheduler_kwargs={"power": 0.5, "lr_end": 1e-2}),
    "adamw_torch_fused_amsgrad": dict(optim="adamw_torch_fused", optim_args="amsgrad=True", weight_decay=0.1,
                                      learning_rate=0.05),
    "adafactor_clipped": dict(optim="adafactor", optim_args=None, learning_rate=0.05, max_grad_norm=0.05),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_trainer_options_are_exact(tmp_path, option):
    rates = LearningRates()
    model, traj, trainer = _train(tmp_path, callback_kwargs={"check_gradients": False}, extra_callbacks=[rates],
                                  **OPTIONS[option])
    steps = trainer.state.global_step
    assert traj.n_steps == steps and _sizes(traj)[:4] == [12, 12, 1, 12][:min(steps, 4)]
    if "lr_scheduler_type" in OPTIONS[option]:
        assert len(set(rates.rates)) >= 2  # the schedule moved the rate within the run
    if option == "adafactor_clipped":
        assert all(traj.grad_scale(s) < 1 for s in range(traj.n_steps))  # the clipping acted at every step
    _assert_exact(model, traj)


DROPOUT = {  # each with dropout 0.3 and the gradient check at every step
    "eval_every_step": dict(eval_strategy="steps", eval_steps=1),
    "prediction_loss_only": dict(eval_strategy="steps", eval_steps=2, prediction_loss_only=True),
    "reduce_lr_on_plateau": dict(lr_scheduler_type="reduce_lr_on_plateau", learning_rate=1.0, eval_strategy="steps",
                                 eval_steps=1, max_steps=6, lr_scheduler_kwargs={"patience": 0, "factor": 0.5}),
    "torch_compile_aot_eager": dict(torch_compile=True, torch_compile_backend="aot_eager"),
}


@pytest.mark.parametrize("option", sorted(DROPOUT))
def test_dropout_runs_with_evaluation_schedules_and_compile_are_exact(tmp_path, option):
    """Evaluation forwards (evaluation mode, no gradient) between the training steps do not move the random state
    the recorded masks are replayed from; ``torch.compile`` of the dropout model replays the same masks."""
    rates = LearningRates()
    settings = DROPOUT[option]
    model, traj, _ = _train(tmp_path, OwnLossMLP(dropout=0.3), evaluate="eval_strategy" in settings,
                            extra_callbacks=[rates], callback_kwargs={"check_gradients": True}, **settings)
    if option == "reduce_lr_on_plateau":
        assert len(set(rates.rates)) >= 2  # the plateau schedule halved the rate
    assert max(traj.gradient_check()) <= 1e-12
    _assert_replayed_exact(model, traj)


def _lm_items(labels: bool = True) -> IndexedDataset:
    ids, targets = lm_data()
    return IndexedDataset([{"input_ids": ids[i], **({"labels": targets[i]} if labels else {})}
                           for i in range(N_TRAIN)])


def test_causal_lm_collator_is_exact_through_the_recorded_collation(tmp_path):
    """``DataCollatorForLanguageModeling(mlm=False)`` copies the ids into the labels (``-100`` at the padding): no
    random draw, so the callback given ``train_data(collate_fn=collator)`` holds the batches the model trained on."""
    data = _lm_items(labels=False)
    collator = transformers.DataCollatorForLanguageModeling(_tokenizer(), mlm=False)
    model = tiny_gpt2()
    callback = ExplaindTrainerCallback(data.train_data(collate_fn=collator), loss="causal_lm", check_gradients=True)
    transformers.Trainer(model=model, args=run_args(tmp_path, max_steps=3), train_dataset=data, data_collator=collator,
                         callbacks=[callback], compute_loss_func=callback.compute_loss).train()
    assert max(callback.trajectory.gradient_check()) <= 1e-12
    _assert_figures(lm_figures(model, callback.trajectory))


def test_gradient_checkpointing_without_reentrant_and_dropout_is_exact(tmp_path):
    """``gradient_checkpointing=True`` with ``gradient_checkpointing_kwargs={"use_reentrant": False}``: the
    recomputed forward of each block redraws the masks from the restored state, which the callback replays."""
    data = _lm_items()
    model = _dropout_gpt2()
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    args = run_args(tmp_path, max_steps=2, gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                         compute_loss_func=callback.compute_loss).train()
    assert model.is_activation_checkpointing
    assert max(callback.trajectory.gradient_check()) <= 1e-7
    _assert_figures(lm_figures(model.eval(), callback.trajectory, reference=PlainReplayReference))


def test_torch_compile_of_a_model_whose_own_loss_casts_to_float32_is_still_warned(tmp_path):
    """``torch_compile=True``: GPT-2's own loss (``logits.float()``) runs in the compiled forward; the probe of the
    output gradient still sees it (its hooks break the graph there), warns once and notes it in the run."""
    data = _lm_items()
    model = tiny_gpt2()
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    trainer = transformers.Trainer(model=model, args=run_args(tmp_path, max_steps=3, torch_compile=True,
                                                              torch_compile_backend="aot_eager"),
                                   train_dataset=data, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        trainer.train()
    rounded = [str(w.message) for w in caught if "rounded to float32" in str(w.message)]
    assert len(rounded) == 1 and "compute_loss_func=callback.compute_loss" in rounded[0]
    assert "GPT2LMHeadModel" in callback.trajectory.manifest.extras["output_rounding"]
    figures = lm_figures(model, callback.trajectory)
    note(replica=figures["replica"], share=figures["residual_share"], train=figures["train"],
         outcome="loud: ExplaindWarning (own loss casts to float32, compiled)")
    assert figures["residual_share"] > 1e-12


def test_neftune_on_a_sequence_classifier_is_refused(tmp_path):
    """NEFTune on BERT's embeddings (not only on a causal LM): refused before the first step, naming the fix."""
    train = IndexedDataset(_bert_items(dynamic=False))
    callback = ExplaindTrainerCallback(train, loss="cross_entropy")
    trainer = transformers.Trainer(model=tiny_bert(), args=_bert_args(tmp_path, neftune_noise_alpha=5.0),
                                   train_dataset=train, callbacks=[callback])
    with pytest.raises(ConfigError, match=r"neftune_noise_alpha=5.0\) adds noise to the embeddings.*Fix: train with "
                                          r"neftune_noise_alpha=None"):
        trainer.train()
    note(outcome="loud: ConfigError (NEFTune noise)")


def test_inductor_compile_of_a_dropout_model_is_refused_naming_fallback_random(tmp_path):
    """``torch_compile=True`` with the default backend, inductor, draws dropout masks from inductor's own generator.
    Before: the first gradient check failed (relative difference 0.557) listing causes that did not name the
    compiler; now a ``ConfigError`` at the start of training naming the backend, the layers and the fixes."""
    import torch._inductor.config as inductor_config

    refusal = (r"torch_compile=True\) compiles the model with the 'inductor' backend.*net.2.*Fix: "
               r"torch._inductor.config.fallback_random = True")
    with inductor_config.patch(fallback_random=False), pytest.raises(ConfigError, match=refusal):
        _train(tmp_path, OwnLossMLP(dropout=0.3), torch_compile=True, callback_kwargs={"check_gradients": True})
    note(outcome="loud: ConfigError (inductor's own dropout masks)")


def test_inductor_compile_of_a_dropout_model_with_fallback_random_is_exact(tmp_path):
    """The first fix the refusal names: inductor draws as eager torch does, the recorded masks replay."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # no frame compiled without fallback_random is reused
    with inductor_config.patch(fallback_random=True):
        model, traj, _ = _train(tmp_path, OwnLossMLP(dropout=0.3), torch_compile=True,
                                callback_kwargs={"check_gradients": True})
    assert max(traj.gradient_check()) <= 1e-12
    _assert_replayed_exact(model, traj)
