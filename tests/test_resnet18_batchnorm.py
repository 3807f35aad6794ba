"""A ResNet-18-shaped CNN with train-mode BatchNorm (SGD momentum, 32x32 inputs) decomposes exactly.

The network (tests/resnet_model.py) has the BasicBlock layout [2, 2, 2, 2] of ResNet-18 at widths 4/8/16/32, so
the slow float64 reference (tests/replay_reference.py: a plain loop replaying each step's batched training
forward, batch statistics included, and evaluating step ``s``'s path at the recorded buffers ``beta_s``) runs in
seconds. The learning rate is small so that the ReLU kinks the reference locates one by one stay few (3 to 6
per step on the explained input); the running statistics still move the outputs by about 2.5e-2.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import rel_err
from replay_reference import BufferReference
from resnet_model import ResNet18

import explaind
from explaind.exceptions import ExplaindWarning

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N_TRAIN, N_STEPS, BATCH = 12, 3, 4
QUAD = {"quadrature": "adaptive", "tol": 1e-10}


def _model() -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(widths=(4, 8, 16, 32)).to(DT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three SGD-momentum steps of the plain loop, recorded to disk; the trained model in evaluation mode."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N_TRAIN + 2, 3, 32, 32, generator=gen, dtype=DT)
    y = torch.randint(0, 10, (N_TRAIN + 2,), generator=gen)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=5e-5, momentum=0.9)
    store = tmp_path_factory.mktemp("resnet") / "run"
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:N_TRAIN], y[:N_TRAIN]),
                                      store=store)
    model.train()
    with rec:
        for _ in range(N_STEPS):
            idx = torch.randperm(N_TRAIN, generator=gen)[:BATCH]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = explaind.Trajectory.load(store, model=_model().eval())
    return model.eval(), traj, X[N_TRAIN:]


def test_every_running_statistic_is_recorded_per_step(run):
    model, traj, _ = run
    names = [n for n, _ in model.named_buffers()]
    assert len(names) == 3 * 20 and set(traj.buffer_names) == set(names)  # 20 BatchNorm2d layers
    final = dict(model.named_buffers())
    assert all(torch.equal(traj.buffers(N_STEPS)[n], final[n]) for n in names)
    assert all(int(traj.buffers(s)[n]) == s for s in range(N_STEPS + 1) for n in names if "num_batches" in n)
    assert float(np.nanmax(traj.gradient_check())) <= 1e-12  # checked through the replayed batched forward


def test_replica_is_the_trained_model_in_evaluation_mode(run):
    model, traj, X_test = run
    with torch.no_grad():
        trained = model(X_test)
    replica = explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X_test)
    assert rel_err(replica, as_numpy(trained)) <= 1e-6


def test_train_scores_match_the_replaying_loop_reference(run):
    model, traj, X_test = run
    x, target = X_test[:1], [3]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # no residual or quadrature warning
        att = explaind.InfluenceEstimator(keep=("train",), target=target, device="cpu", **QUAD).fit(traj).transform(x)
    assert att.meta["residual_share"] <= 1e-9
    ref = BufferReference(traj, x, target=target, panels=1)
    buffers = ref.buffer_terms()
    assert float(buffers.abs().max()) > 1e-3  # the running statistics moved the explained output
    # the reference's path integrals are exact, so its endpoint differences miss exactly the buffers terms
    assert float((ref.quad_error - buffers).abs().max()) <= 1e-12
    want = reference_terms(ref, att)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert rel_err(as_numpy(att.buffers), as_numpy(buffers.sum(0))) <= 1e-12
    with torch.no_grad():
        trained = model(x)[:, target]
    assert rel_err(as_numpy(att.total()), as_numpy(trained)) <= 1e-6
