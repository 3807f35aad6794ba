"""TrajectoryRecorder in memory: recorded values checked against independent float64 loop references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import (
    PlainSGD,
    batches,
    classification_data,
    fake_adapter,
    mlp,
    regression_data,
    slow_batch_gradient,
)
from torch import nn
from torch.utils.data import TensorDataset

import explaind
from explaind.trajectory import InMemoryTrajectory, Trajectory


def _mse(out, y):
    return F.mse_loss(out, y)


def _train(model, opt, X, y, idx_list, rec=None, clip=None, loss_fn=_mse, sched=None):
    for idx in idx_list:
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if rec is not None:
            rec.log_batch(idx)
        opt.step()
        if sched is not None:
            sched.step()


def _check_sgd_identity(traj, model_template, X, y, lr, loss_fn=_mse):
    """theta_{s+1} - theta_s == -lr * c_s * sum_k w_k grad l_k(theta_s), per-sample loop in float64."""
    for s in range(traj.n_steps):
        idx, w = traj.batch(s)
        g = slow_batch_gradient(model_template, traj.params(s), loss_fn, X, y, idx, w)
        for name, d in traj.delta(s).items():
            torch.testing.assert_close(d, -lr * traj.grad_scale(s) * g[name], rtol=1e-10, atol=1e-13)


def test_plain_sgd_run_is_recorded_exactly_with_uneven_last_batch():
    X, y = regression_data(n=24)
    idx_list = batches(24, 7)  # 7, 7, 7, 3
    reference = mlp()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    _train(reference, ref_opt, X, y, idx_list)
    with fake_adapter():
        model = mlp()
        theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = PlainSGD(model.parameters(), lr=0.1)
        rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
        with rec:
            _train(model, opt, X, y, idx_list, rec)
    traj = rec.trajectory
    assert isinstance(traj, InMemoryTrajectory) and isinstance(traj, Trajectory)
    assert traj.n_steps == 4 and rec.n_steps == 4
    assert traj.manifest.adapter == "fake_sgd" and traj.manifest.loss == "mse"
    for name, p in reference.named_parameters():  # recording does not perturb training
        assert torch.equal(traj.params(4)[name], p.detach())
        assert torch.equal(traj.params(0)[name], theta0[name])
    for s, idx in enumerate(idx_list):
        got_idx, got_w = traj.batch(s)
        assert torch.equal(got_idx, idx)
        torch.testing.assert_close(got_w, torch.full((len(idx),), 1 / len(idx), dtype=torch.float64))
        assert traj.grad_scale(s) == 1.0
        u = traj.updates(s)["0.weight"]
        assert (u.a, u.b, u.P, u.q, u.n) == (0.0, 1.0, 0.1, 1.0, 0.0)
    _check_sgd_identity(traj, mlp(), X, y, 0.1)
    assert traj.audit().shape == (4,) and traj.audit().max() < 1e-12


def test_clip_grad_norm_scale_is_measured():
    X, y = regression_data(n=24)
    idx_list = batches(24, 6)
    with fake_adapter():
        model = mlp()
        opt = PlainSGD(model.parameters(), lr=0.2)
        rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=True)
        with rec:
            _train(model, opt, X, y, idx_list, rec, clip=0.05)
    traj = rec.trajectory
    for s in range(traj.n_steps):
        idx, w = traj.batch(s)
        g = slow_batch_gradient(mlp(), traj.params(s), _mse, X, y, idx, w)
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        expected = min(1.0, float(0.05 / (norm + 1e-6)))  # torch's clip coefficient
        assert expected < 1.0
        assert traj.grad_scale(s) == pytest.approx(expected, rel=1e-9)
    _check_sgd_identity(traj, mlp(), X, y, 0.2)


def test_gradient_accumulation_merges_micro_batches_and_measures_loss_scale():
    X, y = regression_data(n=24)
    micro = batches(24, 4)
    with fake_adapter():
        model = mlp()
        opt = PlainSGD(model.parameters(), lr=0.1)
        rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=True)
        with rec:
            for s in range(3):
                opt.zero_grad()
                for idx in micro[2 * s : 2 * s + 2]:
                    (_mse(model(X[idx]), y[idx]) / 2).backward()
                    rec.log_batch(idx)
                opt.step()
    traj = rec.trajectory
    assert traj.n_steps == 3
    idx, w = traj.batch(1)
    assert torch.equal(idx, torch.cat(micro[2:4]))
    torch.testing.assert_close(w, torch.full((8,), 0.25, dtype=torch.float64))
    assert [r.loss_scale for r in traj.manifest.steps] == pytest.approx([0.5, 0.5, 0.5], rel=1e-9)
    assert [traj.grad_scale(s) for s in range(3)] == pytest.approx([0.5, 0.5, 0.5], rel=1e-9)
    _check_sgd_identity(traj, mlp(), X, y, 0.1)


def test_explicit_weights_are_recorded():
    X, y = regression_data(n=12)
    with fake_adapter():
        model = mlp()
        opt = PlainSGD(model.parameters(), lr=0.1)
        rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=True)
        with rec:
            idx = torch.tensor([0, 3, 3, 5])
            w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
            opt.zero_grad()
            out = model(X[idx])
            per = ((out - y[idx]) ** 2).mean(dim=1)
            (w * per).sum().backward()
            rec.log_batch(idx, w)
            opt.step()
    traj = rec.trajectory
    assert torch.equal(traj.batch(0)[1], w)
    assert traj.grad_scale(0) == pytest.approx(1.0, rel=1e-9)
    _check_sgd_identity(traj, mlp(), X, y, 0.1)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, dampening=0.0),
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
    ],
    ids=["sgd-momentum-wd", "sgd-nesterov", "adam-l2", "adamw-amsgrad"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_real_adapters_audit_is_small(make_opt, dtype):
    X, y = classification_data(n=20, dtype=dtype)
    model = mlp(d=4, o=3, dtype=dtype)
    opt = make_opt(model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for _ in range(2):
            _train(model, opt, X, y, batches(20, 6), rec, loss_fn=F.cross_entropy)
    audit = rec.trajectory.audit()
    assert audit.shape == (8,) and np.isfinite(audit).all()
    assert audit.max() < (1e-12 if dtype == torch.float64 else 1e-5)
    assert rec.trajectory.dtype == dtype


def test_param_groups_scheduler_and_frozen_parameters():
    X, y = regression_data(n=16)
    model = mlp()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD(
        [{"params": [model[0].weight], "lr": 0.1}, {"params": list(model[2].parameters()), "lr": 0.02}],
        lr=0.1,
        momentum=0.5,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
    with rec:
        _train(model, opt, X, y, batches(16, 4), rec=rec, sched=sched)
    traj = rec.trajectory
    assert traj.param_names == ("0.weight", "2.weight", "2.bias")
    assert set(traj.constants()) == {"0.bias"}
    assert torch.equal(traj.constants()["0.bias"], model[0].bias.detach())
    for s in range(4):
        assert traj.updates(s)["0.weight"].P == pytest.approx(0.1 * 0.5**s, rel=1e-12)
        assert traj.updates(s)["2.bias"].P == pytest.approx(0.02 * 0.5**s, rel=1e-12)
    assert traj.audit().max() < 1e-12


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


def test_parameter_without_gradient_is_recorded_unchanged():
    X, y = regression_data(n=8)
    model = _TwoHeads().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
    with rec:
        _train(model, opt, X, y, batches(8, 4), rec=rec)
    traj = rec.trajectory
    u = traj.updates(1)["unused.weight"]
    assert (u.a, u.b, u.P) == (1.0, 0.0, 0.0)
    assert torch.equal(traj.params(2)["unused.weight"], traj.params(0)["unused.weight"])
    assert traj.audit().max() < 1e-12


def test_dataset_train_data_float32_and_callable_loss():
    X, y = classification_data(n=18, dtype=torch.float32)
    ds = TensorDataset(X, y)
    model = mlp(d=4, o=3, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def my_loss(out, target):
        return F.cross_entropy(out, target)

    rec = explaind.TrajectoryRecorder(model, opt, loss=my_loss, train_data=ds, check_gradients=True)
    with rec:
        _train(model, opt, X, y, batches(18, 5), rec, loss_fn=my_loss)
    traj = rec.trajectory
    assert traj.n_train == 18 and traj.n_steps == 4
    xs, ys = traj.train_samples(torch.tensor([2, 7]))
    assert torch.equal(xs, X[[2, 7]]) and torch.equal(ys, y[[2, 7]])
    assert traj.loss.name.startswith("custom:")
    assert traj.dtype == torch.float32 and traj.batch(0)[1].dtype == torch.float32
    assert traj.audit().max() < 1e-5


def test_hooks_are_removed_on_exit():
    X, y = regression_data(n=8)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
    with rec:
        _train(model, opt, X, y, batches(8, 4), rec)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    _train(model, opt, X, y, batches(8, 4))  # no log_batch needed any more
    assert rec.trajectory.n_steps == 2
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


class _BufferSGD(torch.optim.SGD):
    """SGD whose test adapter reports P as a tensor it overwrites at every step."""


class _BufferAdapter:
    def __init__(self):
        self.buffers = {}

    @classmethod
    def from_optimizer(cls, optimizer):
        return cls()

    def hyperparameters(self):
        return {}

    def before_step(self, optimizer):
        return [(float(g["lr"]), [p for p in g["params"] if p.grad is not None]) for g in optimizer.param_groups]

    def after_step(self, optimizer, before):
        out = {}
        for lr, ps in before:
            for p in ps:
                buf = self.buffers.setdefault(id(p), torch.empty_like(p))
                out[id(p)] = explaind.LinearUpdate(a=0.0, b=1.0, P=buf.fill_(lr))
        return out


def test_tensor_coefficients_are_copied_when_the_adapter_reuses_its_buffers():
    import types

    from pydantic import BaseModel

    from explaind.plugins import register_plugin, unregister_plugin
    from explaind.records import OptimizerAdapterRecord

    plugin = types.SimpleNamespace(explaind_optimizer_adapters=explaind.hookimpl(
        lambda: [OptimizerAdapterRecord(name="buffer_sgd", implementation=_BufferAdapter, config=BaseModel,
                                        description="test", optimizer_classes=(_BufferSGD,))]))
    register_plugin(plugin, name="tests_buffer_sgd")
    try:
        X, y = regression_data(n=12)
        model = mlp()
        opt = _BufferSGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
        with rec:
            _train(model, opt, X, y, batches(12, 4), rec=rec, sched=sched)
    finally:
        unregister_plugin("tests_buffer_sgd")
    traj = rec.trajectory
    for s in range(3):
        P = traj.updates(s)["0.weight"].P
        assert isinstance(P, torch.Tensor) and torch.all(P == 0.1 * 0.5**s)
    assert traj.audit().max() < 1e-12
