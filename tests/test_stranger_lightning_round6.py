"""Lightning as people configure it, round 6: manual optimization, tuners, trainer flags; exact or loud.

The float64 MLP of tests/test_lightning_options.py (``self.model(batch["x"])``, the callback given
``train_data=(X, y)``), 25 samples in shuffled batches of 4, SGD momentum 0.9 unless a case says otherwise, the
gradient check off unless a case needs it. "Exact": replica <= 1e-6 relative to the trained model in evaluation
mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference of
tests/reference.py. The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_lightning_round6.py`` prints them).

Changed here (each test names what happened before):

* Manual optimization with one optimizer (``self.manual_backward``, ``opt.step()``, ``self.clip_gradients``,
  accumulation every k batches, ``self.lr_schedulers().step()``): before, a ``ConfigError`` at the start naming a
  hand-written recorder; now the callback records it, exactly. A loss divided by k is a global factor of the step
  the gradient check measures; with the check off it lands in the residual (warned).
* ``ModelPruning``: before, the run was recorded and only the end-of-recording warnings (hooks and parameters
  changed) and a residual share of 2 told that the steps after a pruning were not steps of the recorded
  parameters, naming no pruning; now a ``ConfigError`` at the start naming the callback and the fix.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from _framework_testkit import CrossEntropyModule, indexed
from _hf_stranger_kit import note
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    LearningRateFinder,
    LearningRateMonitor,
    ModelPruning,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from test_lightning_options import Validated, _data, _mlp, _sgd
from test_stranger_lightning_round5 import X_TEST, _assert_exact, _fit, _sizes

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindLightningCallback

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|training_step. returned .None).*")]


class Manual(CrossEntropyModule):
    """Manual optimization as Lightning's docs write it: accumulate ``every`` batches, the loss divided by ``every``
    or not, optional clipping by ``algorithm`` and a ``StepLR`` stepped after every optimizer step; ``closure`` runs
    the backward inside ``opt.step(closure=...)``."""

    def __init__(self, *, every: int = 1, divide: bool = False, clip: str | None = None, schedule: bool = False,
                 closure: bool = False):
        super().__init__(_mlp(), _sgd)
        self.automatic_optimization = False
        self.every, self.divide, self.clip, self.schedule, self.closure = every, divide, clip, schedule, closure

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()

        def backward():
            loss = F.cross_entropy(self.model(batch["x"]), batch["labels"])
            self.manual_backward(loss / self.every if self.divide else loss)
            return loss

        if self.closure:
            opt.zero_grad()
            opt.step(closure=backward)
            return
        backward()
        if (batch_idx + 1) % self.every == 0:
            if self.clip:
                self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm=self.clip)
            opt.step()
            opt.zero_grad()
            if self.schedule:
                self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
        if not self.schedule:
            return opt
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)]


MANUAL = {
    "every_batch": dict(),
    "accumulate_2_divided_clipped_scheduled": dict(every=2, divide=True, clip="norm", schedule=True),
    "accumulate_2_summed": dict(every=2),
    "closure": dict(closure=True),
}


@pytest.mark.parametrize("case", sorted(MANUAL))
def test_manual_optimization_with_one_optimizer_is_exact(tmp_path, case):
    """Before: ``ConfigError`` "supports automatic optimization" at the start."""
    module = Manual(**MANUAL[case])
    callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=2, accumulate=1,
                       callback_kwargs={"check_gradients": "auto"})
    traj = callback.trajectory
    if MANUAL[case].get("every") == 2:  # 7 batches per epoch: the 7th is accumulated with the next epoch's first
        assert _sizes(traj) == [8, 8, 8, 9, 8, 8]
        # a loss divided by 2 is the step's factor, measured by the gradient check (clipping on top: below 1/2)
        assert all(traj.grad_scale(s) < (0.5 if MANUAL[case].get("divide") else 1.0 + 1e-12)
                   for s in range(traj.n_steps))
    else:
        assert _sizes(traj) == [4] * 6 + [1] + [4] * 6 + [1]
    _assert_exact(module.model, traj)


def test_manual_accumulation_with_the_gradient_check_off_puts_the_divided_loss_in_the_residual_loudly(tmp_path):
    """The callback weights each micro-batch as its mean; the 1/2 the loop divides by is measured only by the check."""
    module = Manual(every=2, divide=True)
    callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=1, accumulate=1)
    with pytest.warns(ExplaindWarning, match=r"residual share 1 > residual_tol.*check_gradients=True"):
        att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(callback.trajectory)
        att = att.transform(X_TEST)
    assert att.meta["residual_share"] == pytest.approx(1.0, abs=1e-6)  # the data part is twice the step
    note(share=att.meta["residual_share"], outcome="loud: ExplaindWarning (exact with the check on)")


def test_manual_clipping_by_value_is_refused_by_the_recorder(tmp_path):
    with pytest.raises(TrajectoryError, match=r"changed by more than a global factor.*clip_grad_value_"):
        _fit(tmp_path, Manual(clip="value", every=1), max_steps=3, accumulate=1)
    note(outcome="loud: TrajectoryError")


class PenaltyToo(Manual):
    """A second ``manual_backward`` on the batch: an output penalty the callback's ``loss=`` does not hold."""

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = self.model(batch["x"])
        self.manual_backward(F.cross_entropy(out, batch["labels"]), retain_graph=True)
        self.manual_backward(0.1 * out.pow(2).mean())
        opt.step()
        opt.zero_grad()


def test_manual_optimization_backpropagating_another_loss_too_is_refused_naming_manual_backward(tmp_path):
    with pytest.raises(TrajectoryError, match=r"Under Lightning manual optimization the callback logs each batch.*"
                                              r"Fix: give the callback the per-sample loss"):
        _fit(tmp_path, PenaltyToo(), max_steps=3, accumulate=1, callback_kwargs={"check_gradients": "auto"})
    note(outcome="loud: TrajectoryError")


class Gan(pl.LightningModule):
    """Two optimizers stepped by hand, each on a loss of its own (the shape of a GAN's training step)."""

    def __init__(self):
        super().__init__()
        self.model = _mlp()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        out = self.model(batch["x"])
        first.zero_grad()
        self.manual_backward(F.cross_entropy(out, batch["labels"]), retain_graph=True)
        first.step()
        second.zero_grad()
        self.manual_backward(-out.logsumexp(-1).mean())
        second.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.model[0].parameters(), lr=0.1),
                torch.optim.SGD(self.model[3].parameters(), lr=0.1)]


def test_manual_optimization_with_two_optimizers_is_refused_naming_why(tmp_path):
    with pytest.raises(ConfigError, match=r"returned 2\..*With manual optimization.*loss of its own.*Fix: return "
                                          r"one optimizer with a parameter group"):
        _fit(tmp_path, Gan(), max_steps=2, accumulate=1)
    note(outcome="loud: ConfigError")


def test_model_pruning_is_refused_at_the_start_naming_it(tmp_path):
    """Before: recorded, then warnings about hooks and parameters changed after the last step, share 2.0."""
    pruning = ModelPruning("l1_unstructured", amount=0.3)
    with pytest.raises(ConfigError, match=r"ModelPruning masks the parameters between steps.*Fix: remove ModelPruning"):
        _fit(tmp_path, CrossEntropyModule(_mlp(), _sgd), max_steps=-1, max_epochs=2, callbacks=[pruning])
    note(outcome="loud: ConfigError")


def test_a_plain_loop_pruning_mid_run_is_refused_at_the_next_step():
    """What ModelPruning does, in a plain loop. Before: recorded without a word; the replica matched the pruned model
    (1e-16) and the estimator failed with torch's "a leaf Variable that requires grad is being used in an in-place
    operation". (``weight_norm`` mid-run was refused before: the optimizer then holds a tensor that is no parameter
    of the model.)"""
    X, y = _data()
    model = _mlp()
    opt = _sgd(model.parameters())
    with pytest.raises(TrajectoryError, match=r"Step 2: the recorded parameter\(s\) 0.weight \(now '0.weight_orig'\) "
                                              r"are no longer.*ModelPruning.*Fix: prune or parametrize before"):
        with explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=False) \
                as rec:
            for s in range(4):
                if s == 2:
                    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.3)
                idx = torch.arange(4 * s, 4 * s + 4)
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
    note(outcome="loud: TrajectoryError")


FLAGS = {  # pl.Trainer settings no other test sets
    "num_sanity_val_steps_2": dict(num_sanity_val_steps=2, val=True),
    "overfit_batches_2": dict(overfit_batches=2, max_steps=-1, max_epochs=3),
    "fast_dev_run_3": dict(fast_dev_run=3),
    "reload_dataloaders_every_epoch": dict(reload_dataloaders_every_n_epochs=1, max_steps=-1, max_epochs=2),
    "detect_anomaly": dict(detect_anomaly=True),
    "learning_rate_monitor": dict(callbacks=[LearningRateMonitor(logging_interval="step")], logger=True),
}


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_trainer_flags_are_exact(tmp_path, flag):
    settings = dict(FLAGS[flag])
    val = settings.pop("val", False)
    if settings.pop("logger", False):
        settings["logger"] = CSVLogger(str(tmp_path / "logs"))
    module = Validated(_mlp(), _sgd) if val else CrossEntropyModule(_mlp(), _sgd)
    callback, trainer = _fit(tmp_path, module, **{"max_steps": 4, **settings}, val=val)
    traj = callback.trajectory
    assert traj.n_steps == trainer.global_step >= 2
    if flag == "overfit_batches_2":  # the same two batches (unshuffled) every epoch
        assert traj.batch(0)[0].tolist() == traj.batch(1)[0].tolist() == list(range(8))
    _assert_exact(module.model, traj)


def test_fit_twice_continues_with_a_new_callback_and_refuses_a_used_one(tmp_path):
    """The second ``fit`` builds a new optimizer (``configure_optimizers``): its run starts from the first's end."""
    module = CrossEntropyModule(_mlp(), _sgd)
    first, trainer = _fit(tmp_path, module, max_steps=3)
    with pytest.raises(TrajectoryError, match=r"has recorded a run already; create a new one"):
        pl.Trainer(max_steps=2, precision="64-true", accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[first]).fit(module, torch.utils.data.DataLoader(indexed(*_data()), batch_size=4))
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    second, _ = _fit(tmp_path, module, max_steps=3)
    traj = second.trajectory
    assert all(torch.equal(traj.params(0)[k], start[k]) for k in start)
    _assert_exact(module.model, traj, outcome="exact; loud: TrajectoryError for a used callback")


def test_torch_compile_of_the_lightning_module_is_exact(tmp_path):
    module = torch.compile(CrossEntropyModule(_mlp(), _sgd), backend="aot_eager")
    callback, _ = _fit(tmp_path, module, max_steps=4)
    _assert_exact(module.model, callback.trajectory)


class Tunable(CrossEntropyModule):
    """The learning rate as the ``lr`` attribute the learning-rate finder sets."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)
        self.lr, self.rates = 0.2, []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def on_before_optimizer_step(self, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


class Loaders(pl.LightningDataModule):
    """A shuffled loader of the indexed items with the ``batch_size`` attribute the batch-size finder sets."""

    def __init__(self):
        super().__init__()
        self.batch_size = 4

    def train_dataloader(self):
        return torch.utils.data.DataLoader(indexed(*_data()), batch_size=self.batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(3))


def _tuned(tmp_path, module, *, callbacks=(), tune=None):
    X, y = _data()
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients=False)
    trainer = pl.Trainer(max_steps=4, precision="64-true", accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, *callbacks], default_root_dir=str(tmp_path))
    data = Loaders()
    if tune is not None:
        tune(Tuner(trainer), module, data)
    trainer.fit(module, datamodule=data)
    return callback.trajectory, data


TUNERS = {
    "tuner_lr_find": dict(tune=lambda t, m, d: t.lr_find(m, datamodule=d, num_training=20, min_lr=1e-3, max_lr=0.5,
                                                 early_stop_threshold=None)),
    "learning_rate_finder_callback": dict(callbacks=[LearningRateFinder(num_training_steps=20, min_lr=1e-3,
                                                                        max_lr=0.5, early_stop_threshold=None)]),
    "tuner_scale_batch_size": dict(tune=lambda t, m, d: t.scale_batch_size(m, datamodule=d, max_trials=3,
                                                                           steps_per_trial=2)),
    "batch_size_finder_callback": dict(callbacks=[BatchSizeFinder(max_trials=3, steps_per_trial=2)]),
}


@pytest.mark.parametrize("tuner", sorted(TUNERS))
def test_tuners_train_and_restore_and_the_recorded_run_is_the_real_one(tmp_path, tuner):
    """The finders run training steps and then restore the weights; the callback records only the real run."""
    module = Tunable()
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    traj, data = _tuned(tmp_path, module, **TUNERS[tuner])
    assert traj.n_steps == 4 and all(torch.equal(traj.params(0)[k], start[k]) for k in start)
    if "lr" in tuner or "learning" in tuner:
        assert module.lr != 0.2  # the finder's suggestion was set
        assert module.rates[-4:] == [module.lr] * 4  # the recorded run's steps use it
    else:
        assert data.batch_size == 8 and _sizes(traj) == [8, 8, 8, 1]  # 2, 4, 8 tried; 25 samples
    _assert_exact(module.model, traj)


class Backbone(CrossEntropyModule):
    """``backbone`` (the first layer) frozen by ``BackboneFinetuning`` until epoch 1, then a new parameter group."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)
        self.backbone = self.model[0]

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.2, momentum=0.9)


def test_backbone_finetuning_is_refused_then_exact_with_record_frozen(tmp_path):
    def finetuning():
        return BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5)

    with pytest.raises(TrajectoryError, match=r"would update 0.weight, 0.bias, which had requires_grad=False.*"
                                              r"record_frozen=True"):
        _fit(tmp_path, Backbone(), max_steps=-1, max_epochs=3, callbacks=[finetuning()])
    module = Backbone()
    callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=3, callbacks=[finetuning()],
                       callback_kwargs={"record_frozen": True})
    traj = callback.trajectory
    assert traj.n_steps == 12  # 7 batches an epoch, accumulation 2: 4 steps per epoch
    _assert_exact(module.model, traj, outcome="loud: TrajectoryError; exact with record_frozen=True")
