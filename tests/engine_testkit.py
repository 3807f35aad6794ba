"""Tiny recorded runs for the engine tests (float64 MLPs, a handful of steps, cached per process)."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import explaind

KEEP_AXES = ("step", "group", "param", "train")


def keep_combinations() -> list[tuple[str, ...]]:
    """Every valid ``keep`` (subsets without both ``group`` and ``param``), canonical order."""
    out = []
    for r in range(len(KEEP_AXES) + 1):
        for combo in itertools.combinations(KEEP_AXES, r):
            if not ("group" in combo and "param" in combo):
                out.append(combo)
    return out


@dataclass(frozen=True)
class EngineRun:
    trajectory: explaind.Trajectory
    model: nn.Module
    X_test: Tensor
    y_test: Tensor


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=0.01)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.02)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.05, weight_decay=0.01)
    raise KeyError(name)


@functools.cache
def engine_run(activation: str = "tanh", optimizer: str = "sgd", steps: int = 6, dtype: str = "float64",
               hidden: int = 6) -> EngineRun:
    """Train a 3 -> hidden -> 3 MLP on 12 samples (batches of 4) and record it."""
    dt = {"float64": torch.float64, "float32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(16, 3, generator=gen, dtype=torch.float64).to(dt) * 1.5
    y = torch.randint(0, 3, (16,), generator=gen)
    X_train, y_train, X_test, y_test = X[:12], y[:12], X[12:], y[12:]
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(3, hidden), act(), nn.Linear(hidden, 3)).to(dt)
    opt = _optimizer(optimizer, model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X_train, y_train))
    loss_fn = nn.CrossEntropyLoss()
    with rec:
        for _ in range(steps):
            idx = torch.randperm(12, generator=gen)[:4]
            opt.zero_grad()
            loss_fn(model(X_train[idx]), y_train[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return EngineRun(rec.trajectory, model, X_test, y_test)


def rel(a, b) -> float:
    """``max|a - b| / max|b|`` in float64."""
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale
