"""Hugging Face ``Trainer`` and accelerate as people use them, round 12: exact, or loud naming the cause and the fix.

The Trainer runs train the float64 MLP of tests/test_trainer_options.py (its own mean loss, 25 samples in batches of
4, gradient accumulation 3: steps of 3, 3 and 1 micro-batches; SGD momentum 0.9 unless a case says otherwise) through
``_train`` of that file, with the gradient check off unless a case says otherwise, so that nothing it measures hides
a wrong weight. The accelerate runs are the loop of accelerate's documentation over an ``IndexedDataset``
(tests/_frameworks12_kit.py). "Exact" is ``_assert_exact`` of tests/test_stranger_hf_round5.py: replica <= 1e-6
relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to
the slow float64 loop reference (``MappingReference``; ``MappingReplayReference`` where the run draws random numbers).
The figures go to ``_hf_stranger_kit.MEASURED`` (``python tests/frameworks_round12_table.py`` prints them).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import indexed
from _frameworks12_kit import (
    NoisyEmbeddingClassifier,
    accelerate_loop,
    accelerate_resumed_mid_epoch,
    reset_accelerate,
    token_items,
)
from _hf_stranger_kit import note
from _hf_testkit import MappingReference, MappingReplayReference
from reference import rel_err
from test_stranger_hf_round5 import _assert_exact, _quiet
from test_trainer_options import LearningRates, N, OwnLossMLP, _data, _train

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
              pytest.mark.filterwarnings("ignore::UserWarning:accelerate"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test starts and ends with no accelerator state (accelerate refuses another precision without a reset)."""
    reset_accelerate()
    yield
    reset_accelerate()


def _sizes(traj) -> list[int]:
    return [traj.batch(s)[0].numel() for s in range(traj.n_steps)]


# ---------------------------------------------------------------- Trainer options in combinations not run before
OPTIONS = {  # TrainingArguments on top of _train's; gradient check off
    "adamw_fused_cosine_restarts_clipped": dict(
        optim="adamw_torch_fused", optim_args=None, weight_decay=0.05, learning_rate=0.05, max_steps=6,
        lr_scheduler_type="cosine_with_restarts", warmup_steps=1, lr_scheduler_kwargs={"num_cycles": 2},
        max_grad_norm=0.05),
    "sgd_nesterov_polynomial_warmup_decay": dict(
        optim_args="momentum=0.9,nesterov=True", weight_decay=0.01, max_steps=6, lr_scheduler_type="polynomial",
        warmup_steps=2, lr_scheduler_kwargs={"power": 1.5, "lr_end": 0.01}),
    "adafactor_cosine_clipped": dict(optim="adafactor", optim_args=None, learning_rate=0.05, max_steps=6,
                                     lr_scheduler_type="cosine", max_grad_norm=0.1),
    "adamw_accumulation_4_no_clipping": dict(optim="adamw_torch", optim_args=None, learning_rate=0.05,
                                             gradient_accumulation_steps=4, max_steps=4, max_grad_norm=0.0),
    "adamw_plateau_evaluated_every_2_steps": dict(
        optim="adamw_torch", optim_args=None, learning_rate=0.5, max_steps=8, lr_scheduler_type="reduce_lr_on_plateau",
        eval_strategy="steps", eval_steps=2, lr_scheduler_kwargs={"patience": 0, "factor": 0.5}),
    "compiled_adamw_clipped": dict(optim="adamw_torch", optim_args=None, learning_rate=0.05, max_grad_norm=0.05,
                                   torch_compile=True, torch_compile_backend="aot_eager"),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_trainer_options_in_combination_are_exact(tmp_path, option):
    rates = LearningRates()
    settings = OPTIONS[option]
    model, traj, trainer = _train(tmp_path, callback_kwargs={"check_gradients": False}, extra_callbacks=[rates],
                                  evaluate="eval_strategy" in settings, **settings)
    assert traj.n_steps == trainer.state.global_step
    if option == "adamw_accumulation_4_no_clipping":  # epochs of 7 micro-batches: steps of 4 and 3
        assert _sizes(traj) == [16, 9, 16, 9]
        assert float(traj.batch(1)[1][0]) == pytest.approx(1 / 12, abs=1e-15)  # the Trainer divides by 3 there
    if "clipped" in option:
        assert all(traj.grad_scale(s) < 1 for s in range(traj.n_steps))
    if "lr_scheduler_type" in settings:
        assert len(set(rates.rates)) >= 2  # the schedule moved the rate within the run
    _assert_exact(model, traj)


class SmoothedLossTrainer(transformers.Trainer):
    """A ``compute_loss`` override with label smoothing written in (``F.cross_entropy(..., label_smoothing=0.1)``,
    the micro-batch mean), as people write it instead of ``label_smoothing_factor``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels, label_smoothing=0.1)
        return (loss, outputs) if return_outputs else loss


def _smoothed(out, target):
    return F.cross_entropy(out, target, label_smoothing=0.1)


def _smoothed_train(tmp_path, trainer_cls=transformers.Trainer, **settings):
    """The MLP run of ``_train`` with the callback given the smoothed mean as ``loss=`` (gradient check off)."""
    X, y = _data()
    train, model = indexed(X, y), OwnLossMLP()
    callback = ExplaindTrainerCallback(train, loss=_smoothed, check_gradients=False)
    trainer_cls(model=model, args=_quiet(tmp_path, **settings), train_dataset=train, callbacks=[callback]).train()
    return model.eval(), callback.trajectory


def test_a_compute_loss_override_with_label_smoothing_is_exact_with_the_smoothed_callable(tmp_path):
    """The callback given the same smoothed mean as ``loss=``: the Trainer divides the override's mean by the step's
    micro-batches (3, 3 and 1) as it divides the model's own; exact in float64 (no float32 label smoother)."""
    model, traj = _smoothed_train(tmp_path, SmoothedLossTrainer)
    assert _sizes(traj) == [12, 12, 1, 12]
    _assert_exact(model, traj, reference=_smoothed_reference)


def _smoothed_reference(traj, X, loss_fn=None):
    return MappingReference(traj, X, loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none",
                                                                             label_smoothing=0.1))


# ---------------------------------------------------------------- resuming mid-run with optimizers that hold state
@pytest.mark.parametrize("optim", ["adafactor", "rmsprop"])
def test_resuming_mid_run_with_an_optimizer_holding_state(tmp_path, optim):
    """``trainer.train(resume_from_checkpoint="checkpoint-2")`` with Adafactor's factored second moments or RMSprop's
    square averages restored: exact with their ``initial_state`` term, or refused naming the resume and the fix."""
    from test_trainer_options import _resume

    try:
        model, traj = _resume(tmp_path, optim)
    except ConfigError as err:
        assert "resume_from_checkpoint" in str(err) and "Fix" in str(err)
        note(outcome=f"loud: ConfigError ({optim} state at the resume)")
        return
    assert traj.n_steps == 3 and _sizes(traj) == [1, 12, 12]
    # RMSprop at 0.1 bends the path: the reference needs 8 panels of its 8-node rule (2 panels: 8e-9 of its own)
    _assert_exact(model, traj, reference=functools.partial(MappingReference, panels=8))


# ---------------------------------------------------------------- NEFTune: refused, and its fix run
def test_neftune_drawn_in_a_layer_of_the_model_is_exact_with_capture_random(tmp_path):
    """``neftune_noise_alpha`` is refused (its hook is gone when training ends; tests/test_stranger_hf_round10.py);
    the refusal's fix, the same noise drawn in a layer of the model, recorded by the callback with
    ``capture_random=True``: every micro-batch's draw replayed, exact against the loop reference that replays them."""
    X, y = token_items()
    train = IndexedDataset([{"input_ids": X["input_ids"][i], "labels": y[i]} for i in range(N)])
    model = NoisyEmbeddingClassifier()
    refused = ExplaindTrainerCallback(train, loss="cross_entropy")
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=4,
                learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", optim_args="momentum=0.9",
                max_grad_norm=0.0, use_cpu=True, remove_unused_columns=False, report_to=[], save_strategy="no",
                logging_strategy="no", disable_tqdm=True, seed=0)
    with pytest.raises(ConfigError, match=r"neftune_noise_alpha=5.0\).*Fix: train with neftune_noise_alpha=None, or "
                                          r"draw the noise in a layer of the model"):
        transformers.Trainer(model=model, args=transformers.TrainingArguments(**args, neftune_noise_alpha=5.0),
                             train_dataset=train, callbacks=[refused]).train()
    model = NoisyEmbeddingClassifier()
    callback = ExplaindTrainerCallback(train, loss="cross_entropy", capture_random=True)
    transformers.Trainer(model=model, args=transformers.TrainingArguments(**args), train_dataset=train,
                         callbacks=[callback]).train()
    traj = callback.trajectory
    X_test = {"input_ids": torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(9))}
    model.eval()
    with torch.no_grad():
        truth = model(**X_test).logits
    replica = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test), truth)
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X_test)
    ref = MappingReplayReference(traj, X_test, loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none"))
    train_err = rel_err(att.values, ref.kept(("train",)))
    note(replica=replica, share=float(att.meta["residual_share"]), train=train_err,
         outcome="exact (NEFTune noise in a layer, capture_random=True)")
    assert replica <= 1e-6 and att.meta["residual_share"] <= 1e-9 and train_err <= 1e-9


# ---------------------------------------------------------------- accelerate, as its documentation teaches it
def test_accelerate_loop_with_accumulation_clipping_and_a_lone_last_micro_batch_is_exact():
    """Accumulation 3 over epochs of 7 micro-batches (steps of 3, 3 and 1; accelerate divides every loss by 3, also
    the lone one, which the default gradient check measures as ``c_s``), AdamW with a linear warm-up, clipping at
    every step. The prepared loader shuffles: the positions the recorder logs are those it served, and every epoch
    is a permutation of the 25 samples."""
    run = accelerate_loop(gradient_accumulation_steps=3)
    assert _sizes(run.traj) == [12, 12, 1] * 2
    assert [sorted(sum(run.served[e * 7:(e + 1) * 7], [])) for e in range(2)] == [list(range(N))] * 2
    assert [run.traj.batch(s)[0].tolist() for s in range(3)] == [sum(run.served[0:3], []), sum(run.served[3:6], []),
                                                                 run.served[6]]
    assert all(run.traj.grad_scale(s) < 1 / 3 for s in range(run.traj.n_steps))  # the division and the clipping
    assert len(set(run.rates)) >= 3
    _assert_exact(run.model, run.traj)


def test_accelerate_accumulation_4_with_the_unwrapped_model_given_to_the_recorder_is_exact():
    """``accelerator.unwrap_model(model)`` and the torch optimizer given to the recorder (the objects accelerate
    wraps), accumulation 4 over epochs of 7 micro-batches (steps of 4 and 3), SGD with momentum, no clipping."""
    run = accelerate_loop(gradient_accumulation_steps=4, optimizer="sgd", clip=None, give="unwrapped")
    assert _sizes(run.traj) == [16, 9] * 2
    assert [round(run.traj.grad_scale(s), 12) for s in range(4)] == [0.25] * 4  # accelerate divides by 4
    _assert_exact(run.model, run.traj)


def test_accelerate_seedable_sampler_serves_the_logged_positions_and_is_exact():
    """``DataLoaderConfiguration(use_seedable_sampler=True)``: accelerate replaces the loader's sampler by its
    ``SeedableRandomSampler``, reshuffled by ``set_epoch``; the logged positions are the ones it served (two epochs
    in different orders)."""
    config = accelerate.utils.DataLoaderConfiguration(use_seedable_sampler=True)
    run = accelerate_loop(gradient_accumulation_steps=2, dataloader_config=config)
    first, second = sum(run.served[:7], []), sum(run.served[7:], [])
    assert sorted(first) == sorted(second) == list(range(N)) and first != second
    assert _sizes(run.traj) == [8, 8, 8, 1] * 2
    _assert_exact(run.model, run.traj)


def test_accelerate_bf16_autocast_on_a_float64_model_is_exact():
    """``Accelerator(mixed_precision="bf16")`` on the CPU wraps the model's forward in bfloat16 autocast, which
    casts float32 operands only: a float64 model runs in float64, recorded and replayed so, exact."""
    run = accelerate_loop(gradient_accumulation_steps=3, mixed_precision="bf16")
    assert _sizes(run.traj) == [12, 12, 1] * 2
    assert {r.autocast for r in run.traj.manifest.steps} == {"bfloat16"}  # recorded under the autocast
    _assert_exact(run.model, run.traj)


accelerate = pytest.importorskip("accelerate")


def test_accelerate_accumulation_steps_without_the_accumulate_context_is_exact_with_the_check():
    """``Accelerator(gradient_accumulation_steps=3)`` with a loop that forgets ``with accelerator.accumulate(model)``:
    accelerate then steps at every micro-batch and ``accelerator.backward`` still divides each loss by 3; the default
    gradient check measures that factor (with the clipping) as ``c_s``, and the run is exact as trained."""
    run = accelerate_loop(gradient_accumulation_steps=3, accumulate=False)
    assert _sizes(run.traj) == [4, 4, 4, 4, 4, 4, 1] * 2
    assert all(run.traj.grad_scale(s) <= 1 / 3 + 1e-12 for s in range(run.traj.n_steps))
    _assert_exact(run.model, run.traj)


# ---------------------------------------------------------------- clipping every micro-batch: loud, naming it
CLIPPED_PARTS = (r"sum of its 3 micro-batches' gradients each times a factor of its own.*rescaled between the "
                 r"micro-batches of the step.*accelerator.clip_grad_norm_ outside `if accelerator.sync_gradients:`.*"
                 r"Fix: rescale once per step")


def test_accelerate_clipping_at_every_micro_batch_is_refused_naming_it_and_the_fix():
    """``accelerator.clip_grad_norm_`` at every micro-batch (outside ``if accelerator.sync_gradients:``) clips the
    partial sums of the step's gradient: ``a_1 G_1 + a_2 G_2 + a_3 G_3`` with factors that differ, which no
    ``c_s`` reproduces. Before, the gradient check's error at step 0 listed a dozen causes and none of them (its
    first advice: ``capture_random=True``); now it fits the factors and names the clipping and the fix (clipping
    when the gradients sync is exact: the first accelerate test)."""
    with pytest.raises(TrajectoryError, match=CLIPPED_PARTS):
        accelerate_loop(gradient_accumulation_steps=3, clip_every_micro_batch=True)
    note(outcome="loud: TrajectoryError (clip_grad_norm_ at every micro-batch)")


def test_accelerate_clipping_at_every_micro_batch_with_the_check_off_is_warned():
    """With ``check_gradients=False`` the recorder measures only the factor after the last micro-batch; the rest
    lands in the residual (share 4.9), which the estimators warn about, naming the rescaled steps and
    ``check_gradients=True``, whose error names the cause (above)."""
    run = accelerate_loop(gradient_accumulation_steps=3, clip_every_micro_batch=True, check_gradients=False)
    X = {"x": torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)}
    with pytest.warns(ExplaindWarning, match=r"gradients were rescaled at 6 step\(s\).*check_gradients=True"):
        att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(run.traj).transform(X)
    note(share=float(att.meta["residual_share"]), outcome="loud: ExplaindWarning (residual share, check off)")
    assert att.meta["residual_share"] > 1.0


def test_a_plain_loop_clipping_after_every_backward_is_refused_naming_it():
    """The same habit in a plain torch loop (``torch.nn.utils.clip_grad_norm_`` after each of 3 accumulated
    backwards): the same refusal; no accelerate involved."""
    X, y = _data()
    net = OwnLossMLP()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(net, opt, loss="cross_entropy", train_data=({"x": X}, y))
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TrajectoryError, match=CLIPPED_PARTS.split(".*accelerator")[0]), rec:
        for j, idx in enumerate(order[:24].split(4)):
            (net(X[idx], y[idx]).loss / 3).backward()
            rec.log_batch(idx)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
            if j % 3 == 2:
                opt.step()
                opt.zero_grad()


def test_accelerate_resumed_inside_an_epoch_with_skip_first_batches_is_exact(tmp_path):
    """``save_state`` after one step of 3 micro-batches, then ``load_state`` (momentum restored) and
    ``skip_first_batches(loader, 3)``: the rest of the first epoch (a step of 3, then the lone last micro-batch) and
    a second epoch are recorded from the restored state, whose carried part is the ``initial_state`` term."""
    run = accelerate_resumed_mid_epoch(str(tmp_path / "state"))
    assert _sizes(run.traj) == [12, 1, 12, 12, 1] and len(run.served) == 11
    assert sorted(run.traj.initial_state()) == sorted(n for n, _ in run.model.named_parameters())
    _assert_exact(run.model, run.traj)
