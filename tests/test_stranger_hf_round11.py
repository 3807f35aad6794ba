"""Hugging Face ``Trainer`` as people configure it, round 11: exact, or loud naming the cause and the fix.

The runs train the float64 MLP of tests/test_trainer_options.py (its own mean loss, 25 samples in batches of 4,
gradient accumulation 3: steps of 3, 3 and 1 micro-batches; SGD momentum 0.9 unless a case says otherwise) through
``_train`` of that file and ``_assert_exact`` of tests/test_stranger_hf_round5.py. "Exact": replica <= 1e-6 relative
to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow
float64 loop reference (``MappingReference``). The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_hf_round11.py`` prints them).

Fixed here (each test names what happened before):

* ``auto_find_batch_size=True`` retrying after an out-of-memory error was refused ("has recorded a run already");
  an abandoned attempt without a step is now dropped and the run with the batch that fits recorded, exact; an
  attempt that took steps (whose weights the Trainer does not set back) is refused naming the batch that fits.
* A ``train()`` that raised left the recording open (the Trainer reports no exception to its callbacks); a new
  callback then failed with "no training batch carried 'explaind_index'". Now the same callback refuses naming the
  cause and the fix, and a new one closes the open recorder with a warning; the new run is exact.
* A callback given ``store=`` and ``resume=True`` on a Trainer resumed from another checkpoint than the store's
  step was refused with the advice to call ``rec.restore()``; the refusal now names both steps and the checkpoint.
* A sparse store (``checkpoint_every=2``) whose last step was a theta checkpoint kept no optimizer state there, so
  resuming went back to step 0; the last step now always keeps it, and the Trainer's resume goes on from it.
* A new callback on the store of a run that raised (its recorder left open, holding the store's lock) was refused
  as if another process wrote the store; the open recorder is now closed with a warning and the store resumes.
* A tensor outside the model in the Trainer's optimizer (``add_param_group`` in ``create_optimizer``) was refused
  with a plain loop's fix; now a ``ConfigError`` naming the Trainer's optimizer and the fix, which is exact.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import indexed
from _hf_stranger_kit import note
from test_stranger_hf_round5 import _assert_exact
from test_trainer_options import ACCUMULATE, BATCH, KeywordLossMLP, LearningRates, OwnLossMLP, _data, _train
from transformers.modeling_outputs import SequenceClassifierOutput

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindTrainerCallback

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _sizes(traj) -> list[int]:
    return [traj.batch(s)[0].numel() for s in range(traj.n_steps)]


OPTIONS = {  # TrainingArguments no other test sets in this combination; gradient check off
    "rmsprop_centered_momentum": dict(optim="rmsprop", optim_args="centered=True,momentum=0.5,alpha=0.9",
                                      learning_rate=0.01, weight_decay=0.1),
    "adagrad_lr_decay_eps": dict(optim="adagrad", optim_args="lr_decay=0.1,eps=1e-6", weight_decay=0.1),
    "cosine_recipe_adamw": dict(optim="adamw_torch", optim_args=None, lr_scheduler_type="cosine", warmup_steps=0.3,
                                weight_decay=0.01, max_grad_norm=1.0, max_steps=6, learning_rate=0.05),
    "accumulation_beyond_the_epoch": dict(gradient_accumulation_steps=10, max_steps=-1, num_train_epochs=2),
    "batch_of_one_no_accumulation": dict(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=6),
    "adamw_clipping_every_step": dict(optim="adamw_torch", optim_args=None, max_grad_norm=1e-3, weight_decay=0.1,
                                      learning_rate=0.05),
    "max_steps_over_four_epochs": dict(max_steps=12),
    "memory_metrics": dict(skip_memory_metrics=False),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_trainer_options_are_exact(tmp_path, option):
    rates = LearningRates()
    model, traj, trainer = _train(tmp_path, callback_kwargs={"check_gradients": False}, extra_callbacks=[rates],
                                  **OPTIONS[option])
    assert traj.n_steps == trainer.state.global_step
    expected = {"accumulation_beyond_the_epoch": [25, 25], "batch_of_one_no_accumulation": [1] * 6,
                "max_steps_over_four_epochs": [12, 12, 1] * 4}.get(option)
    if expected is not None:  # a step never spans the end of an epoch
        assert _sizes(traj) == expected
    if option == "cosine_recipe_adamw":
        assert len(set(rates.rates)) >= 4  # warm-up, then the cosine decay
    if option == "adamw_clipping_every_step":
        assert all(traj.grad_scale(s) < 1 for s in range(traj.n_steps))
    _assert_exact(model, traj)


class GradNormTrainer(transformers.Trainer):
    """``training_step`` overridden to read the gradient norm after the Trainer's own step (as people log it)."""

    norms: list[float] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.norms.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))
        return loss


class OwnBackwardTrainer(transformers.Trainer):
    """``training_step`` written out: the micro-batch's mean loss through ``accelerator.backward``, not divided by
    the accumulated micro-batches (the sum of their means: ``gradient_accumulation_steps`` times the Trainer's)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        labels = inputs.pop("labels")
        loss = F.cross_entropy(model(**inputs).logits, labels)
        self.accelerator.backward(loss)
        return loss.detach()


class ScaledForAccumulation(transformers.Trainer):
    """``loss_is_scaled_for_ga = True`` (transformers' switch for a loss of one's own) with a ``compute_loss`` that
    returns the micro-batch mean: the Trainer no longer divides it, the step trains on the sum of the means."""

    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


class ItemsNormalised(transformers.Trainer):
    """A ``compute_loss`` override dividing the summed loss by ``num_items_in_batch`` (the Trainer passes it, and then
    does not divide the loss, for a model whose ``forward`` takes loss keyword arguments)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch
        return (loss, outputs) if return_outputs else loss


SUBCLASSES = {  # Trainer subclass, the model, the factor c_s the gradient check measures at steps 0..3
    "training_step_reading_the_gradient_norm": (GradNormTrainer, OwnLossMLP, [1.0, 1.0, 1.0, 1.0]),
    "training_step_with_its_own_backward": (OwnBackwardTrainer, OwnLossMLP, [3.0, 3.0, 1.0, 3.0]),
    "loss_is_scaled_for_ga": (ScaledForAccumulation, OwnLossMLP, [3.0, 3.0, 1.0, 3.0]),
    "compute_loss_over_num_items_with_loss_kwargs": (ItemsNormalised, KeywordLossMLP, [1.0, 1.0, 1.0, 1.0]),
}


@pytest.mark.parametrize("case", sorted(SUBCLASSES))
def test_trainer_subclasses_are_exact_with_the_factor_the_gradient_check_measures(tmp_path, case):
    """The callback weights each micro-batch as the stock Trainer scales it; a subclass that scales the step
    otherwise leaves one factor per step, which the gradient check (on by default) measures as ``c_s``."""
    trainer_cls, model_cls, factors = SUBCLASSES[case]
    model, traj, _ = _train(tmp_path, model_cls(), trainer_cls=trainer_cls)
    assert _sizes(traj) == [12, 12, 1, 12]
    assert [round(traj.grad_scale(s), 12) for s in range(4)] == [round(f, 12) for f in factors]
    if trainer_cls is GradNormTrainer:
        assert len(GradNormTrainer.norms) == 3 * 3 + 1
    _assert_exact(model, traj)


def test_a_compute_loss_func_of_ones_own_over_num_items_is_exact_with_the_check_off(tmp_path):
    """``compute_loss_func=`` the user's summed loss over ``num_items_in_batch``: the Trainer does not divide it, and
    the counted items of a step are its samples, so the callback's weights are the run's without any measurement."""

    def summed(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    X, y = _data()
    train = indexed(X, y)
    model = OwnLossMLP()
    callback = ExplaindTrainerCallback(train, loss="cross_entropy", check_gradients=False)
    args = _arguments(tmp_path, max_steps=4, optim_args="momentum=0.9", save_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=[callback],
                         compute_loss_func=summed).train()
    assert _sizes(callback.trajectory) == [12, 12, 1, 12]
    _assert_exact(model.eval(), callback.trajectory)


class HalveGradients(transformers.TrainerCallback):
    """Halves every gradient before the optimizer steps (a hand-made global scale)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            p.grad.mul_(0.5)


class ClipByValue(transformers.TrainerCallback):
    """Clips every gradient coordinate to [-0.01, 0.01] before the optimizer steps."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)


def test_a_callback_halving_the_gradients_before_the_step_is_measured_as_the_clip_factor(tmp_path):
    model, traj, _ = _train(tmp_path, extra_callbacks=[HalveGradients()])
    assert [traj.grad_scale(s) for s in range(4)] == pytest.approx([0.5] * 4, abs=1e-12)
    _assert_exact(model, traj)


def test_a_callback_clipping_by_value_before_the_step_is_refused(tmp_path):
    refusal = (r"Step 0: between backward\(\) and optimizer.step\(\) the gradient of net.0.weight.*was changed by more "
               r"than a global factor.*clip_grad_value_.*cannot")
    with pytest.raises(TrajectoryError, match=refusal):
        _train(tmp_path, extra_callbacks=[ClipByValue()])
    note(outcome="loud: TrajectoryError (gradients clipped by value in on_pre_optimizer_step)")


# ---------------------------------------------------------------- resuming the recording with the Trainer
def _arguments(tmp_path, **settings) -> transformers.TrainingArguments:
    """The MLP runs' arguments with a checkpoint every 2 steps (``settings`` on top)."""
    return transformers.TrainingArguments(**{**dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
        max_steps=2, learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", optim_args=None, weight_decay=0.0,
        max_grad_norm=0.0, use_cpu=True, remove_unused_columns=False, report_to=[], save_strategy="steps",
        save_steps=2, logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0), **settings})


def _record_into_store(tmp_path, optim: str, optim_args, steps: int, **store):
    """A first run of ``steps`` steps recorded into ``tmp_path / "run"`` (optimizer state saved at every step)."""
    X, y = _data()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False,
                                       store=tmp_path / "run", save_optimizer_state=True, **store)
    transformers.Trainer(model=OwnLossMLP(), args=_arguments(tmp_path, optim=optim, optim_args=optim_args,
                                                             max_steps=steps),
                         train_dataset=indexed(X, y), callbacks=[callback]).train()
    return callback.trajectory


def _resume_recording(tmp_path, optim: str, optim_args, checkpoint: str | None, steps: int = 5, **store):
    """A new model and callback on the same store (``resume=True``), the Trainer resumed from ``checkpoint``."""
    X, y = _data()
    model = OwnLossMLP()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False,
                                       store=tmp_path / "run", resume=True, save_optimizer_state=True, **store)
    trainer = transformers.Trainer(model=model, args=_arguments(tmp_path, optim=optim, optim_args=optim_args,
                                                                max_steps=steps),
                                   train_dataset=indexed(X, y), callbacks=[callback])
    trainer.train(resume_from_checkpoint=None if checkpoint is None else str(tmp_path / checkpoint))
    return model.eval(), callback.trajectory


@pytest.mark.parametrize("optim,optim_args", [("sgd", "momentum=0.9"), ("adamw_torch", None)])
def test_the_recording_resumes_with_the_trainer_and_is_exact_across_the_resume(tmp_path, optim, optim_args):
    """Two steps recorded into a store with a checkpoint at step 2; a new callback with ``resume=True`` continues the
    same store when the Trainer resumes from ``checkpoint-2``: one run of 5 steps, whose trained model is the one an
    uninterrupted run gives, exact with no ``initial_state`` term (the store holds the state from step 0)."""
    assert _record_into_store(tmp_path, optim, optim_args, 2).n_steps == 2
    model, traj = _resume_recording(tmp_path, optim, optim_args, "checkpoint-2")
    assert traj.n_steps == 5 and _sizes(traj) == [12, 12, 1, 12, 12]
    straight, _, _ = _train(tmp_path / "straight", optim=optim, optim_args=optim_args, max_steps=5,
                            callback_kwargs={"check_gradients": False})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), straight.state_dict().values()))
    assert not traj.initial_state()
    _assert_exact(model, traj)


def test_a_sparse_store_resumes_with_the_trainer_at_its_last_step(tmp_path):
    """``checkpoint_every=2``: the store's last step (2) is a theta checkpoint of its layout, whose optimizer state it
    kept every ``2 m`` steps only. Before: the store resumed at step 0, its last full checkpoint (plain loops recorded
    the later steps again), and the Trainer resumed from ``checkpoint-2`` was refused; now the last step of a sparse
    run always keeps the optimizer state too, and the recording goes on from it, exact."""
    assert _record_into_store(tmp_path, "adamw_torch", None, 2, checkpoint_every=2).n_steps == 2
    model, traj = _resume_recording(tmp_path, "adamw_torch", None, "checkpoint-2", checkpoint_every=2)
    assert traj.sparse and traj.n_steps == 5 and _sizes(traj) == [12, 12, 1, 12, 12]
    _assert_exact(model, traj)


@pytest.mark.parametrize("checkpoint", ["checkpoint-2", None])
def test_a_store_resumed_at_another_step_than_the_trainer_is_refused_naming_the_checkpoint(tmp_path, checkpoint):
    """The store holds 4 steps; the Trainer resumes from ``checkpoint-2`` (or starts afresh). Before: the recorder's
    advice, ``Call rec.restore() before `with rec:```, which the callback does not let a Trainer user do."""
    _record_into_store(tmp_path, "adamw_torch", None, 4)
    start = 2 if checkpoint else 0
    refusal = (rf"(?s)The store .*run' goes on from step 4 \(its last step with a stored optimizer state\), but "
               rf"trainer.train\(resume_from_checkpoint=...\) started training at step {start}.*Fix: resume training "
               rf"from the checkpoint of step 4.*or record into another store")
    with pytest.raises(TrajectoryError, match=refusal):
        _resume_recording(tmp_path, "adamw_torch", None, checkpoint, steps=6)
    note(outcome="loud: TrajectoryError (store resumed at another step than the Trainer)")


# ---------------------------------------------------------------- auto_find_batch_size after an out-of-memory error
class RunsOutOfMemory(OwnLossMLP):
    """Raises torch's CUDA out-of-memory error on training batches of more than 2 samples, from the ``after``-th
    training forward on (``after=0``: at once), as a model too large for the device does."""

    def __init__(self, after: int = 0):
        super().__init__()
        self.after, self.forwards = after, itertools.count(1)  # a counter whose value is no attribute of the model

    def forward(self, x, labels=None):
        if self.training:
            if next(self.forwards) > self.after and x.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x, labels)


class StartingWeights(transformers.TrainerCallback):
    """The first layer's weight at every ``on_train_begin`` (one per attempt of ``auto_find_batch_size``)."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(model.net[0].weight.detach().clone())


@pytest.mark.parametrize("store,after", [(False, 0), (True, 0), (False, 1)])
def test_auto_find_batch_size_retrying_after_out_of_memory_is_exact(tmp_path, store, after):
    """The batch of 4 runs out of memory at the first forward (``after=1``: at the second, with the first micro-batch
    of step 0 logged and its gradient accumulated, which the Trainer zeroes when it starts again); accelerate retries
    with 3 (out of memory again), then 2. Before: the retry was refused, "This ExplaindTrainerCallback has recorded a
    run already; create a new one for every training run" (one callback, one ``train()`` call). Now the attempts that
    took no step are dropped (a store they created is written again) and the run with batches of 2 is recorded."""
    starts = StartingWeights()
    kwargs = {"check_gradients": False, **({"store": tmp_path / "run"} if store else {})}
    model, traj, trainer = _train(tmp_path, RunsOutOfMemory(after), auto_find_batch_size=True, callback_kwargs=kwargs,
                                  extra_callbacks=[starts])
    assert trainer._train_batch_size == 2 and len(starts.weights) == 3
    assert _sizes(traj) == [6, 6, 6, 6]  # 13 micro-batches of 2 (and 1) an epoch, accumulation 3
    _assert_exact(model, traj)


def test_auto_find_batch_size_retrying_after_steps_is_refused_naming_the_batch_that_fits(tmp_path):
    """Out of memory at the 4th forward, after one step of 3 micro-batches: the Trainer retries from the weights
    that step moved (it does not set them back), which no recording reaches. Before: the same refusal as above,
    naming no cause; now the attempt's steps and the fix."""
    starts = StartingWeights()
    refusal = (r"auto_find_batch_size=True\) started training again with a batch of 3 after an attempt that had "
               r"already taken 1 optimizer step.*Fix: TrainingArguments\(per_device_train_batch_size=3, "
               r"auto_find_batch_size=False\)")
    model = RunsOutOfMemory(after=3)
    with pytest.raises(TrajectoryError, match=refusal):
        _train(tmp_path, model, auto_find_batch_size=True, extra_callbacks=[starts],
               callback_kwargs={"check_gradients": False})
    assert len(starts.weights) == 1  # the refusal came at the second attempt's start, before the others' hooks
    assert not torch.equal(starts.weights[0], model.net[0].weight)  # the weights the second attempt started from
    note(outcome="loud: TrajectoryError (auto_find_batch_size retried after an attempt took steps)")


# ---------------------------------------------------------------- trainer.train() again after it raised
class FailsOnce(OwnLossMLP):
    """Raises a ``RuntimeError`` at the ``at``-th training forward (the 5th: in the second step), once."""

    def __init__(self, at: int = 5):
        super().__init__()
        self.at, self.forwards = at, itertools.count(1)

    def forward(self, x, labels=None):
        if self.training and next(self.forwards) == self.at:
            raise RuntimeError("a transient failure")
        return super().forward(x, labels)


def _failed_run(tmp_path):
    """A Trainer whose first ``train()`` raised after one recorded step; returns the model, trainer and callback."""
    X, y = _data()
    model = FailsOnce()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False)
    trainer = transformers.Trainer(model=model, args=_arguments(tmp_path, optim="sgd", optim_args="momentum=0.9",
                                                                max_steps=4, save_strategy="no"),
                                   train_dataset=indexed(X, y), callbacks=[callback])
    with pytest.raises(RuntimeError, match="a transient failure"):
        trainer.train()
    return model, trainer, callback


def _train_again_with_a_new_callback(model, trainer, old):
    X, y = _data()
    trainer.remove_callback(old)
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.trajectory.n_steps == 4
    _assert_exact(model.eval(), callback.trajectory)


def test_training_again_after_train_raised_is_refused_then_exact_with_the_fix_it_names(tmp_path):
    """The Trainer reports no exception to its callbacks, so the recording of a ``train()`` that raised stays open.
    Training again with the same callback is refused naming the cause; with a new callback (the fix) the new run,
    from the weights the failed one left, is exact. Before: "has recorded a run already; create a new one", and
    the new callback then failed with "no training batch carried 'explaind_index'" (the old callback's hook took
    the positions first)."""
    model, trainer, callback = _failed_run(tmp_path)
    refusal = (r"previous training run ended in an exception after 1 recorded step\(s\), and the recording was left "
               r"open.*Fix: create a new ExplaindTrainerCallback for the new run \(trainer.remove_callback\(old\); "
               r"trainer.add_callback\(new\)\)")
    with pytest.raises(TrajectoryError, match=refusal):
        trainer.train()
    assert callback.trajectory.n_steps == 1
    _train_again_with_a_new_callback(model, trainer, callback)


def test_a_new_callback_after_train_raised_closes_the_open_recording_with_a_warning_and_is_exact(tmp_path):
    """The user replaces the callback at once: the new one closes the old recorder, whose hooks would have taken the
    new run's batches, and says so. Before: ``TrajectoryError`` "no training batch carried 'explaind_index'"."""
    model, trainer, callback = _failed_run(tmp_path)
    with pytest.warns(ExplaindWarning, match=r"still had the open recorder of an earlier ExplaindTrainerCallback, "
                                             r"whose training run ended in an exception after 1 recorded step"):
        _train_again_with_a_new_callback(model, trainer, callback)
    assert callback.trajectory.n_steps == 1


def test_loss_is_scaled_for_ga_with_the_check_off_is_warned_naming_the_gradient_check(tmp_path):
    """With ``check_gradients=False`` nothing measures the factor 3 the subclass leaves in (the callback cannot see
    the Trainer's ``loss_is_scaled_for_ga``): the estimators warn about the residual share and name the check."""
    model, traj, _ = _train(tmp_path, OwnLossMLP(), trainer_cls=ScaledForAccumulation,
                            callback_kwargs={"check_gradients": False})
    X = {"x": torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)}
    with pytest.warns(ExplaindWarning, match=r"residual share 0\.\d+ > residual_tol.*no gradient check ran .* record "
                                             r"with check_gradients=True"):
        att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X)
    note(share=att.meta["residual_share"], outcome="loud: ExplaindWarning (residual share, factor unmeasured)")
    assert att.meta["residual_share"] > 0.1


def test_a_run_that_raised_resumes_its_store_from_the_last_checkpoint_exactly(tmp_path):
    """A run recorded into a store raises in its fifth step (after the Trainer saved ``checkpoint-4``); in the same
    process a new model and callback with ``resume=True`` resume the Trainer from ``checkpoint-4``: the new callback
    closes the recorder left open (warned) and the store goes on, one run of 6 steps, exact. Before: refused, "The
    trajectory store ... is being written by process <this process> ... If that process is gone, delete
    '.explaind-writer.lock'" (the lock of the recorder the failed run left open)."""
    X, y = _data()
    first = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False, store=tmp_path / "run")
    with pytest.raises(RuntimeError, match="a transient failure"):
        transformers.Trainer(model=FailsOnce(at=11), args=_arguments(tmp_path, optim="adamw_torch", max_steps=6),
                             train_dataset=indexed(X, y), callbacks=[first]).train()
    assert first.recorder.n_steps == 4  # steps of 3, 3, 1 and 3 micro-batches, then the failure
    model = OwnLossMLP()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False,
                                       store=tmp_path / "run", resume=True)
    trainer = transformers.Trainer(model=model, args=_arguments(tmp_path, optim="adamw_torch", max_steps=6),
                                   train_dataset=indexed(X, y), callbacks=[callback])
    with pytest.warns(ExplaindWarning, match=r"The store .*run' still had the open recorder of an earlier "
                                             r"ExplaindTrainerCallback.*after 4 recorded step"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    traj = callback.trajectory
    assert traj.n_steps == 6 and _sizes(traj) == [12, 12, 1, 12, 12, 1]
    _assert_exact(model.eval(), traj)


# ---------------------------------------------------------------- a tensor outside the model in the optimizer
class TemperatureTrainer(transformers.Trainer):
    """A learned temperature held by the Trainer subclass, added to the optimizer in ``create_optimizer`` and read
    by its ``compute_loss``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def create_optimizer(self, model=None):
        super().create_optimizer(model)
        self.optimizer.add_param_group({"params": [self.temperature], "weight_decay": 0.0})
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits / self.temperature, labels)
        return (loss, outputs) if return_outputs else loss


class TemperedMLP(OwnLossMLP):
    """The fix: the temperature a parameter of the model, its forward returning the tempered logits."""

    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x, labels=None):
        logits = self.net(x) / self.temperature
        return SequenceClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels),
                                        logits=logits)


def test_a_tensor_outside_the_model_in_the_trainers_optimizer_is_refused_then_exact_inside_the_model(tmp_path):
    """Before: the recorder's ``TrajectoryError`` "The optimizer holds 1 parameter tensor(s) that are not parameters
    of the model: group 2 position 0 shape (). Build the optimizer ... from parameters of the model"; now a
    ``ConfigError`` when training starts naming the Trainer's optimizer, ``add_param_group`` and the fix, which is
    exact (the temperature recorded with the model's parameters)."""
    refusal = (r"The Trainer's optimizer .* steps 1 tensor\(s\) that are not parameters of the model OwnLossMLP: "
               r"param_groups\[2\] tensor of shape \(\).*Fix: make each a parameter of the model")
    with pytest.raises(ConfigError, match=refusal):
        _train(tmp_path, OwnLossMLP(), trainer_cls=TemperatureTrainer, callback_kwargs={"check_gradients": False})
    model, traj, _ = _train(tmp_path, TemperedMLP(), callback_kwargs={"check_gradients": False})
    assert "temperature" in traj.param_names and float(model.temperature.detach()) != 2.0
    _assert_exact(model, traj)


def test_a_store_resumed_from_another_runs_checkpoint_at_its_step_is_refused_naming_it(tmp_path):
    """The store holds 2 steps; the Trainer resumes from the step-2 checkpoint of another run (learning rate 0.3):
    refused naming the same step with other weights. Before: the recorder's ``Call rec.restore()`` advice."""
    _record_into_store(tmp_path, "adamw_torch", None, 2)
    X, y = _data()
    other = _arguments(tmp_path / "other", optim="adamw_torch", learning_rate=0.3)
    transformers.Trainer(model=OwnLossMLP(), args=other,
                         train_dataset=[{"x": X[i], "labels": y[i]} for i in range(len(X))]).train()
    refusal = (r"started training at step 2, the store's, with other weights or optimizer state than those it holds "
               r"\(the checkpoint is not one of the run recorded in this store\).*Fix: resume training from the "
               r"checkpoint of step 2 of the run recorded in this store")
    with pytest.raises(TrajectoryError, match=refusal):
        _resume_recording(tmp_path, "adamw_torch", None, "other/checkpoint-2")
    note(outcome="loud: TrajectoryError (another run's checkpoint at the store's step)")
