"""Lightning as people configure it, round 11: exact, or loud naming the cause and the fix.

The float64 MLP of tests/test_lightning_options.py (``self.model(batch["x"])``, the callback given
``train_data=(X, y)``), 25 samples in shuffled batches of 4, SGD momentum 0.9 unless a case says otherwise,
accumulation 2, gradient check off (``_fit`` of tests/test_stranger_lightning_round5.py), so that nothing it measures
hides a wrong weight. "Exact": replica <= 1e-6 relative to the trained model in evaluation mode, residual share
<= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference (tests/reference.py). The figures
go to ``_hf_stranger_kit.MEASURED`` (``python tests/hf_strangers_table.py test_stranger_lightning_round11.py``).

Fixed here: a callback given ``store=`` and ``resume=True`` on a ``fit(..., ckpt_path=...)`` whose checkpoint is
not at the store's last step was refused with the recorder's advice to call ``rec.restore()`` before ``with rec:``,
which a Lightning user cannot do; the refusal now names ``ckpt_path``, both steps and the fix.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule, indexed
from _hf_stranger_kit import note
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import grad_norm
from test_lightning_options import Validated, _data, _mlp, _sgd
from test_stranger_lightning_round5 import _assert_exact, _fit, _sizes
from torch import nn

from explaind.exceptions import ConfigError, TrajectoryError
from explaind.integrations import ExplaindLightningCallback

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|training_step. returned .None).*"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


class Configured(CrossEntropyModule):
    """``configure_optimizers`` as people return it; the learning rate of every step in ``rates``."""

    def __init__(self, kind: str):
        super().__init__(_mlp(), _sgd)
        self.kind, self.rates = kind, []

    def configure_optimizers(self):
        first, last = self.model[0].parameters(), self.model[3].parameters()
        if self.kind == "epoch_interval_frequency_2":
            opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                                       "interval": "epoch", "frequency": 2}}
        if self.kind == "two_groups_two_lambdas":
            opt = torch.optim.SGD([{"params": first, "lr": 0.2}, {"params": last, "lr": 0.05, "weight_decay": 0.01}],
                                  lr=0.1, momentum=0.9)
            lambdas = [lambda s: 1 / (1 + s), lambda s: 0.8 ** s]
            return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambdas), "interval": "step"}]
        if self.kind == "adamw_clipped_every_step":
            return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)
        opt = torch.optim.Adam(self.parameters(), lr=0.05)  # "adam_cosine_annealing_per_step"
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4),
                                                   "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        self.rates.append(tuple(g["lr"] for g in optimizer.param_groups))


CONFIGURED = {  # the kind, pl.Trainer settings, the micro-batch sizes of the steps
    "epoch_interval_frequency_2": dict(max_steps=-1, max_epochs=4),
    "two_groups_two_lambdas": dict(max_steps=5),
    "adamw_clipped_every_step": dict(gradient_clip_val=1e-3),
    "adam_cosine_annealing_per_step": dict(max_steps=6, accumulate=1),
}


@pytest.mark.parametrize("kind", sorted(CONFIGURED))
def test_configure_optimizers_as_people_return_it_is_exact(tmp_path, kind):
    module = Configured(kind)
    callback, trainer = _fit(tmp_path, module, **CONFIGURED[kind])
    traj = callback.trajectory
    assert traj.n_steps == trainer.global_step
    if kind == "epoch_interval_frequency_2":  # 4 steps an epoch; halved after every second epoch
        assert [r[0] for r in module.rates] == [0.2] * 8 + [0.1] * 8
    if kind == "two_groups_two_lambdas":
        assert module.rates[2] == pytest.approx((0.2 / 3, 0.05 * 0.64))
    if kind == "adamw_clipped_every_step":
        assert all(traj.grad_scale(s) < 1 for s in range(traj.n_steps))
    if kind == "adam_cosine_annealing_per_step":
        assert module.rates[4] == (0.0,) and len(set(module.rates)) >= 5  # a step at rate 0 at the cosine's end
    _assert_exact(module.model, traj)


def test_accumulation_4_over_epochs_of_7_batches_is_exact(tmp_path):
    """Steps of 4 and 3 micro-batches, each divided by 4 as Lightning divides it, the last one too."""
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=2, accumulate=4)
    traj = callback.trajectory
    assert _sizes(traj) == [16, 9, 16, 9]
    assert float(traj.batch(1)[1][0]) == pytest.approx(1 / 16, abs=1e-15)  # 1/4 of a mean over 4 samples
    _assert_exact(module.model, traj)


def test_an_integer_limit_of_train_batches_with_accumulation_is_exact(tmp_path):
    """``limit_train_batches=5`` with accumulation 2 over two epochs: steps of 2, 2 and 1 micro-batches each."""
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=2, limit_train_batches=5)
    assert _sizes(callback.trajectory) == [8, 8, 4] * 2
    _assert_exact(module.model, callback.trajectory)


def test_early_stopping_at_a_validation_inside_an_accumulation_is_exact(tmp_path):
    """``val_check_interval=3`` with accumulation 2: the first validation runs after the first micro-batch of the
    second step, and ``EarlyStopping(divergence_threshold=...)`` stops there; the unstepped micro-batch is dropped."""
    module = Validated(_mlp(), _sgd)
    stop = EarlyStopping(monitor="val_loss", divergence_threshold=0.0, check_on_train_epoch_end=False)
    callback, trainer = _fit(tmp_path, module, max_steps=-1, max_epochs=3, val=True, val_check_interval=3,
                             callbacks=[stop])
    assert trainer.global_step == 1 and stop.stopped_epoch == 0
    assert _sizes(callback.trajectory) == [8]
    _assert_exact(module.model, callback.trajectory)


class Edited(CrossEntropyModule):
    """Lightning hooks people override: zeroing gradients without ``None``, logging the gradient norm, a frozen
    first layer."""

    def __init__(self, kind: str):
        super().__init__(_mlp(), _sgd)
        self.kind, self.norms = kind, []
        if kind == "frozen_first_layer":
            self.model[0].requires_grad_(False)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=self.kind != "zero_grad_to_zeros")

    def on_before_optimizer_step(self, optimizer):
        if self.kind == "grad_norm_logged":
            self.norms.append(grad_norm(self.model, norm_type=2)["grad_2.0_norm_total"])
            self.log_dict(grad_norm(self.model, norm_type=2))


@pytest.mark.parametrize("kind", ["zero_grad_to_zeros", "grad_norm_logged", "frozen_first_layer"])
def test_overridden_hooks_that_leave_the_steps_alone_are_exact(tmp_path, kind):
    module = Edited(kind)
    callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=2)
    traj = callback.trajectory
    assert traj.n_steps == 8
    if kind == "frozen_first_layer":
        assert tuple(traj.param_names) == ("3.weight", "3.bias")
    if kind == "grad_norm_logged":
        assert len(module.norms) == 8 and all(n > 0 for n in module.norms)
    _assert_exact(module.model, traj)


class ManualPlateau(CrossEntropyModule):
    """Manual optimization stepping a ``ReduceLROnPlateau`` by hand on each batch's loss."""

    def __init__(self):
        super().__init__(_mlp(), lambda params: torch.optim.SGD(params, lr=2.0))
        self.automatic_optimization = False
        self.rates = []

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=2.0)
        return [opt], [torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)]

    def training_step(self, batch, batch_idx):
        opt, plateau = self.optimizers(), self.lr_schedulers()
        opt.zero_grad()
        loss = F.cross_entropy(self.model(batch["x"]), batch["labels"])
        self.manual_backward(loss)
        self.rates.append(opt.param_groups[0]["lr"])
        opt.step()
        plateau.step(loss.detach())


def test_manual_optimization_with_a_plateau_schedule_stepped_by_hand_is_exact(tmp_path):
    module = ManualPlateau()
    callback, _ = _fit(tmp_path, module, max_steps=6, accumulate=1)
    assert len(set(module.rates)) >= 2  # the plateau schedule halved the rate
    _assert_exact(module.model, callback.trajectory)


# ---------------------------------------------------------------- resuming the recording with fit(ckpt_path=...)
def _recorded_fit(tmp_path, max_steps: int, ckpt_path=None, **callback_kwargs):
    """A float64 run with ``ModelCheckpoint(every_n_train_steps=2)``, recorded into ``tmp_path / "run"``."""
    X, y = _data()
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients=False,
                                         store=tmp_path / "run", save_optimizer_state=True, **callback_kwargs)
    saves = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    module = CrossEntropyModule(_mlp(), lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1))
    loader = torch.utils.data.DataLoader(indexed(X, y), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
               logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, saves],
               default_root_dir=str(tmp_path)).fit(module, loader, ckpt_path=ckpt_path)
    return module.model.eval(), callback.trajectory


def _checkpoint(tmp_path, step: int) -> str:
    (saved,) = (tmp_path / "checkpoints").glob(f"*step={step}.ckpt")
    return str(saved)


def test_the_recording_resumes_with_fit_from_a_checkpoint_and_is_exact_across_the_resume(tmp_path):
    """Two AdamW steps recorded into a store with a checkpoint at step 2, then a new module and callback with
    ``resume=True`` and ``fit(..., ckpt_path=<step 2>)``: one run of 5 steps, no ``initial_state`` term."""
    _recorded_fit(tmp_path, 2)
    model, traj = _recorded_fit(tmp_path, 5, ckpt_path=_checkpoint(tmp_path, 2), resume=True)
    assert traj.n_steps == 5 and not traj.initial_state()
    _assert_exact(model, traj)


def test_a_store_resumed_at_another_step_than_the_checkpoint_is_refused_naming_ckpt_path(tmp_path):
    """The store holds 4 steps, the checkpoint is step 2's. Before: ``Call rec.restore() before `with rec:```."""
    _recorded_fit(tmp_path, 4)
    refusal = (r"(?s)The store .*run' goes on from step 4 \(its last step with a stored optimizer state\), but "
               r"trainer.fit\(..., ckpt_path=...\) started training at step 2.*Fix: resume training from the "
               r"checkpoint of step 4.*ModelCheckpoint")
    with pytest.raises(TrajectoryError, match=refusal):
        _recorded_fit(tmp_path, 6, ckpt_path=_checkpoint(tmp_path, 2), resume=True)
    note(outcome="loud: TrajectoryError (store resumed at another step than ckpt_path)")


# ---------------------------------------------------------------- a parameter of the LightningModule outside module=
class Tempered(CrossEntropyModule):
    """A learned temperature of the LightningModule, outside the recorded ``self.model``, trained with it."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)
        self.temperature = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch["x"]) / self.temperature, batch["labels"])


class TemperedMLP(nn.Module):
    """The fix: the temperature inside the recorded model."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.temperature = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        return self.net(x) / self.temperature


def test_a_parameter_outside_the_recorded_module_is_refused_naming_it_then_exact_inside_it(tmp_path):
    """Before: the recorder's ``TrajectoryError`` "The optimizer holds 1 parameter tensor(s) that are not parameters
    of the model: group 0 position 0 shape ()" with a plain loop's fix; now a ``ConfigError`` when training starts
    naming the attribute, ``module=`` and the fix, which is exact (the temperature recorded and explained)."""
    refusal = (r"ExplaindLightningCallback\(module='model'\) records the LightningModule's attribute 'model', but "
               r"configure_optimizers also steps its parameter\(s\) \['temperature'\].*Fix: make them part of the "
               r"recorded model")
    with pytest.raises(ConfigError, match=refusal):
        _fit(tmp_path, Tempered())
    module = CrossEntropyModule(TemperedMLP(), _sgd)
    callback, _ = _fit(tmp_path, module)
    assert "temperature" in callback.trajectory.param_names
    assert float(module.model.temperature) != 2.0
    _assert_exact(module.model, callback.trajectory)
