"""A ResNet-18-shaped CNN with train-mode BatchNorm (SGD momentum, 32x32 inputs) decomposes exactly.

The network (tests/resnet_model.py) has the BasicBlock layout [2, 2, 2, 2] of ResNet-18 at widths 4/8/16/32, so
the slow float64 reference (tests/replay_reference.py: a plain loop replaying each step's batched training
forward, batch statistics included, and evaluating step ``s``'s path at the recorded buffers ``beta_s``) runs in
seconds. The learning rate is small so that the ReLU kinks the reference locates one by one stay few (3 to 6
per step on the explained input); the running statistics still move the outputs by about 2.5e-2. The checks
are shared with the Lightning run of tests/test_integrations_resnet18.py (tests/_real_loop_testkit.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _real_loop_testkit import RESNET_N_TRAIN, assert_resnet_exact, narrow_resnet, resnet_data, resnet_optimizer

import explaind

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS, BATCH = 3, 4


def record_resnet(store):
    """Three SGD-momentum steps of the plain loop, recorded to ``store`` and loaded back; the trained model in
    evaluation mode and the two test images."""
    gen = torch.Generator().manual_seed(1)
    X, y = resnet_data(gen)
    model = narrow_resnet()
    opt = resnet_optimizer(model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy",
                                      train_data=(X[:RESNET_N_TRAIN], y[:RESNET_N_TRAIN]), store=store)
    model.train()
    with rec:
        for _ in range(N_STEPS):
            idx = torch.randperm(RESNET_N_TRAIN, generator=gen)[:BATCH]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = explaind.Trajectory.load(store, model=narrow_resnet().eval())
    return model.eval(), traj, X[RESNET_N_TRAIN:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return record_resnet(tmp_path_factory.mktemp("resnet") / "run")


def test_every_running_statistic_is_recorded_per_step(run):
    model, traj, _ = run
    names = [n for n, _ in model.named_buffers()]
    assert len(names) == 3 * 20 and set(traj.buffer_names) == set(names)  # 20 BatchNorm2d layers
    assert all(int(traj.buffers(s)[n]) == s for s in range(N_STEPS + 1) for n in names if "num_batches" in n)
    assert float(np.nanmax(traj.gradient_check())) <= 1e-12  # checked through the replayed batched forward


def test_replica_and_train_scores_match_the_trained_model_and_the_replaying_loop_reference(run):
    assert_resnet_exact(*run)
