"""Shared set-up of tests/test_stranger_loops_*.py and tests/stranger_loops_table.py: loop features a new user writes.

Float64 runs of small tanh models (smooth, so the 8-node Gauss-Legendre rule and the slow loop references
integrate exactly), STEPS steps of BATCH random samples. :func:`measure` gives the three figures every case is
judged by: the replica's relative error against the trained model in evaluation mode, the estimator's residual
share (and its warnings), and the ``keep=("train",)`` scores' relative error against the slow float64 loop
reference (``reference.Reference``, or ``replay_reference.ReplayReference`` when dropout masks are replayed),
with the reference's own per-step residual ``Delta theta_s - sum_k D_{s,k} - R_s``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from reference import Reference, rel_err
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning

DT = torch.float64
N, STEPS, BATCH = 24, 6, 6
QUAD = {"quadrature": "gauss-legendre", "nodes": 8, "device": "cpu"}


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train inputs ``(N, 4)``, labels ``(N,)`` in 3 classes, test inputs ``(3, 4)``."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, 4, generator=gen, dtype=DT)
    return X, torch.randint(0, 3, (N,), generator=gen), torch.randn(3, 4, generator=gen, dtype=DT)


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randperm(N, generator=gen)[:BATCH] for _ in range(STEPS)]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


class NoiseLayer(nn.Module):
    """Tanh layer with a keep-mask (p=0.7) drawn from a generator the layer holds, in training mode."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.gen = torch.Generator().manual_seed(7)

    def forward(self, h):
        h = torch.tanh(self.lin(h))
        if self.training:
            h = h * (torch.rand(h.shape, generator=self.gen, dtype=h.dtype) > 0.3) / 0.7
        return h


class Checkpointed(nn.Module):
    """``x -> tanh(a x) -> block -> head``, the block (tanh layer + dropout, or :class:`NoiseLayer`) run under
    ``torch.utils.checkpoint.checkpoint(**options)`` in training mode; ``options=None``: called directly (the same
    function, what the estimators evaluate)."""

    def __init__(self, options: dict[str, Any] | None, private: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.block = NoiseLayer() if private else nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.3))
        self.head = nn.Linear(8, 3)
        self.options = options
        self.to(DT)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.options is not None and self.training:
            h = torch.utils.checkpoint.checkpoint(self.block, h, **self.options)
        else:
            h = self.block(h)
        return self.head(h)


def dropout_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).to(DT)


class NoGradBackbone(nn.Module):
    """A backbone run under ``torch.no_grad()`` (its parameters in the optimizer, never given a gradient)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone, self.head = nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3)
        self.to(DT)

    def forward(self, x):
        with torch.no_grad():
            h = self.backbone(x)
        return self.head(h)


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def adam(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=0.01)


def closure_step(where: str) -> Callable:
    """A step through ``optimizer.step(closure)``; ``rec.log_batch`` inside the closure (``"inside"``, and
    ``"keyword"``, which passes ``closure=``) or before ``step`` (``"before"``)."""
    def step(s, model, opt, X, y, idx, rec):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            if where != "before":
                rec.log_batch(idx)
            return loss

        if where == "before":
            rec.log_batch(idx)  # before the closure has run backward(): the step's gradient is read at step time
        opt.step(closure=closure) if where == "keyword" else opt.step(closure)
    return step


def autograd_step(s, model, opt, X, y, idx, rec) -> None:
    """The step's gradient from ``torch.autograd.grad``, assigned to ``.grad`` by hand."""
    opt.zero_grad()
    grads = torch.autograd.grad(F.cross_entropy(model(X[idx]), y[idx]), list(model.parameters()))
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    rec.log_batch(idx)
    opt.step()


def two_optimizer_step(first: Any, second: Any) -> Callable:
    """A step that steps ``first`` (the recorded optimizer) and then ``second``, each over part of the model."""
    def step(s, model, opt, X, y, idx, rec):
        model.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        first.step()
        second.step()
    return step


def plain(s, model, opt, X, y, idx, rec) -> None:
    """The textbook step."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def train(model: nn.Module, opt: Any, step: Callable = plain, after: Callable | None = None,
          **rec_kwargs) -> Any:
    """Record STEPS steps of ``step(s, model, opt, X, y, idx, rec)``; ``after(s)`` runs after each."""
    X, y, _ = data()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), **rec_kwargs)
    with rec:
        for s, idx in enumerate(batches()):
            step(s, model, opt, X, y, idx, rec)
            if after is not None:
                after(s)
    return rec.trajectory


def swa_run() -> tuple[nn.Module, Any, Any]:
    """SGD momentum with ``SWALR``, an ``AveragedModel`` updated from step 2 on: ``(model, average, trajectory)``."""
    model = mlp()
    opt = sgd(model)
    swa = torch.optim.swa_utils.AveragedModel(model)
    sched = torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=2)

    def after(s):
        if s >= 2:
            swa.update_parameters(model)
            sched.step()

    return model, swa, train(model, opt, after=after, check_gradients=True)


def measure(model: nn.Module, traj: Any, reference: type = Reference,
            before_reference: Callable[[], None] | None = None, X_test: torch.Tensor | None = None) -> dict[str, Any]:
    """``replica`` (relative to ``model`` in evaluation mode), ``share`` (residual share), ``scores`` (train scores
    relative to ``reference``), ``reference_residual`` (its largest per-step residual relative to its largest
    update) and ``warnings`` (the estimator's ExplaindWarning messages). ``before_reference()`` runs after the
    estimators and before the reference (e.g. switching checkpointing off: the loop reference runs plain torch).
    ``X_test``: the test inputs (default: :func:`data`'s)."""
    if X_test is None:
        _, _, X_test = data()
    with torch.no_grad():
        truth = model.eval()(X_test)
    replica = rel_err(explaind.KernelReplica(**QUAD).fit(traj).predict(X_test), truth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(traj).transform(X_test)
    if before_reference is not None:
        before_reference()
    ref = reference(traj, X_test, panels=1)
    expected = ref.kept(("train",))
    return {
        "replica": replica,
        "share": float(att.meta["residual_share"]),
        "scores": rel_err(np.asarray(att.values).reshape(expected.shape), expected),
        "reference_residual": float(ref.E.abs().max()) / max(float(torch.stack(ref.delta).abs().max()), 1e-300),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)],
    }


def assert_exact(figures: dict[str, Any]) -> None:
    """Replica <= 1e-6, residual share <= 1e-9 without a warning, scores <= 1e-9, reference residual <= 1e-12."""
    assert figures["replica"] <= 1e-6, figures
    assert figures["share"] <= 1e-9 and not figures["warnings"], figures
    assert figures["scores"] <= 1e-9, figures
    assert figures["reference_residual"] <= 1e-12, figures
