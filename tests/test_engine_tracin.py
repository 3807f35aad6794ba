"""``quadrature="left"``: the TracIn identity against an independent per-sample-gradient loop (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_testkit import engine_run, rel
from torch import nn
from torch.func import functional_call, grad

import explaind
from explaind.kernel.quadrature import DEFAULT_NODES, RULES, rule_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.3


def _plain_sgd_run():
    """A 3 -> 5 -> 3 tanh MLP trained by plain SGD (lr 0.3) on 10 samples, fixed batches of 4."""
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(13, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=gen)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:10], y[:10]))
    batches = [torch.randperm(10, generator=gen)[:4] for _ in range(5)]
    with rec:
        for idx in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X[10:], batches


def _functions(traj):
    """``f(theta, x)`` (outputs of one input) and ``l(theta, x, y)`` on the trajectory's model."""
    model, consts = traj.model, traj.constants()

    def f(theta, x):
        return functional_call(model, {**consts, **theta}, (x[None],))[0]

    def loss(theta, x, y):
        return nn.functional.cross_entropy(functional_call(model, {**consts, **theta}, (x[None],)), y[None])

    return f, loss


def _output_grads(f, theta, x):
    """``grad_theta f(x; theta)[o]`` for every output, one ``grad`` call per output."""
    n_out = f(theta, x).shape[0]
    return [grad(lambda th, o=o: f(th, x)[o])(theta) for o in range(n_out)]


def _dot(a, b):
    return sum(float((a[k] * b[k]).sum()) for k in a)


def test_left_rule_is_public():
    assert "left" in RULES and DEFAULT_NODES["left"] == 1
    t, w = rule_nodes("left", 1)
    assert t.tolist() == [0.0] and w.tolist() == [1.0]
    t, w = rule_nodes("left", 4)
    np.testing.assert_allclose(t, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(w, [0.25] * 4)


def test_left_rule_is_tracin_for_plain_sgd():
    """TracIn with every step: ``-lr * w_{s,k} <grad f(x; theta_s), grad l_k(theta_s)>`` summed over steps."""
    traj, X_test, batches = _plain_sgd_run()
    X_train, y_train = traj.train_samples(torch.arange(10))
    f, loss = _functions(traj)
    expected = torch.zeros(X_test.shape[0], 10, 3, dtype=torch.float64)
    for s, idx in enumerate(batches):
        theta = traj.params(s)
        out_grads = [_output_grads(f, theta, x) for x in X_test]
        for k in idx.tolist():
            gk = grad(loss)(theta, X_train[k], y_train[k])
            for xi in range(X_test.shape[0]):
                for o in range(3):
                    expected[xi, k, o] += -LR * (1.0 / len(idx)) * _dot(out_grads[xi][o], gk)
    att = explaind.InfluenceEstimator(keep=("train",), quadrature="left", device="cpu").fit(traj).transform(X_test)
    assert rel(att.values, expected) <= 1e-12
    # the quadrature error is reported, large, and completes the sum
    assert rel(att.total(), att.final) <= 1e-10
    assert float(att.quadrature_error.abs().max()) > 1e-6 * float(att.values.abs().max())


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam"])
def test_left_rule_is_tracin_with_the_optimizers_coefficients(optimizer):
    """Momentum and Adam: ``sum_s grad f(x; theta_s) . D_{s,k}`` with ``D`` from the recorded coefficients."""
    run = engine_run("tanh", optimizer)
    traj = run.trajectory
    X_train, y_train = traj.train_samples(torch.arange(traj.n_train))
    f, loss = _functions(traj)
    M = traj.n_train
    buffers = [None] * M  # per-sample momentum buffer M_s[k] (name -> tensor)
    expected = torch.zeros(run.X_test.shape[0], M, 3, dtype=torch.float64)
    for s in range(traj.n_steps):
        theta, coef = traj.params(s), traj.updates(s)
        idx, weights = traj.batch(s)
        c = traj.grad_scale(s)
        fresh = [dict.fromkeys(theta, 0.0) for _ in range(M)]
        for k, w in zip(idx.tolist(), weights.tolist()):
            gk = grad(loss)(theta, X_train[k], y_train[k])
            for name in theta:
                fresh[k][name] = fresh[k][name] + c * w * gk[name]
        out_grads = [_output_grads(f, theta, x) for x in run.X_test]
        for k in range(M):
            D = {}
            new = {}
            for name in theta:
                u = coef[name]
                old = 0.0 if buffers[k] is None else buffers[k][name]
                new[name] = u.a * old + u.b * fresh[k][name]
                D[name] = -u.P * (u.q * new[name] + u.n * fresh[k][name]) * torch.ones_like(theta[name])
            buffers[k] = new
            for xi in range(run.X_test.shape[0]):
                for o in range(3):
                    expected[xi, k, o] += _dot(out_grads[xi][o], D)
    att = explaind.InfluenceEstimator(keep=("train",), quadrature="left", device="cpu").fit(traj).transform(run.X_test)
    assert rel(att.values, expected) <= 1e-12
    assert rel(att.total(), att.final) <= 1e-10


def test_left_rule_in_the_replica_reports_its_error():
    run = engine_run("tanh", "adam")
    left = explaind.KernelReplica(quadrature="left", device="cpu").fit(run.trajectory)
    exact = explaind.KernelReplica(device="cpu").fit(run.trajectory)
    assert rel(exact.predict(run.X_test), left.predict(run.X_test)) > 1e-6
