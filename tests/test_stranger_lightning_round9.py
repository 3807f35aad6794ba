"""Lightning as people configure it, round 9: exact, or loud naming the cause and the fix.

The float64 MLP of tests/test_lightning_options.py (``self.model(batch["x"])``, the callback given
``train_data=(X, y)``), 25 samples in shuffled batches of 4, SGD momentum 0.9, accumulation 2, the gradient check
off unless a case needs it (``_fit`` of tests/test_stranger_lightning_round5.py). "Exact": replica <= 1e-6
relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to
the slow float64 loop reference of tests/reference.py. The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_lightning_round9.py`` prints them).

Fixed here: the batches of several training dataloaders (a dict or list of loaders given to ``fit``, a
``CombinedLoader``) were refused with a ``TrajectoryError`` saying the loader must serve an ``IndexedDataset``
collated to a mapping, which it did; now a ``ConfigError`` naming the several loaders and the fix (one
``IndexedDataset`` through one loader).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule, indexed
from _hf_stranger_kit import note
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.utilities import CombinedLoader
from test_lightning_options import _data, _mlp, _sgd
from test_stranger_lightning_round5 import X_TEST, _assert_exact, _fit, _sizes

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning
from explaind.integrations import ExplaindLightningCallback

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|training_step. returned .None).*")]


class Validated(CrossEntropyModule):
    """With a validation step (evaluation mode, no gradient) and an optional ``dataloader_idx``."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.model(batch["x"]), batch["labels"]))


TRAINERS = {  # Trainer arguments no other test sets
    "barebones": dict(barebones=True),
    "all_sanity_val_steps_and_no_inference_mode": dict(num_sanity_val_steps=-1, inference_mode=False,
                                                       val_check_interval=2),
    "checkpoint_every_step_weights_only": dict(enable_checkpointing=True),  # _fit switches it off
    "throughput_monitor": dict(),
    "limit_val_batches_and_check_every_epoch": dict(max_steps=-1, max_epochs=2, limit_val_batches=1,
                                                    check_val_every_n_epoch=1),
}

CALLBACKS = {
    "checkpoint_every_step_weights_only": lambda path: [ModelCheckpoint(dirpath=str(path), every_n_train_steps=1,
                                                                        save_weights_only=True, save_top_k=-1)],
    "throughput_monitor": lambda path: [ThroughputMonitor(batch_size_fn=lambda batch: batch["x"].shape[0])],
}


@pytest.mark.parametrize("option", sorted(TRAINERS))
def test_trainer_options_are_exact(tmp_path, option):
    module = Validated()
    callback, trainer = _fit(tmp_path, module, val=True, callbacks=CALLBACKS.get(option, lambda p: [])(tmp_path),
                             **TRAINERS[option])
    traj = callback.trajectory
    assert traj.n_steps == trainer.global_step > 0
    if option == "limit_val_batches_and_check_every_epoch":
        assert _sizes(traj) == [8, 8, 8, 1] * 2  # 7 batches an epoch: steps of 2, 2, 2 and 1 micro-batches
    if option == "checkpoint_every_step_weights_only":
        assert len(list(tmp_path.glob("*.ckpt"))) == traj.n_steps
    _assert_exact(module.model, traj)


class TwoLoaders(CrossEntropyModule):
    """``training_step`` on the batches of two loaders: the sum of their mean losses."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)

    def training_step(self, batch, batch_idx):
        parts = batch.values() if isinstance(batch, dict) else batch
        return sum(F.cross_entropy(self.model(part["x"]), part["labels"]) for part in parts)


@pytest.mark.parametrize("form", ["dict", "list", "combined_min_size"])
def test_several_training_dataloaders_are_refused_naming_one_indexed_dataset(tmp_path, form):
    """Before: ``TrajectoryError`` "the training dataloader must serve an IndexedDataset, collated to a mapping"
    (it did); now the several loaders and the fix are named."""
    X, y = _data()

    def loader(seed):
        return torch.utils.data.DataLoader(indexed(X, y), batch_size=4, shuffle=True,
                                           generator=torch.Generator().manual_seed(seed))

    loaders = {"a": loader(1), "b": loader(2)}
    if form == "list":
        loaders = list(loaders.values())
    if form == "combined_min_size":
        loaders = CombinedLoader(loaders, "min_size")
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model")
    trainer = pl.Trainer(max_steps=4, precision="64-true", accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"Training batch 0 holds the batches of several training dataloaders .*"
                                          r"Fix: serve all items through one IndexedDataset"):
        trainer.fit(TwoLoaders(), loaders)
    note(outcome="loud: ConfigError (several training dataloaders)")


class DoubledBackward(CrossEntropyModule):
    """A ``backward`` override that backpropagates twice the loss Lightning hands it (a loss weight set there)."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)

    def backward(self, loss, *args, **kwargs):
        (2 * loss).backward()


@pytest.mark.parametrize("check", ["auto", False])
def test_a_backward_override_scaling_the_loss_is_measured_or_warned(tmp_path, check):
    """The gradient check measures the factor 2 (exact); with the check off the factor lands in the residual, a
    share of about 1/2 that the estimator warns about."""
    module = DoubledBackward()
    callback, _ = _fit(tmp_path, module, callback_kwargs={"check_gradients": check})
    traj = callback.trajectory
    if check == "auto":
        assert traj.grad_scale(0) == pytest.approx(2.0, rel=1e-12)
        _assert_exact(module.model, traj)
        return
    with pytest.warns(ExplaindWarning, match=r"residual share 0\.\d+ > residual_tol"):
        att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X_TEST)
    note(share=att.meta["residual_share"], outcome="loud: ExplaindWarning (residual share, loss doubled unmeasured)")
    assert att.meta["residual_share"] > 0.1
