"""Lightning as people configure it, round 7: exact, or loud naming the cause and the fix.

The float64 MLP of tests/test_lightning_options.py (``self.model(batch["x"])``, the callback given
``train_data=(X, y)``), 25 samples in shuffled batches of 4, SGD momentum 0.9 unless a case says otherwise, the
gradient check off unless a case needs it (``_fit`` of tests/test_stranger_lightning_round5.py). "Exact": replica
<= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9
relative to the slow float64 loop reference of tests/reference.py. The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_lightning_round7.py`` prints them).

Changed here (each test names what happened before):

* The callback removed its model hook before closing the recorder, whose end-of-run check saw the hook's flag go
  (``_forward_pre_hooks_with_kwargs: 1 -> 0``) and, where its test forward could not run the callback's inputs (a
  float32 ``train_data`` for a module ``precision="64-true"`` turned to float64), warned that the model changed; the
  recorder is now closed first (both callbacks).
* ``EMAWeightAveraging`` writes its average into the model at the end of training: the warning named no callback;
  it now names it, as it named ``StochasticWeightAveraging``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule, indexed
from _hf_stranger_kit import note
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.callbacks import timer as timer_module
from test_lightning_options import Validated, _data, _mlp, _sgd
from test_stranger_lightning_round5 import _assert_exact, _fit, _sizes

from explaind.exceptions import ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindLightningCallback

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|training_step. returned .None).*")]



class Ticking(CrossEntropyModule):
    """Every training step advances a fake clock by ``tick`` seconds (a slow model, without waiting for it)."""

    def __init__(self, clock: list[float], tick: float):
        super().__init__(_mlp(), _sgd)
        self.clock, self.tick = clock, tick

    def training_step(self, batch, batch_idx):
        self.clock[0] += self.tick
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("tick", "steps", "sizes"), [(0.4, 1, [8]), (0.25, 2, [8, 8])])
def test_max_time_stopping_mid_run_is_exact_and_a_time_limit_reached_before_training_is_named(
        tmp_path, monkeypatch, tick, steps, sizes):
    """``max_time`` stops after whichever micro-batch ends past the limit: with 0.4 s per micro-batch the third one
    (inside a step of 2: without its optimizer step it is dropped, nothing moved the weights), with 0.25 s the
    fourth (a step's end). Lightning's ``Timer`` reads a fake clock that only the training steps advance, so the
    stop does not depend on the machine's load. A limit reached before the first batch (``Timer`` checks it at
    ``on_fit_start``) records nothing; before, the error said to pass the callback."""
    clock = [0.0]
    monkeypatch.setattr(timer_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    module = Ticking(clock, tick)
    callback, trainer = _fit(tmp_path, module, max_steps=50, max_time={"seconds": 1})
    assert trainer.global_step == callback.trajectory.n_steps == steps and _sizes(callback.trajectory) == sizes
    _assert_exact(module.model, callback.trajectory)
    callback, trainer = _fit(tmp_path, CrossEntropyModule(_mlp(), _sgd), max_steps=5, max_time={"seconds": 0})
    assert trainer.global_step == 0
    with pytest.raises(TrajectoryError, match=r"Nothing recorded yet.*stops before training starts, e.g. at a time "
                                              r"limit already reached"):
        callback.trajectory  # noqa: B018 - the property raises
    note(outcome="exact; loud: TrajectoryError when the limit is reached before training")


class StopAt(pl.Callback):
    """``trainer.should_stop = True`` after micro-batch ``batch`` (as a time or metric check does)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            trainer.should_stop = True


def test_a_stop_between_the_micro_batches_of_a_step_drops_the_unstepped_one_and_is_exact(tmp_path, caplog):
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, trainer = _fit(tmp_path, module, max_steps=10, callbacks=[StopAt(2)])
    assert trainer.global_step == 1 and _sizes(callback.trajectory) == [8]
    assert "1 logged micro-batch(es) were not followed by optimizer.step(); dropped" in caplog.text
    _assert_exact(module.model, callback.trajectory)


def test_validation_every_second_epoch_is_exact(tmp_path):
    module = Validated(_mlp(), _sgd)
    callback, trainer = _fit(tmp_path, module, max_steps=-1, max_epochs=3, val=True, check_val_every_n_epoch=2)
    assert "val_loss" in trainer.callback_metrics and trainer.global_step == 12
    assert _sizes(callback.trajectory) == [8, 8, 8, 1] * 3  # 7 batches per epoch, accumulation 2
    _assert_exact(module.model, callback.trajectory)


class DictStep(CrossEntropyModule):
    """``training_step`` returning ``{"loss": ..., "accuracy": ...}``."""

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["x"])
        return {"loss": F.cross_entropy(logits, batch["labels"]),
                "accuracy": (logits.argmax(-1) == batch["labels"]).double().mean()}


def test_a_training_step_returning_a_dict_is_exact(tmp_path):
    module = DictStep(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module)
    _assert_exact(module.model, callback.trajectory)


class EditGrads(CrossEntropyModule):
    """``on_before_optimizer_step`` halving every gradient, or only the first layer's."""

    def __init__(self, how: str):
        super().__init__(_mlp(), _sgd)
        self.how = how

    def on_before_optimizer_step(self, optimizer):
        for name, p in self.model.named_parameters():
            if self.how == "every" or name.startswith("0."):
                p.grad.mul_(0.5)


def test_halving_every_gradient_before_the_step_is_measured_as_its_factor_and_exact(tmp_path):
    module = EditGrads("every")
    callback, _ = _fit(tmp_path, module)
    assert [callback.trajectory.grad_scale(s) for s in range(4)] == pytest.approx([0.5] * 4, abs=1e-14)
    _assert_exact(module.model, callback.trajectory)


@pytest.mark.parametrize("check", [False, "auto"])
def test_editing_one_layers_gradients_before_the_step_is_refused_naming_the_layer(tmp_path, check):
    with pytest.raises(TrajectoryError, match=r"Step 0: between backward\(\) and optimizer.step\(\) the gradient "
                                              r"of 0.weight, 0.bias was changed by more than a global factor"):
        _fit(tmp_path, EditGrads("first_layer"), callback_kwargs={"check_gradients": check})
    note(outcome="loud: TrajectoryError")


def test_ema_weight_averaging_warns_naming_it_and_the_trajectory_ends_at_the_last_step(tmp_path):
    """Before, the warning named "an EMA or load_state_dict", not the callback."""
    module = CrossEntropyModule(_mlp(), _sgd)
    with pytest.warns(ExplaindWarning, match=r"changed outside optimizer.step\(\).*Here EMAWeightAveraging wrote "
                                             r"the average of the weights it kept"):
        callback, _ = _fit(tmp_path, module, callbacks=[EMAWeightAveraging(decay=0.5)])
    traj = callback.trajectory
    assert not torch.equal(traj.params(traj.n_steps)["3.weight"], module.model[3].weight)
    module.model.load_state_dict(traj.params(traj.n_steps))  # the last step's weights: the run itself is exact
    _assert_exact(module.model, traj, outcome="loud: ExplaindWarning; exact at the last step's weights")


class WarmUp(CrossEntropyModule):
    """An ``optimizer_step`` override raising the rate over the first 3 steps, as Lightning's docs write it."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step < 3:
            for group in optimizer.param_groups:
                group["lr"] = min(1.0, (self.trainer.global_step + 1) / 3) * 0.2


def test_an_optimizer_step_override_with_a_hand_made_warm_up_is_exact(tmp_path):
    module = WarmUp(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, max_steps=5)
    _assert_exact(module.model, callback.trajectory)


def test_a_float32_module_under_64_true_with_float32_items_is_exact_without_warnings(tmp_path):
    """``precision="64-true"`` turns the float32 module to float64 when fitting starts; the callback keeps the float32
    items. Before, the end-of-run check warned that the callback's hook flag changed (its test forward failed on the
    float32 items)."""
    X, y = _data()
    module = CrossEntropyModule(_mlp().float(), _sgd)
    callback = ExplaindLightningCallback((X.float(), y), loss="cross_entropy", module="model", check_gradients=False)
    loader = torch.utils.data.DataLoader(indexed(X.float(), y), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        pl.Trainer(max_steps=4, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[callback], default_root_dir=str(tmp_path)).fit(module, loader)
    assert next(module.model.parameters()).dtype == torch.float64
    _assert_exact(module.model, callback.trajectory)


def test_limit_train_batches_as_a_fraction_is_exact(tmp_path):
    """``limit_train_batches=0.5``: 3 of the 7 batches per epoch (steps of 2 and 1 micro-batches)."""
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=2, limit_train_batches=0.5)
    assert _sizes(callback.trajectory) == [8, 4, 8, 4]
    _assert_exact(module.model, callback.trajectory)


def test_resuming_from_the_last_checkpoint_by_name_is_exact(tmp_path):
    """``ModelCheckpoint(save_last=True)`` and ``trainer.fit(..., ckpt_path="last")``: the run saved at step 2
    (every 2 steps) resumes there to step 5."""
    X, y = _data()

    def fit(callbacks, max_steps, ckpt=None):
        module = CrossEntropyModule(_mlp(), _sgd)
        loader = torch.utils.data.DataLoader(indexed(X, y), batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(3))
        pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
                   logger=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=2),
                              *callbacks], default_root_dir=str(tmp_path)).fit(module, loader, ckpt_path=ckpt)
        return module

    fit([], 3)
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients=False)
    module = fit([callback], 5, "last")
    traj = callback.trajectory
    assert _sizes(traj) == [8, 4, 8] and traj.initial_state()  # the momentum buffers of step 2
    _assert_exact(module.model, traj)
