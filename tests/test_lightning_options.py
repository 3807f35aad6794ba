"""Lightning options as people set them, recorded by ExplaindLightningCallback: exact, or refused naming the fix.

A float64 MLP (``self.model(batch["x"])`` in ``training_step``, the callback given ``train_data=(X, y)``) trained on
25 samples in batches of 4 with ``accumulate_grad_batches=2``. Lightning divides every micro-batch's mean by 2,
also the lone micro-batch that ends an epoch or a ``limit_train_batches`` window. Checked: the replica against the
trained model in evaluation mode, the residual share, and ``keep=("train",)`` against the slow loop reference of
tests/reference.py (one ``autograd.grad`` per sample, Gauss-Legendre path integrals).
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule, fit_lightning, indexed
from lightning.pytorch.callbacks import ModelCheckpoint
from reference import Reference, rel_err
from torch import Tensor, nn

import explaind
from explaind.exceptions import ConfigError
from explaind.integrations import ExplaindLightningCallback

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N, BATCH, ACCUMULATE = 25, 4, 2


def _mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).to(DT)


def _data(n: int = N) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def _fit(tmp_path, module: CrossEntropyModule, *, max_steps: int = 4, check_gradients="auto", **trainer_kwargs):
    X, y = _data()
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model",
                                         check_gradients=check_gradients)
    fit_lightning(tmp_path, module, callback, indexed(X, y), max_steps=max_steps, batch=BATCH, accumulate=ACCUMULATE,
                  precision="64-true", **trainer_kwargs)
    return module.model.eval(), callback.trajectory


def _assert_exact(model: nn.Module, traj, *, reference: bool = True) -> None:
    """Replica <= 1e-6 relative to ``model``, residual share <= 1e-9, train scores <= 1e-9 against the reference."""
    X = torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=DT)
    with torch.no_grad():
        truth = model(X)
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X)
    assert att.meta["residual_share"] <= 1e-9
    if reference:
        assert rel_err(att.values, Reference(traj, X).kept(("train",))) <= 1e-9


def test_clipping_by_value_is_refused_at_the_start_naming_norm(tmp_path):
    """Before, the recorder refused step 0 inside ``optimizer.step`` with a message that named no Lightning option."""
    with pytest.raises(ConfigError, match=r"gradient_clip_val=0.05, gradient_clip_algorithm='value'\).*Fix: "
                                          r"pl.Trainer\(gradient_clip_val=\.\.\., gradient_clip_algorithm='norm'\)"):
        _fit(tmp_path, CrossEntropyModule(_mlp(), _sgd), gradient_clip_val=0.05, gradient_clip_algorithm="value")
    model, traj = _fit(tmp_path, CrossEntropyModule(_mlp(), _sgd), gradient_clip_val=0.05,
                       gradient_clip_algorithm="norm")
    assert all(0 < traj.grad_scale(s) < 1 for s in range(traj.n_steps))  # the norm clipping acted at every step
    _assert_exact(model, traj)


class OneCycle(CrossEntropyModule):
    """AdamW with weight decay under ``OneCycleLR`` stepped every optimizer step (``interval="step"``)."""

    def __init__(self, net: nn.Module):
        super().__init__(net, _sgd)
        self.rates: list[float] = []

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_a_scheduler_stepped_every_step_is_exact(tmp_path):
    module = OneCycle(_mlp())
    model, traj = _fit(tmp_path, module, max_steps=6)
    assert len(set(module.rates)) == 6  # a new rate at every step
    _assert_exact(model, traj)


class Validated(CrossEntropyModule):
    def validation_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.model(batch["x"]), batch["labels"])
        self.log("val_loss", loss)
        return loss


def test_validation_inside_the_epoch_keeps_a_dropout_run_exact(tmp_path):
    """``val_check_interval=2`` plus the sanity check: evaluation-mode, no-grad forwards between recorded steps."""
    X, y = _data()
    module = Validated(_mlp(dropout=0.3), _sgd)
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients=True)
    loader = torch.utils.data.DataLoader(indexed(X, y), batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    held_out = torch.utils.data.DataLoader([{"x": X[i], "labels": y[i]} for i in range(8)], batch_size=BATCH)
    trainer = pl.Trainer(max_steps=5, accumulate_grad_batches=ACCUMULATE, val_check_interval=2, precision="64-true",
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, loader, held_out)
    traj = callback.trajectory
    assert "val_loss" in trainer.callback_metrics  # validation ran
    assert traj.n_steps == 5 and max(traj.gradient_check()) <= 1e-12  # every step's dropout masks replayed
    _assert_exact(module.model.eval(), traj, reference=False)  # the loop reference does not replay masks


def test_limit_train_batches_with_max_steps_inside_an_epoch_is_exact(tmp_path):
    model, traj = _fit(tmp_path, CrossEntropyModule(_mlp(), _sgd), max_steps=5, limit_train_batches=3)
    assert [traj.batch(s)[0].numel() for s in range(5)] == [8, 4, 8, 4, 8]  # 3 batches per epoch: steps of 2 and 1
    for s in range(5):  # every micro-batch's mean divided by accumulate_grad_batches, the lone one too
        assert torch.allclose(traj.batch(s)[1], torch.full_like(traj.batch(s)[1], 1 / 8), rtol=0, atol=1e-15)
    _assert_exact(model, traj)


def _resume(tmp_path, momentum: float, **callback_kwargs):
    """Two steps saved by ``ModelCheckpoint``, then a new module and callback resumed from it to step 5."""
    X, y = _data()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)

    def optimizer(params):
        return torch.optim.SGD(params, lr=0.2, momentum=momentum)

    def trainer(callbacks, max_steps):
        return pl.Trainer(max_steps=max_steps, accumulate_grad_batches=ACCUMULATE, precision="64-true",
                          accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=callbacks, default_root_dir=str(tmp_path))

    def loader():
        return torch.utils.data.DataLoader(indexed(X, y), batch_size=BATCH, shuffle=True,
                                           generator=torch.Generator().manual_seed(3))

    trainer([checkpoints, ExplaindLightningCallback((X, y), loss="cross_entropy", module="model")], 2).fit(
        CrossEntropyModule(_mlp(), optimizer), loader())
    module = CrossEntropyModule(_mlp(), optimizer)
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", **callback_kwargs)
    (saved,) = (tmp_path / "checkpoints").glob("*.ckpt")
    trainer([callback], 5).fit(module, loader(), ckpt_path=str(saved))
    return module.model.eval(), callback.trajectory


def test_resuming_with_momentum_from_a_checkpoint_is_exact_with_its_initial_state_term(tmp_path):
    """``ckpt_path`` restores the momentum buffers: the recording starts from them, their part of the resumed updates
    is the ``initial_state`` term, and the replica, the residual and the train scores stay exact."""
    model, traj = _resume(tmp_path, momentum=0.9)
    assert traj.n_steps == 3 and len(traj.initial_state()) == 4
    _assert_exact(model, traj)
    X = torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=DT)
    att = explaind.InfluenceEstimator(keep=("step",), tol=1e-11, device="cpu").fit(traj).transform(X)
    carried = att.initial_state.abs().sum() / (att.final - att.initial).abs().sum()
    assert carried >= 1e-2 and att.completeness_error() <= 1e-12


def test_a_sparse_store_resumed_with_momentum_from_a_checkpoint_is_exact(tmp_path):
    """A sparse store replays its first segment from the restored momentum, kept in its start file."""
    model, traj = _resume(tmp_path, momentum=0.9, store=tmp_path / "run", checkpoint_every=2)
    assert traj.sparse and traj.n_steps == 3 and traj.optimizer_start() is not None
    assert float(np.nanmax(traj.replay_error())) <= 1e-13
    _assert_exact(model, traj)


def test_resuming_without_optimizer_state_records_the_resumed_steps_exactly(tmp_path):
    """Plain SGD holds no state: the resumed steps are a run of their own, from the checkpoint's parameters."""
    model, traj = _resume(tmp_path, momentum=0.0)
    assert traj.n_steps == 3
    _assert_exact(model, traj)
