"""Lightning as people configure it, round 8: exact, or loud naming the cause and the fix.

The float64 MLP of tests/test_lightning_options.py (``self.model(batch["x"])``, the callback given
``train_data=(X, y)``), 25 samples in shuffled batches of 4, SGD momentum 0.9 unless a case says otherwise, the
gradient check off unless a case needs it (``_fit`` of tests/test_stranger_lightning_round5.py). "Exact": replica
<= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9
relative to the slow float64 loop reference of tests/reference.py. The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_lightning_round8.py`` prints them).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule, indexed
from _hf_stranger_kit import note
from lightning.pytorch.loggers import CSVLogger
from reference import Reference, rel_err
from test_lightning_options import _data, _mlp, _sgd
from test_stranger_lightning_round5 import X_TEST, _assert_exact, _fit, _sizes

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindLightningCallback

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|training_step. returned .None).*")]


# ---------------------------------------------------------------- manual optimization, clipping, schedulers
class Toggled(CrossEntropyModule):
    """Manual optimization as Lightning's docs write it: ``toggle_optimizer`` / ``untoggle_optimizer`` around the
    step."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        self.toggle_optimizer(opt)
        loss = F.cross_entropy(self.model(batch["x"]), batch["labels"])
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        self.untoggle_optimizer(opt)


def test_manual_optimization_with_toggle_optimizer_is_exact(tmp_path):
    module = Toggled()
    callback, _ = _fit(tmp_path, module, max_steps=5, accumulate=1, callback_kwargs={"check_gradients": "auto"})
    assert _sizes(callback.trajectory) == [4] * 5
    _assert_exact(module.model, callback.trajectory)


class OwnClipping(CrossEntropyModule):
    """``configure_gradient_clipping`` overridden: from the second step on, by norm through ``clip_gradients``, or by
    value with torch's own function."""

    def __init__(self, how: str):
        super().__init__(_mlp(), _sgd)
        self.how = how

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.trainer.global_step < 1:
            return
        if self.how == "norm":
            self.clip_gradients(optimizer, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        else:
            torch.nn.utils.clip_grad_value_(self.parameters(), 0.01)


def test_a_configure_gradient_clipping_override_clipping_by_norm_is_exact(tmp_path):
    module = OwnClipping("norm")
    callback, _ = _fit(tmp_path, module)
    traj = callback.trajectory
    assert traj.grad_scale(0) == 1.0 and all(0 < traj.grad_scale(s) < 1 for s in range(1, 4))
    _assert_exact(module.model, traj)


def test_a_configure_gradient_clipping_override_clipping_by_value_is_refused_at_its_first_step(tmp_path):
    with pytest.raises(TrajectoryError, match=r"Step 1: between backward\(\) and optimizer.step\(\) the gradient"):
        _fit(tmp_path, OwnClipping("value"))
    note(outcome="loud: TrajectoryError")


class Halving:
    """A scheduler of one's own (no torch ``LRScheduler``): halves every group's rate at every second call."""

    def __init__(self, optimizer):
        self.optimizer, self.calls = optimizer, 0

    def step(self):
        self.calls += 1
        if self.calls % 2 == 0:
            for group in self.optimizer.param_groups:
                group["lr"] /= 2

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


class OwnScheduler(CrossEntropyModule):
    """``lr_scheduler_step`` overridden to step the scheduler of one's own (Lightning requires the override)."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)
        self.rates: list[float] = []

    def configure_optimizers(self):
        opt = _sgd(self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": Halving(opt), "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step()

    def on_before_optimizer_step(self, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_an_lr_scheduler_step_override_with_a_scheduler_of_ones_own_is_exact(tmp_path):
    module = OwnScheduler()
    callback, _ = _fit(tmp_path, module, max_steps=5)
    assert module.rates == [0.2, 0.2, 0.1, 0.1, 0.05]
    _assert_exact(module.model, callback.trajectory)


# ---------------------------------------------------------------- hooks around the batch and the backward
class SkipRest(CrossEntropyModule):
    """``on_train_batch_start`` returning -1 at batch ``at`` of the first epoch: Lightning skips the rest of it."""

    def __init__(self, at: int):
        super().__init__(_mlp(), _sgd)
        self.at = at

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if self.current_epoch == 0 and batch_idx == self.at else None


@pytest.mark.parametrize("at", [2, 3])
def test_on_train_batch_start_returning_minus_1_skips_the_rest_of_the_epoch_and_is_exact(tmp_path, caplog, at):
    """-1 at batch 2 ends the epoch after its first step; at batch 3 after batch 2's backward, inside the second
    step of 2 micro-batches: the next epoch's first batch zeroes that gradient without a step. Before, the callback
    recorded batch 2 as part of the next epoch's first step: residual share 0.36 with the check off, a gradient-check
    error that named no Lightning hook with it on; now it is dropped, as in the run."""
    module = SkipRest(at)
    callback, trainer = _fit(tmp_path, module, max_steps=-1, max_epochs=2, callback_kwargs={"check_gradients": "auto"})
    assert trainer.global_step == 5 and _sizes(callback.trajectory) == [8, 8, 8, 8, 1]
    assert ("Lightning zeroed the gradients of 1 logged micro-batch(es)" in caplog.text) == (at == 3)
    _assert_exact(module.model, callback.trajectory)


class ZeroEverySecond(CrossEntropyModule):
    """``optimizer_zero_grad`` overridden to zero the gradients only before every second step."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if self.trainer.global_step % 2 == 0:
            optimizer.zero_grad()


@pytest.mark.parametrize("check", [False, "auto"])
def test_zeroing_the_gradients_every_second_step_only_is_loud(tmp_path, check):
    """Step 1's gradient holds step 0's too. The default gradient check refuses step 1 naming a gradient carried
    over from an earlier backward; with the check off the residual share (0.39) is above the threshold and warned."""
    if check:
        with pytest.raises(TrajectoryError, match=r"Step 1: the gradient from backward\(\) does not match.*no "
                                                  r"gradient carries over from an earlier backward"):
            _fit(tmp_path, ZeroEverySecond(_mlp(), _sgd), accumulate=1, callback_kwargs={"check_gradients": check})
        note(outcome="loud: TrajectoryError (gradient check)")
        return
    callback, _ = _fit(tmp_path, ZeroEverySecond(_mlp(), _sgd), accumulate=1)
    with pytest.warns(ExplaindWarning, match=r"residual share 0.39 > residual_tol=1e-07 \(auto: for a float64 run\)"):
        att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(
            callback.trajectory).transform(X_TEST)
    note(share=att.meta["residual_share"], outcome="loud: ExplaindWarning (residual share)")


class OwnDecay(CrossEntropyModule):
    """``on_after_backward`` adding an L2 term ``1e-2 * p`` to every gradient (weight decay written by hand), or the
    same decay given to SGD."""

    def __init__(self, by_hand: bool):
        super().__init__(_mlp(), lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9,
                                                                 weight_decay=0.0 if by_hand else 1e-2))
        self.by_hand = by_hand

    def on_after_backward(self):
        if self.by_hand:
            for p in self.model.parameters():
                p.grad.add_(p.detach(), alpha=1e-2)


def test_weight_decay_added_to_the_gradients_in_on_after_backward_is_refused_naming_the_optimizers_weight_decay(
        tmp_path):
    """Before, the message named clipping and noise only."""
    with pytest.raises(TrajectoryError, match=r"Step 0: between backward\(\) and optimizer.step\(\) the gradient.*"
                                              r"Lightning's on_after_backward.*weight_decay=lam"):
        _fit(tmp_path, OwnDecay(by_hand=True))
    module = OwnDecay(by_hand=False)
    callback, _ = _fit(tmp_path, module)
    _assert_exact(module.model, callback.trajectory, outcome="loud: TrajectoryError; exact with SGD(weight_decay=)")


class Normalised(CrossEntropyModule):
    """``on_after_batch_transfer`` scaling the training inputs by 2 (a normalisation written in the module)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            batch["x"] = batch["x"] * 2
        return batch


def test_inputs_scaled_in_on_after_batch_transfer_are_refused_then_exact_with_the_scaled_train_data(tmp_path):
    """Before, the refusal named collators and ``__getitem__``, no Lightning hook."""
    with pytest.raises(ConfigError, match=r"Training micro-batch 1: the model received 'inputs' that differ.*"
                                          r"on_after_batch_transfer; give the callback train_data as that hook"):
        _fit(tmp_path, Normalised(_mlp(), _sgd))
    X, y = _data()
    module = Normalised(_mlp(), _sgd)
    callback = ExplaindLightningCallback((2 * X, y), loss="cross_entropy", module="model", check_gradients=True)
    pl.Trainer(max_steps=4, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[callback], default_root_dir=str(tmp_path)).fit(
        module, torch.utils.data.DataLoader(indexed(X, y), batch_size=4, shuffle=True,
                                            generator=torch.Generator().manual_seed(3)))
    model = module.model.eval()
    with torch.no_grad():
        truth = model(2 * X_TEST)
    replica = rel_err(explaind.KernelReplica(device="cpu").fit(callback.trajectory).predict(2 * X_TEST), truth)
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(callback.trajectory).transform(
        2 * X_TEST)
    train = rel_err(att.values, Reference(callback.trajectory, 2 * X_TEST).kept(("train",)))
    note(replica=replica, share=att.meta["residual_share"], train=train,
         outcome="loud: ConfigError; exact with the scaled train_data")
    assert replica <= 1e-6 and att.meta["residual_share"] <= 1e-9 and train <= 1e-9


class Lazy(CrossEntropyModule):
    """``configure_model`` building the network when fitting starts (as for sharded models)."""

    def __init__(self):
        super().__init__(None, _sgd)

    def configure_model(self):
        if self.model is None:
            self.model = _mlp()


def test_a_model_built_in_configure_model_is_exact(tmp_path):
    module = Lazy()
    callback, _ = _fit(tmp_path, module)
    _assert_exact(module.model, callback.trajectory)


# ---------------------------------------------------------------- data
class Data(pl.LightningDataModule):
    """``setup(stage)`` builds the IndexedDataset; the loader reshuffles with a seed per epoch."""

    def setup(self, stage):
        self.train = indexed(*_data())

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=4, shuffle=True, generator=torch.Generator(
        ).manual_seed(100 + self.trainer.current_epoch))


def test_a_data_module_with_setup_and_a_reshuffle_per_epoch_is_exact(tmp_path):
    X, y = _data()
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients=False)
    module = CrossEntropyModule(_mlp(), _sgd)
    pl.Trainer(max_epochs=2, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[callback], default_root_dir=str(tmp_path), reload_dataloaders_every_n_epochs=1).fit(
        module, datamodule=Data())
    _assert_exact(module.model, callback.trajectory)


def test_a_weighted_sampler_with_replacement_and_use_distributed_sampler_false_is_exact(tmp_path):
    """``use_distributed_sampler=False`` keeps the user's ``WeightedRandomSampler``: samples drawn with replacement,
    some twice in one step (each draw logged, so counted twice)."""
    X, y = _data()
    sampler = torch.utils.data.WeightedRandomSampler(torch.linspace(1, 3, 25), 28, replacement=True,
                                                     generator=torch.Generator().manual_seed(5))
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients="auto")
    module = CrossEntropyModule(_mlp(), _sgd)
    pl.Trainer(max_steps=3, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               use_distributed_sampler=False, callbacks=[callback], default_root_dir=str(tmp_path)).fit(
        module, torch.utils.data.DataLoader(indexed(X, y), batch_size=4, sampler=sampler))
    first = callback.trajectory.batch(0)[0].tolist()
    assert len(set(first)) < len(first)  # a sample drawn twice in the first step
    _assert_exact(module.model, callback.trajectory)


# ---------------------------------------------------------------- trainer flags
class Logged(CrossEntropyModule):
    """``self.log`` of the loss and the accuracy in every ``training_step``."""

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["x"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(-1) == batch["labels"]).double().mean())
        return loss


FLAGS = {
    "benchmark": dict(benchmark=True),
    "profiler_simple": dict(profiler="simple"),
    "log_every_n_steps_1": dict(log_every_n_steps=1, logger="csv"),
}


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_trainer_flags_are_exact(tmp_path, flag):
    settings = dict(FLAGS[flag])
    if settings.get("logger") == "csv":
        settings["logger"] = CSVLogger(str(tmp_path))
    module = Logged(_mlp(), _sgd)
    callback, trainer = _fit(tmp_path, module, **settings)
    if flag == "log_every_n_steps_1":
        assert "train_loss" in trainer.logged_metrics
    _assert_exact(module.model, callback.trajectory)
