"""The ResNet-18-shaped BatchNorm CNN trained by Lightning and by the Hugging Face Trainer, recorded by their callbacks.

The workload of tests/test_resnet18_batchnorm.py (float64, 32x32 inputs, SGD momentum) with what the frameworks
add: gradient accumulation over two micro-batches (each with its own batch statistics), gradient clipping, and an
epoch whose last step has one micro-batch. Lightning divides every micro-batch's mean by the accumulation steps;
the Trainer (with ``compute_loss_func``) divides the step's summed losses by the samples the step has. The checks
are the plain loop's (tests/_real_loop_testkit.py): replica against the trained model in evaluation mode,
residual share, and ``keep=("train",)`` against the loop reference that replays each micro-batch's batched forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _framework_testkit import CrossEntropyModule, KeywordInput, fit_lightning, hf_trainer, indexed
from _real_loop_testkit import (
    RESNET_LR,
    RESNET_N_TRAIN,
    assert_resnet_exact,
    narrow_resnet,
    resnet_data,
    resnet_optimizer,
)

from explaind.integrations import ExplaindLightningCallback, ExplaindTrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS, BATCH, ACCUMULATE = 3, 4, 2


def _lightning(tmp_path, X, y):
    module = CrossEntropyModule(narrow_resnet(), resnet_optimizer)
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients=True)
    fit_lightning(tmp_path, module, callback, indexed(X, y), max_steps=N_STEPS, batch=BATCH, accumulate=ACCUMULATE,
                  precision="64-true", gradient_clip_val=1.0)
    return module.model, callback.trajectory


def _trainer(tmp_path, X, y):
    model = KeywordInput(narrow_resnet())
    callback = ExplaindTrainerCallback((X, y), loss="cross_entropy", check_gradients=True)
    hf_trainer(tmp_path, model, callback, indexed(X, y), max_steps=N_STEPS, batch=BATCH, accumulate=ACCUMULATE,
               lr=RESNET_LR, max_grad_norm=1.0).train()
    return model, callback.trajectory


#: Per framework: how it trains, and each step's sample weight (the Trainer's last step of the epoch has 4 samples).
FRAMEWORKS = {"lightning": (_lightning, [1 / 8, 1 / 8, 1 / 8]), "trainer": (_trainer, [1 / 8, 1 / 4, 1 / 8])}


def record_framework_resnet(tmp_path, framework: str):
    """The ResNet run trained by ``framework`` ("lightning" or "trainer"): the trained model in evaluation mode, the
    trajectory, the two test images."""
    X, y = resnet_data(torch.Generator().manual_seed(1))
    model, traj = FRAMEWORKS[framework][0](tmp_path, X[:RESNET_N_TRAIN], y[:RESNET_N_TRAIN])
    return model.eval(), traj, X[RESNET_N_TRAIN:]


@pytest.fixture(scope="module", params=sorted(FRAMEWORKS))
def run(request, tmp_path_factory):
    return (*record_framework_resnet(tmp_path_factory.mktemp(request.param), request.param),
            FRAMEWORKS[request.param][1])


def test_steps_hold_their_micro_batches_weights_and_clipping(run):
    _, traj, _, weights = run
    assert traj.n_steps == N_STEPS
    # 12 samples in batches of 4: the first epoch's second step has its one remaining micro-batch
    assert [len(traj.micro_batches(s)) for s in range(N_STEPS)] == [2, 1, 2]
    assert sorted(torch.cat([traj.batch(s)[0] for s in range(2)]).tolist()) == list(range(RESNET_N_TRAIN))
    for s, w in enumerate(weights):
        assert torch.allclose(traj.batch(s)[1], torch.full_like(traj.batch(s)[1], w))
    assert all(0 < traj.grad_scale(s) < 1 for s in range(N_STEPS))  # clipping at 1.0 acted at every step
    # the gradient check replays each micro-batch's batched forward, batch statistics included
    assert float(np.nanmax(traj.gradient_check())) <= 1e-12


def test_running_statistics_move_once_per_micro_batch(run):
    _, traj, _, _ = run
    counters = [n for n in traj.buffer_names if n.endswith("num_batches_tracked")]
    assert len(counters) == 20  # 20 BatchNorm2d layers
    assert [int(traj.buffers(s)[counters[0]]) for s in range(N_STEPS + 1)] == [0, 2, 3, 5]


def test_replica_and_train_scores_are_exact(run):
    assert_resnet_exact(*run[:3])
