"""Set-up of tests/test_stranger_round5.py and tests/stranger_round5_table.py: the fifth round of cases a new user
brings (written from docs/quickstart.md and docs/guide_own_model.md only).

Every case is a float64 plain loop: SGD at the untuned learning rate 0.5 (or the case's optimizer), 3 steps of 4
of 12 samples, explained on 2 held-out inputs. :func:`fit` trains, :func:`figures` measures the replica against the
trained model in evaluation mode, the residual share (and every ExplaindWarning), and the ``keep=("train",)`` scores
against the slow loop reference of tests/replay_reference.py, whose own residual from the actual parameter changes it
reports too. The models and losses are in tests/_round5_models.py, the loops and the cases in tests/_round5_cases.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hard_models_kit import data
from reference import rel_err
from replay_reference import ReplayReference
from torch import Tensor, nn

import explaind
from explaind.exceptions import ExplaindWarning

DT = torch.float64


QUAD = {"quadrature": "adaptive", "tol": 1e-11, "device": "cpu"}


N_TRAIN, STEPS, BATCH = 12, 3, 4


XV, YV = data(14, (4,), 3)


XI, YI = data(14, (1, 6, 6), 1)


XS, YS = data(14, (6, 3), 2)


XT, YT = data(14, (5,), 4, vocab=7)


def head(mid: Callable[[nn.Module, Tensor], Tensor] | None = None, hidden: int = 8, out: int = 3) -> nn.Module:
    """``x (n, 4) -> tanh(a x) -> mid(h) -> b``."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, hidden), nn.Linear(hidden, out)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h if mid is None else mid(self, h))
    return Head()


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, its real floating tensors in float64 (unless the model sets
    ``keep_dtypes``)."""
    torch.manual_seed(seed)
    model = build()
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and not getattr(model, "keep_dtypes", False):
            t.data = t.data.to(DT)
    return model


def sgd(model: nn.Module, lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def plain_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The textbook step."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def fit(build: Callable[[], nn.Module] | nn.Module, X: Any, y: Tensor, *, loss: Any = "cross_entropy",
        batch_loss: Callable | None = None, opt: Callable[[nn.Module], Any] = sgd, step: Callable = plain_step,
        after: Callable[[int, nn.Module], None] | None = None, steps: int = STEPS,
        **recorder: Any) -> tuple[nn.Module, Any]:
    """Train on the first N_TRAIN samples: ``(model, trajectory)``.

    ``batch_loss(out, y)`` is the loop's loss (default: ``loss`` when it is a callable, else cross entropy);
    ``step(model, opt, X, y, idx, rec, batch_loss)`` one step; ``after(s, model)`` runs after step ``s``.
    """
    model = build if isinstance(build, nn.Module) else seeded(build)
    batch_loss = batch_loss or (loss if callable(loss) else F.cross_entropy)
    optim = opt(model)
    Xt, yt = X[:N_TRAIN], y[:N_TRAIN]
    rec = explaind.TrajectoryRecorder(model, optim, loss=loss, train_data=(Xt, yt), **recorder)
    gen = torch.Generator().manual_seed(0)
    model.train()
    with rec:
        for s in range(steps):
            step(model, optim, Xt, yt, torch.randperm(N_TRAIN, generator=gen)[:BATCH], rec, batch_loss)
            if after is not None:
                after(s, model)
    return model, rec.trajectory


def _flat(t: Any) -> np.ndarray:
    t = t.logits if hasattr(t, "logits") else t
    return np.asarray(torch.as_tensor(t).detach(), dtype=np.float64).reshape(len(t), -1)


def figures(model: nn.Module, traj: Any, X_test: Any, *, reference: type = ReplayReference,
            truth: Tensor | None = None, **quad: Any) -> dict[str, Any]:
    """``replica`` (relative to ``model`` in evaluation mode, or to ``truth``), ``share`` (residual share),
    ``scores`` (train scores relative to ``reference``), ``reference_residual`` (its largest per-step residual
    relative to its largest update) and ``warnings`` (every ExplaindWarning of the replica and the estimator)."""
    quad = {**QUAD, **quad}
    with torch.no_grad():
        truth = model.eval()(X_test) if truth is None else truth
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = rel_err(_flat(explaind.KernelReplica(**quad).fit(traj).predict(X_test)), _flat(truth))
        att = explaind.InfluenceEstimator(keep=("train",), **quad).fit(traj).transform(X_test)
    ref = reference(traj, X_test, panels=2)
    expected = ref.kept(("train",))
    return {"replica": replica, "share": float(att.meta["residual_share"]),
            "scores": rel_err(np.asarray(att.values.detach()).reshape(expected.shape), expected),
            "reference_residual": float(ref.E.abs().max()) / max(float(torch.stack(ref.delta).abs().max()), 1e-300),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]}


class KinkMarks(nn.Module):
    """Returns its input. A model calls it on values whose sign changes are kinks of its forward that no module
    shows (a functional ``F.hardsigmoid``, the pixel lattice of ``F.grid_sample``), for :class:`KinkReference`."""

    def forward(self, marks: Tensor) -> Tensor:
        return marks


class KinkReference(ReplayReference):
    """The slow reference, its quadrature split where the output of a model's ``marks`` (:class:`KinkMarks`)
    changes sign too."""

    kink_outputs = ("marks",)


def assert_exact(got: dict[str, Any]) -> None:
    """Replica <= 1e-6, residual share <= 1e-9 with no warning, scores <= 1e-9, reference residual <= 1e-10."""
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"], got
    assert got["scores"] <= 1e-9 and got["reference_residual"] <= 1e-10, got

