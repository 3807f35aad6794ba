"""Sparse stores of runs with dropout and train-mode batch norm: replayed through the recorded random states.

The reference is the dense store (``checkpoint_every=1``) of the same run: the same seeds, the same loop,
so the same dropout masks and batch statistics; it stores every ``theta_{s+1}``, coefficient and buffer as
the loop produced them. The sparse store (``k = 4``) rebuilds the steps between checkpoints by replaying
each micro-batch's training forward under its recorded generator state from the stored buffers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
K = 4
STEPS = 10
KEEP = ("step", "group", "train")


def _data(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _dropout_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 8), nn.Tanh(),
                          nn.Dropout(0.2), nn.Linear(8, 3)).to(DT)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def _batchnorm_cnn() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).to(DT)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


class _OwnNoise(nn.Module):
    """Multiplicative noise in training mode from the layer's own generator (not torch's global one)."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator().manual_seed(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + 0.4 * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)) if self.training else x


def _private_generator_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 12), _OwnNoise(), nn.Tanh(), nn.Linear(12, 3)).to(DT)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


CASES = {"dropout_mlp": (_dropout_mlp, (5,)), "batchnorm_cnn": (_batchnorm_cnn, (1, 6, 6)),
         "private_generator": (_private_generator_mlp, (5,))}


def _record(case: str, store, k: int):
    """The run of ``case`` (two micro-batches per step, clipping), recorded with ``checkpoint_every=k``."""
    build, shape = CASES[case]
    X, y = _data(40, shape, 7)
    model, opt = build()
    torch.manual_seed(11)  # the dropout masks: the same in both recordings
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:32], y[:32]), store=store,
                                      checkpoint_every=k, fsync=False)
    gen = torch.Generator().manual_seed(0)
    model.train()
    with rec:
        for _ in range(STEPS):
            opt.zero_grad()
            for _ in range(2):
                idx = torch.randperm(32, generator=gen)[:6]
                (F.cross_entropy(model(X[idx]), y[idx]) / 2).backward()
                rec.log_batch(idx, torch.full((6,), 1 / 12, dtype=DT))
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
    model.eval()
    return rec.trajectory, model, X[32:]


def _rel(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_store_of_a_coupled_run_equals_its_dense_store(tmp_path, case):
    dense, model, X_test = _record(case, tmp_path / "dense", 1)
    sparse, _, _ = _record(case, tmp_path / "sparse", K)
    assert sparse.sparse and sparse.manifest.random_capture and sparse.manifest.coupled
    replayed = [s for s, r in enumerate(sparse.manifest.steps) if not r.has_params]
    assert len(replayed) >= STEPS // 2
    for s in range(STEPS + 1):
        for n, t in dense.params(s).items():
            assert _rel(sparse.params(s)[n], t) <= 1e-12, (s, n)
        for n, t in dense.buffers(s).items():  # running statistics, stored per step
            assert torch.equal(sparse.buffers(s)[n], t), (s, n)
    for s in replayed:
        for n, u in dense.updates(s).items():
            if u.P is not None:
                assert _rel(sparse.updates(s)[n].P, u.P) <= 1e-12, (s, n)
        states = [m.state.cpu for m in sparse.micro_batches(s)]
        assert len(states) == 2 and all(torch.equal(a, m.state.cpu) for a, m in zip(states, dense.micro_batches(s)))
    gaps = sparse.replay_error()
    assert np.isfinite(gaps).sum() >= 2 and np.nanmax(gaps) <= 1e-13  # rounding level
    if case == "batchnorm_cnn":
        assert not torch.equal(sparse.buffers(STEPS)["1.running_mean"], sparse.buffers(0)["1.running_mean"])

    est = {"quadrature": "gauss-legendre", "nodes": 6, "device": "cpu"}
    atts = [explaind.InfluenceEstimator(keep=KEEP, **est).fit(t).transform(X_test) for t in (dense, sparse)]
    scale = np.linalg.norm(np.asarray(atts[0].values))
    for term in ("values", "regularization", "residual", "initial"):
        got, want = np.asarray(getattr(atts[1], term)), np.asarray(getattr(atts[0], term))
        assert np.linalg.norm(got - want) <= 1e-12 * scale, term
    assert atts[1].meta["residual_share"] <= 1e-9
    reps = [explaind.KernelReplica(**est).fit(t).predict(X_test) for t in (dense, sparse)]
    assert _rel(reps[1], reps[0]) <= 1e-12
    with torch.no_grad():  # the trained model in eval mode, final running statistics included
        assert _rel(reps[1], model(X_test)) <= 1e-6


def test_capture_random_false_is_refused_for_sparse_stores(tmp_path):
    model, opt = _dropout_mlp()
    with pytest.raises(explaind.exceptions.ConfigError, match=r"capture_random=False.*capture_random='auto'"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", store=tmp_path / "a", checkpoint_every=K,
                                    capture_random=False)
