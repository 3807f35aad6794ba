"""Shared pieces of the recorder/store tests: a tiny fake SGD adapter, data and slow float64 references."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

import explaind
from explaind.plugins import register_plugin, unregister_plugin
from explaind.records import OptimizerAdapterRecord
from explaind.recurrence import LinearUpdate


class PlainSGD(torch.optim.SGD):
    """torch SGD without momentum, handled in the tests by :class:`FakeSGDAdapter` (not by the real plugin)."""


class _FakeConfig(BaseModel):
    lr: float


class FakeSGDAdapter:
    """Plain gradient descent: ``Delta theta = -lr g`` (``a=0, b=1, P=lr, q=1, n=0``)."""

    def __init__(self, lr: float):
        self.lr = lr

    @classmethod
    def from_optimizer(cls, optimizer):
        return cls(float(optimizer.param_groups[0]["lr"]))

    def hyperparameters(self):
        return {"lr": self.lr}

    def before_step(self, optimizer):
        return [(float(g["lr"]), [p for p in g["params"] if p.grad is not None]) for g in optimizer.param_groups]

    def after_step(self, optimizer, before):
        return {id(p): LinearUpdate(a=0.0, b=1.0, P=lr, q=1.0, n=0.0) for lr, ps in before for p in ps}


_plugin = types.SimpleNamespace()


@explaind.hookimpl
def _fake_hook():
    return [OptimizerAdapterRecord(name="fake_sgd", implementation=FakeSGDAdapter, config=_FakeConfig,
                                   description="test adapter", optimizer_classes=(PlainSGD,))]


_plugin.explaind_optimizer_adapters = _fake_hook


@contextlib.contextmanager
def fake_adapter():
    """Register the fake SGD adapter for the duration of the block."""
    register_plugin(_plugin, name="tests_fake_sgd")
    try:
        yield
    finally:
        unregister_plugin("tests_fake_sgd")


def regression_data(n=24, d=3, o=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, o, generator=g, dtype=dtype)
    return X, y


def classification_data(n=24, d=4, classes=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def mlp(d=3, o=2, hidden=5, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, o)).to(dtype)


def classifier_setup(optimizer, options, dtype):
    """``(model, optimizer, X, y)``: a 6-16-3 tanh MLP in ``dtype``, 40 samples of 3 classes, the optimizer."""
    X, y = classification_data(n=40, d=6, classes=3, dtype=dtype, seed=3)
    model = mlp(d=6, o=3, hidden=16, dtype=dtype, seed=5)
    return model, optimizer(model.parameters(), **options), X, y


def classifier_step(model, opt, X, y, s, rec=None, size=8, seed=100):
    """Training step ``s`` of a cross-entropy classifier on ``size`` samples drawn from seed ``seed + s``."""
    idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed + s))[:size]
    opt.zero_grad()
    nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
    if rec is not None:
        rec.log_batch(idx)
    opt.step()


def spy_coefficient_buffers(monkeypatch) -> list:
    """Every buffer the recorder's ``CoefficientBuffers`` hands an adapter from now on, in order (kept alive, so
    distinct objects are distinct memory)."""
    from explaind.trajectory import _coefficients

    handed: list = []
    call = _coefficients.CoefficientBuffers.__call__

    def spy(self, param):
        handed.append(call(self, param))
        return handed[-1]

    monkeypatch.setattr(_coefficients.CoefficientBuffers, "__call__", spy)
    return handed


def fail_third_call(monkeypatch, owner, name: str, message: str) -> None:
    """``owner.name`` raises ``RuntimeError(message)`` at its third call (the others run it)."""
    function, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError(message)
        return function(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def batches(n, size, seed=0):
    """Shuffled index batches covering ``range(n)`` (the last one may be smaller)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[i : i + size] for i in range(0, n, size)]


def amp_loop(model, opt, scaler, X, y, batches, rec=None, dtype=torch.float16):
    """The fp16/bf16 autocast + GradScaler recipe over ``batches`` (cross-entropy); returns the batches of the steps
    the optimizer took (those that moved the model's first parameter)."""
    import torch.nn.functional as F

    first = next(model.parameters())
    taken = []
    for idx in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(X[idx]), y[idx])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if rec is not None:
            rec.log_batch(idx)
        before = first.detach().clone()
        scaler.step(opt)
        scaler.update()
        if not torch.equal(before, first):
            taken.append(idx)
    return taken


def slow_batch_gradient(model, params, loss_fn, X, y, indices, weights):
    """sum_k w_k grad l_k(theta), one sample at a time (independent of the recorder's vectorised check)."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i, w in zip(indices.tolist(), weights.tolist()):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        out = torch.func.functional_call(model, p, (X[i : i + 1],))
        lk = loss_fn(out, y[i : i + 1])
        grads = torch.autograd.grad(lk, list(p.values()), allow_unused=True)
        for (k, _), g in zip(p.items(), grads):
            if g is not None:
                total[k] += w * g
    return total


# --------------------------------------------------------------------------- resumable run (kill/resume tests)
RESUME_STEPS = 40


def resumable_setup():
    """Model, Adam optimizer and data of the kill/resume tests (deterministic on CPU in float64)."""
    X, y = regression_data(n=32, d=3, o=2, seed=1)
    model = mlp(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
    return model, opt, X, y


def resumable_step(model, opt, X, y, s, rec):
    """Training step ``s`` (its batch depends only on ``s``)."""
    idx = torch.randperm(32, generator=torch.Generator().manual_seed(1000 + s))[:8]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def resumable_reference(steps=RESUME_STEPS):
    """The kill/resume run recorded in memory for ``steps`` steps without interruption (their reference)."""
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
    with rec:
        for s in range(steps):
            resumable_step(model, opt, X, y, s, rec)
    return rec.trajectory


def kill_after(script: Path, step: int) -> int:
    """Run ``script`` (it prints each finished step), SIGKILL it once it printed ``step``; the last step seen."""
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        seen = -1
        deadline = time.monotonic() + 120
        while seen < step and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen = int(line) if line.strip().isdigit() else seen
        assert seen >= step, "the child did not get far enough"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return seen
