"""Salvage by replay for every kind of dense run, round 15 (docs/recording.md, "Salvaging a damaged store").

Round 14 proved the steps of a store written before schema 3 by replaying their recorded updates, but only for runs
whose training forward was not captured: a dropout run (the random state of each step recorded), a train-mode batch
norm run (the buffers and random state of each step recorded) and a run with a batch-coupled loss were refused ("the
run cannot be replayed"), and their steps without journal lines dropped. Each run here is recorded by a plain loop
(SGD with momentum, float64), written in the previous format by round 7's old-format writer and its journal cut after
two lines. Each replayed residual is compared with an independent float64 loop (:func:`_loop_residuals`: torch's
autograd on a fresh copy of the model loaded with theta_s, the dropout masks drawn again from the seed the loop set
before the step's forward, SGD's momentum written out); a salvaged store is compared bit for bit with the store before
the damage (every value a reader gets, after ``verify()``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _round12_kit import momentum_residuals
from safetensors import safe_open
from safetensors.torch import save as st_save
from test_store_salvage_round14 import old_format_copy as _old_store
from torch import nn

import explaind

STEPS, LR, MOMENTUM = 4, 0.05, 0.9
GEN = torch.Generator().manual_seed(15)
X, Y = torch.randn(12, 3, generator=GEN, dtype=torch.float64), torch.randn(12, 2, generator=GEN, dtype=torch.float64)
ORDER = [torch.tensor(i) for i in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [1, 3, 5, 7])]
KINDS = ("dropout", "batchnorm", "coupled")


class Net(nn.Module):
    """3-6-2 with a dropout layer, a train-mode batch norm or neither between the two linear layers."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.l1, self.l2 = nn.Linear(3, 6).double(), nn.Linear(6, 2).double()
        self.mid = {"dropout": nn.Dropout(0.3), "batchnorm": nn.BatchNorm1d(6).double()}.get(kind, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.mid(self.l1(x))))


def centred_terms(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A batch-coupled loss: each sample's squared error after the batch mean of the outputs is taken away."""
    return ((out - out.mean(0) - y) ** 2).sum(1)


def _loss(kind: str):
    return explaind.batch_coupled_loss(centred_terms) if kind == "coupled" else "mse"


def _batch_loss(kind: str, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    out = model(X[idx])
    return centred_terms(out, Y[idx]).mean() if kind == "coupled" else F.mse_loss(out, Y[idx])


def record(kind: str, store: Path, *, shift: float = 0.0, **kwargs) -> None:
    """The loop: ``torch.manual_seed(100 + s)`` before step ``s``'s forward (the dropout masks), one micro-batch of
    weights ``1/4`` per step; ``shift`` moves every initial weight (another run of the same shapes)."""
    model = Net(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    rec = explaind.TrajectoryRecorder(model, opt, loss=_loss(kind), train_data=(X, Y), store=store,
                                      background_writes=False, **kwargs)
    model.train()
    with rec:
        for s, idx in enumerate(ORDER):
            torch.manual_seed(100 + s)
            opt.zero_grad()
            _batch_loss(kind, model, idx).backward()
            rec.log_batch(idx, torch.full((len(idx),), 1.0 / len(idx), dtype=torch.float64))
            opt.step()


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("salvage15")
    for kind in KINDS:
        record(kind, root / kind)
        record(kind, root / f"{kind}-other", shift=0.01)
    return root


def _load(kind: str, store: Path) -> explaind.Trajectory:
    return explaind.Trajectory.load(store, model=Net(kind), loss=_loss(kind))


def _values(kind: str, store: Path) -> list[torch.Tensor]:
    """Every value a reader gets (theta, buffers, batches, scales, coefficients), after ``verify()``."""
    traj = _load(kind, store)
    traj.verify()
    out = [t for s in range(traj.n_steps + 1) for t in traj.params(s).values()]
    for s in range(traj.n_steps):
        out += [*traj.batch(s), torch.tensor(traj.grad_scale(s))]
        if traj.manifest.buffer_names:
            out += list(traj.buffers(s).values())
        out += [c for u in traj.updates(s).values() for c in (u.a, u.b, u.P, u.q, u.n) if isinstance(c, torch.Tensor)]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _loop_residuals(kind: str, store: Path) -> list[float]:
    """The independent reference: ``||theta_{s+1} - (theta_s - lr m_s)|| / ||theta_{s+1} - theta_s||`` with
    ``m_s = momentum m_{s-1} + g_s``, ``g_s`` by torch's autograd on a fresh model in training mode loaded with
    theta_s, under ``torch.manual_seed(100 + s)`` as the loop ran it."""
    model = Net(kind)
    model.train()

    def batch_loss(model: nn.Module, s: int) -> torch.Tensor:
        torch.manual_seed(100 + s)  # the masks the loop drew
        return _batch_loss(kind, model, ORDER[s])

    return momentum_residuals(_load(kind, store), model, batch_loss, len(ORDER), LR, MOMENTUM)


def _files(store: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _salvage(kind: str, store: Path, out: Path):
    before = _files(store)
    report = explaind.Trajectory.salvage(store, out=out, replay=True, model=Net(kind), loss=_loss(kind))
    assert _files(store) == before  # the damaged store is only read
    return report


@pytest.mark.parametrize("kind", KINDS)
def test_steps_of_a_captured_or_coupled_run_are_proven_by_replay(templates, tmp_path, kind):
    """Steps 2 and 3 lost their journal lines. Before (main at 18b3503): dropped, "the run cannot be replayed: its
    training forward was captured ..." (dropout, batch norm) or "its loss couples the samples of a batch". Now they
    are replayed under their recorded random states and buffers, their residuals equal the independent loop's to
    1e-12 (both at float64 rounding), and the salvaged store is the run bit for bit."""
    store = _old_store(templates / kind, tmp_path / "old")
    report = _salvage(kind, store, tmp_path / "out")
    assert report.kept == [(0, "checksum"), (1, "checksum"), (2, "replayed"), (3, "replayed")], report
    assert report.dropped == [] and report.replay_tolerance == 1e-7
    reference = _loop_residuals(kind, templates / kind)
    assert [s for s, _ in report.replayed] == [2, 3]
    for s, residual in report.replayed:
        assert residual <= 1e-7 and reference[s] <= 1e-7
        assert abs(residual - reference[s]) <= 1e-12, (kind, s, residual, reference[s])
    assert _same(_values(kind, tmp_path / "out"), _values(kind, templates / kind))


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_file_of_another_run_is_dropped_by_the_replay(templates, tmp_path, kind):
    """Step 2's file is another run's step 2 (same shapes; schema 2 binds no run): its replay misses by a residual of
    order 1, so it is dropped naming the residual and step 3 as following it; steps 0-1 are kept bit for bit."""
    store = _old_store(templates / kind, tmp_path / "old")
    other = _old_store(templates / f"{kind}-other", tmp_path / "other", lines=4)
    shutil.copy(other / "steps" / "000002.safetensors", store / "steps" / "000002.safetensors")
    report = _salvage(kind, store, tmp_path / "out")
    assert [s for s, _ in report.kept] == [0, 1] and [s for s, _ in report.dropped] == [2, 3]
    assert "does not continue the run" in report.dropped[0][1] and "above the tolerance 1e-07" in report.dropped[0][1]
    assert not (tmp_path / "out" / "steps" / "000002.safetensors").exists()
    assert _load(kind, tmp_path / "out").n_steps == 2


def test_a_dropout_step_file_holding_another_steps_random_state_is_dropped(templates, tmp_path):
    """The recorded random state is what the replay draws the masks from: step 3's file with step 2's state in place
    of its own (its theta_4 unchanged) gives other masks, so the replay misses and step 3 is dropped, naming the
    residual, not kept on a wrong state; the same file with its own state is kept (the control)."""
    store = _old_store(templates / "dropout", tmp_path / "old")
    assert _load("dropout", templates / "dropout").manifest.random_capture
    path = store / "steps" / "000003.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()  # not the mapped file
    with safe_open(str(store / "steps" / "000002.safetensors"), "pt") as f:
        earlier = f.get_tensor("micro.0.cpu").clone()
    assert not torch.equal(earlier, tensors["micro.0.cpu"])
    path.write_bytes(st_save({**tensors, "micro.0.cpu": earlier}, metadata=metadata))
    report = _salvage("dropout", store, tmp_path / "out")
    assert [s for s, _ in report.kept] == [0, 1, 2] and [s for s, _ in report.dropped] == [3]
    assert "does not continue the run" in report.dropped[0][1]
    path.write_bytes(st_save(tensors, metadata=metadata))
    control = _salvage("dropout", store, tmp_path / "control")
    assert [s for s, _ in control.kept] == [0, 1, 2, 3], control.dropped


def test_a_sparse_store_names_why_it_is_not_replayed(tmp_path):
    """A sparse store written before schema 3 with lost journal lines: not replayed by salvage, the reason naming the
    sparse store and the checkpoint state its step files do not name (no step is guessed)."""
    record("plain", tmp_path / "sparse", checkpoint_every=2)
    store = _old_store(tmp_path / "sparse", tmp_path / "old")
    report = explaind.Trajectory.salvage(store, out=tmp_path / "out", replay=True, model=Net("plain"))
    assert [s for s, _ in report.kept] == [0, 1] and [s for s, _ in report.dropped] == [2, 3]
    assert "a sparse store's steps are replayed whenever they are read" in report.dropped[0][1]
    assert "does not name the checkpoint state" in report.dropped[0][1]
