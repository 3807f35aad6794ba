"""Shared runs of tests/test_gaps_round14.py and tests/gaps_round14_table.py (public API only, so the table also
runs on an older library): DANN trained with sample weights scaled (the counterfactual's slow reference) and a small
dropout model recorded with the gradient check off."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from _round9_functions import dann_loss
from torch import nn

import explaind

M, H = 8, 1e-5
BATCHES = [[0, 1, 2, 3], [4, 5, 6, 1], [2, 7, 0, 5], [3, 6, 1, 4], [0, 2, 4, 6]]
_GEN = torch.Generator().manual_seed(3)
X = torch.randn(M + 3, 4, generator=_GEN, dtype=torch.float64)
Y = torch.stack([torch.randint(0, 3, (M + 3,), generator=_GEN), (X[:, 0] > 0).long()], 1)
OPTIMIZERS = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
              "adam": lambda p: torch.optim.Adam(p, lr=0.05)}


def dann_train(build, optimizer: str, scale: torch.Tensor | None = None, record: bool = False):
    """DANN trained from the same theta_0 on BATCHES, sample k's loss weighted ``scale[k] / |B|``; with ``record``,
    ``(model, trajectory)``."""
    torch.manual_seed(0)
    model = build().double()
    opt = OPTIMIZERS[optimizer](model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss=dann_loss, train_data=(X[:M], Y[:M])) if record else None
    scale = torch.ones(M, dtype=torch.float64) if scale is None else scale
    if rec is not None:
        rec.__enter__()
    for batch in BATCHES:
        idx = torch.tensor(batch)
        opt.zero_grad()
        out = model(X[idx])
        losses = (F.cross_entropy(out[:, :3], Y[idx, 0], reduction="none")
                  + F.cross_entropy(out[:, 3:], Y[idx, 1], reduction="none"))
        (losses * scale[idx] / len(batch)).sum().backward()
        if rec is not None:
            rec.log_batch(idx)
        opt.step()
    if rec is not None:
        rec.__exit__(None, None, None)
        return model, rec.trajectory
    return model


def retrained_differences(build, optimizer: str) -> torch.Tensor:
    """The slow reference: central differences of the retrained model's test outputs, ``(T, M, O)``."""
    cols = []
    for k in range(M):
        outs = []
        for sign in (1.0, -1.0):
            scale = torch.ones(M, dtype=torch.float64)
            scale[k] += sign * H
            model = dann_train(build, optimizer, scale)
            with torch.no_grad():
                outs.append(model.eval()(X[M:]))
        cols.append((outs[0] - outs[1]) / (2 * H))
    return torch.stack(cols, 1)


def compile_data():
    gen = torch.Generator().manual_seed(0)
    Xc = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    return Xc[:12], (Xc[:12, 0] > 0).long() + (Xc[:12, 1] > 0).long()


def compile_net(dropout: float) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


def record_unchecked(model, forward, steps: int = 3, before_step=None):
    Xc, yc = compile_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(Xc, yc), check_gradients=False)
    with rec:
        for s in range(steps):
            if before_step is not None:
                before_step(s)
            idx = torch.arange(4 * s, 4 * s + 4) % 12
            opt.zero_grad()
            F.cross_entropy(forward(Xc[idx]), yc[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def slow_commits(seconds: float) -> None:
    """Make every commit of the store's writer in this process ``seconds`` slower (a slow disk)."""
    from explaind.trajectory import store as store_module

    commit = store_module.StoreWriter._commit

    def delayed(self, items):
        time.sleep(seconds)
        commit(self, items)

    store_module.StoreWriter._commit = delayed
