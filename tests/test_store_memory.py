"""InMemoryTrajectory.from_steps: structure, validation and error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explaind.exceptions import TrajectoryError
from explaind.records import LossRecord
from explaind.recurrence import LinearUpdate
from explaind.trajectory import InMemoryTrajectory, Trajectory


def _per_sample_mse(outputs, targets):
    return ((outputs - targets) ** 2).reshape(outputs.shape[0], -1).sum(dim=1)


MSE = LossRecord(name="mse_test", implementation=_per_sample_mse)


def _run(n_steps=3, lr=0.1, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    params = [{k: v.detach().clone() for k, v in model.named_parameters()}]
    updates, batches = [], []
    for s in range(n_steps):
        idx = torch.tensor([s, s + 1, s + 2])
        w = torch.full((3,), 1 / 3, dtype=torch.float64)
        cur = params[-1]
        out = torch.func.functional_call(model, cur, (X[idx],))
        # plain gradient descent by hand, independent of any recorder code
        cur_req = {k: v.clone().requires_grad_(True) for k, v in cur.items()}
        out = torch.func.functional_call(model, cur_req, (X[idx],))
        loss = (w * _per_sample_mse(out, y[idx])).sum()
        grads = torch.autograd.grad(loss, list(cur_req.values()))
        params.append({k: (v - lr * g).detach() for (k, v), g in zip(cur.items(), grads)})
        updates.append({k: LinearUpdate(a=0.0, b=1.0, P=lr) for k in cur})
        batches.append((idx, w))
    return model, X, y, params, updates, batches


def test_from_steps_exposes_every_member():
    model, X, y, params, updates, batches = _run()
    traj = InMemoryTrajectory.from_steps(
        model, loss=MSE, params=params, updates=updates, batches=batches, train_data=(X, y),
        grad_scales=[1.0, 0.5, 1.0], audit=[0.0, 1e-9, 2e-9], adapter="sgd", adapter_hyperparameters={"lr": 0.1},
        note="synthetic",
    )
    assert isinstance(traj, Trajectory)
    assert traj.n_steps == 3 and len(traj) == 3
    assert traj.param_names == ("weight", "bias")
    assert torch.equal(traj.params(3)["weight"], params[3]["weight"])
    assert torch.equal(traj.delta(1)["bias"], params[2]["bias"] - params[1]["bias"])
    assert traj.updates(2)["weight"].P == 0.1
    idx, w = traj.batch(1)
    assert idx.tolist() == [1, 2, 3] and w.dtype == torch.float64
    assert traj.grad_scale(1) == 0.5
    np.testing.assert_array_equal(traj.audit(), [0.0, 1e-9, 2e-9])
    xs, ys = traj.train_samples(torch.tensor([4, 0]))
    assert torch.equal(xs, X[[4, 0]]) and torch.equal(ys, y[[4, 0]])
    assert traj.n_train == 10
    assert traj.dtype == torch.float64
    assert traj.manifest.adapter == "sgd" and traj.manifest.extras == {"note": "synthetic"}
    assert traj.manifest.n_steps == 3 and [r.step for r in traj.manifest.steps] == [0, 1, 2]
    assert traj.loss is MSE and traj.model is model
    assert traj.constants() == {}
    assert list(traj.iter_steps(1)) == [1, 2]


def test_missing_update_means_unchanged_parameter():
    model, X, y, params, updates, batches = _run(n_steps=1)
    params[1]["bias"] = params[0]["bias"].clone()
    traj = InMemoryTrajectory.from_steps(
        model, loss=MSE, params=params, updates=[{"weight": updates[0]["weight"]}], batches=batches
    )
    u = traj.updates(0)["bias"]
    assert (u.a, u.b, u.P) == (1.0, 0.0, 0.0)
    assert np.isnan(traj.audit()).all()


def test_from_steps_rejects_inconsistent_input():
    model, X, y, params, updates, batches = _run()
    with pytest.raises(TrajectoryError, match=r"4 parameter states for 2 updates.*n_steps \+ 1 = 3"):
        InMemoryTrajectory.from_steps(model, loss=MSE, params=params, updates=updates[:2], batches=batches[:2])
    with pytest.raises(TrajectoryError, match="2 batches for 3 steps"):
        InMemoryTrajectory.from_steps(model, loss=MSE, params=params, updates=updates, batches=batches[:2])
    bad = [dict(p) for p in params]
    bad[2] = {"weight": bad[2]["weight"][:1], "bias": bad[2]["bias"]}
    with pytest.raises(TrajectoryError, match="Step 1: parameter names/shapes"):
        InMemoryTrajectory.from_steps(model, loss=MSE, params=bad, updates=updates, batches=batches)
    wrong = list(batches)
    wrong[0] = (torch.tensor([0.0, 1.0]), torch.ones(2))
    with pytest.raises(TrajectoryError, match="Step 0: batch indices must be a 1-D int64"):
        InMemoryTrajectory.from_steps(model, loss=MSE, params=params, updates=updates, batches=wrong)


def test_out_of_range_steps_and_missing_data_are_reported():
    model, X, y, params, updates, batches = _run()
    traj = InMemoryTrajectory.from_steps(model, loss=MSE, params=params, updates=updates, batches=batches)
    with pytest.raises(TrajectoryError, match=r"params\(4\) is out of range: parameters exist for s = 0..3"):
        traj.params(4)
    with pytest.raises(TrajectoryError, match=r"Step 3 is out of range: this trajectory has steps 0..2"):
        traj.updates(3)
    with pytest.raises(TrajectoryError, match="no training data attached"):
        traj.train_samples(torch.tensor([0]))
    with pytest.raises(TrajectoryError, match="no training data attached"):
        _ = traj.n_train
