"""The ResNet-18-shaped BatchNorm CNN trained by Lightning and recorded by ExplaindLightningCallback.

The workload of tests/test_resnet18_batchnorm.py (float64, 32x32 inputs, SGD momentum) inside a LightningModule,
with what Lightning adds: gradient accumulation over two micro-batches (each its own batch statistics), gradient
clipping, and an epoch whose last step has one micro-batch. The checks are the plain loop's
(tests/_real_loop_testkit.py): replica against the trained model in evaluation mode, residual share, and
``keep=("train",)`` against the loop reference that replays each micro-batch's batched forward.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _real_loop_testkit import RESNET_N_TRAIN, assert_resnet_exact, narrow_resnet, resnet_data, resnet_optimizer

from explaind.integrations import ExplaindLightningCallback, IndexedDataset

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS, BATCH, ACCUMULATE = 3, 4, 2


class ResNetModule(pl.LightningModule):
    """The narrow ResNet-18 as ``self.model``, trained on the mean cross entropy of each micro-batch."""

    def __init__(self):
        super().__init__()
        self.model = narrow_resnet()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch["x"]), batch["labels"])

    def configure_optimizers(self):
        return resnet_optimizer(self.parameters())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    X, y = resnet_data(torch.Generator().manual_seed(1))
    train = IndexedDataset([{"x": X[i], "labels": y[i]} for i in range(RESNET_N_TRAIN)])
    module = ResNetModule()
    callback = ExplaindLightningCallback((X[:RESNET_N_TRAIN], y[:RESNET_N_TRAIN]), loss="cross_entropy",
                                         module="model", check_gradients=True)
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(2))
    trainer = pl.Trainer(max_steps=N_STEPS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0,
                         precision="64-true", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=str(tmp_path_factory.mktemp("resnet")))
    trainer.fit(module, loader)
    return module.model.eval(), callback.trajectory, X[RESNET_N_TRAIN:]


def test_lightning_steps_hold_their_micro_batches_and_the_clipping(run):
    _, traj, _ = run
    assert traj.n_steps == N_STEPS
    # 12 samples in batches of 4: the first epoch's second step has its one remaining micro-batch
    assert [len(traj.micro_batches(s)) for s in range(N_STEPS)] == [2, 1, 2]
    assert sorted(torch.cat([traj.batch(s)[0] for s in range(2)]).tolist()) == list(range(RESNET_N_TRAIN))
    weights = torch.cat([traj.batch(s)[1] for s in range(N_STEPS)])
    assert torch.allclose(weights, torch.full_like(weights, 1 / (BATCH * ACCUMULATE)))  # Lightning divides by 2
    assert all(0 < traj.grad_scale(s) < 1 for s in range(N_STEPS))  # gradient_clip_val=1.0 clipped every step
    # the gradient check replays each micro-batch's batched forward, batch statistics included
    assert float(np.nanmax(traj.gradient_check())) <= 1e-12


def test_running_statistics_move_once_per_micro_batch(run):
    _, traj, _ = run
    counters = [n for n in traj.buffer_names if n.endswith("num_batches_tracked")]
    assert len(counters) == 20  # 20 BatchNorm2d layers
    assert [int(traj.buffers(s)[counters[0]]) for s in range(N_STEPS + 1)] == [0, 2, 3, 5]


def test_lightning_resnet_replica_and_train_scores_are_exact(run):
    assert_resnet_exact(*run)
