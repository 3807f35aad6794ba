"""Lightning as people configure it, round 7: exact, or loud naming the cause and the fix.

The float64 MLP of tests/test_lightning_options.py (``self.model(batch["x"])``, the callback given
``train_data=(X, y)``), 25 samples in shuffled batches of 4, SGD momentum 0.9 unless a case says otherwise, the
gradient check off unless a case needs it (``_fit`` of tests/test_stranger_lightning_round5.py). "Exact": replica
<= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9
relative to the slow float64 loop reference of tests/reference.py. The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_lightning_round7.py`` prints them).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule, indexed
from _hf_stranger_kit import note
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from test_lightning_options import DT, Validated, _data, _mlp, _sgd
from test_stranger_lightning_round5 import X_TEST, _assert_exact, _fit, _sizes

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindLightningCallback

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|training_step. returned .None).*")]


def test_max_time_zero(tmp_path):
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, trainer = _fit(tmp_path, module, max_steps=10, max_time={"seconds": 0})
    print(trainer.global_step, callback.trajectory.n_steps)
    _assert_exact(module.model, callback.trajectory)


class StopAt(pl.Callback):
    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            trainer.should_stop = True


def test_stop_mid_accumulation(tmp_path):
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, trainer = _fit(tmp_path, module, max_steps=10, callbacks=[StopAt(2)])
    print(trainer.global_step, _sizes(callback.trajectory))
    _assert_exact(module.model, callback.trajectory)


def test_check_val_every_n_epoch(tmp_path):
    module = Validated(_mlp(), _sgd)
    callback, trainer = _fit(tmp_path, module, max_steps=-1, max_epochs=3, val=True, check_val_every_n_epoch=2)
    print(trainer.global_step, _sizes(callback.trajectory))
    _assert_exact(module.model, callback.trajectory)


class DictStep(CrossEntropyModule):
    def training_step(self, batch, batch_idx):
        logits = self.model(batch["x"])
        return {"loss": F.cross_entropy(logits, batch["labels"]),
                "accuracy": (logits.argmax(-1) == batch["labels"]).double().mean()}


def test_dict_step(tmp_path):
    module = DictStep(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module)
    _assert_exact(module.model, callback.trajectory)


class EditGrads(CrossEntropyModule):
    def __init__(self, how):
        super().__init__(_mlp(), _sgd)
        self.how = how

    def on_before_optimizer_step(self, optimizer):
        for name, p in self.model.named_parameters():
            if self.how == "halve" or name.startswith("0."):
                p.grad.mul_(0.5)


@pytest.mark.parametrize("how", ["halve", "first_layer"])
@pytest.mark.parametrize("check", [False, "auto"])
def test_edit_grads(tmp_path, how, check):
    module = EditGrads(how)
    callback, _ = _fit(tmp_path, module, callback_kwargs={"check_gradients": check})
    _assert_exact(module.model, callback.trajectory)


def test_ema(tmp_path):
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, callbacks=[EMAWeightAveraging(decay=0.5)])
    _assert_exact(module.model, callback.trajectory)


class WarmUp(CrossEntropyModule):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step < 3:
            scale = min(1.0, float(self.trainer.global_step + 1) / 3)
            for pg in optimizer.param_groups:
                pg["lr"] = scale * 0.2


def test_optimizer_step_override(tmp_path):
    module = WarmUp(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, max_steps=5)
    _assert_exact(module.model, callback.trajectory)


def test_float32_module_under_64_true(tmp_path):
    X, y = _data()
    module = CrossEntropyModule(_mlp().float(), _sgd)
    callback = ExplaindLightningCallback((X.float(), y), loss="cross_entropy", module="model", check_gradients=False)
    loader = torch.utils.data.DataLoader(indexed(X.float(), y), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    pl.Trainer(max_steps=4, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[callback], default_root_dir=str(tmp_path)).fit(module, loader)
    print(next(module.model.parameters()).dtype)
    _assert_exact(module.model, callback.trajectory)


def test_limit_train_batches_fraction(tmp_path):
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=2, limit_train_batches=0.5)
    print(_sizes(callback.trajectory))
    _assert_exact(module.model, callback.trajectory)


def test_resume_last(tmp_path):
    X, y = _data()

    def run(callbacks, max_steps, ckpt=None):
        module = CrossEntropyModule(_mlp(), _sgd)
        loader = torch.utils.data.DataLoader(indexed(X, y), batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(3))
        pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
                   logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                   default_root_dir=str(tmp_path)).fit(module, loader, ckpt_path=ckpt)
        return module

    run([ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=2)], 3)
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients=False)
    module = run([ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=2), callback], 5,
                 "last")
    print(_sizes(callback.trajectory))
    _assert_exact(module.model, callback.trajectory)
