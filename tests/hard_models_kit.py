"""Models this repository does not ship, trained the way a new user would, and the exactness checks they must pass.

The runs are float64 plain loops observed by :class:`explaind.TrajectoryRecorder`, with untuned learning rates
(SGD 0.5, Adam 1e-2) and ReLU-heavy models. :func:`train` keeps its own copy of the parameters after every step,
independently of the recorder. :func:`measure` compares, on held-out inputs:

* the recorded parameters with the loop's own copies (bitwise);
* the replica with the trained model in evaluation mode, directly and through ``fidelity_report(model=...)``;
* ``keep=("train",)`` scores with the slow loop reference of tests/replay_reference.py (per-sample gradients
  one sample at a time through the replayed batched training forward, the momentum recurrence unrolled by hand,
  ReLU and SELU kinks located by bisection), whose own residual ``Delta theta - sum_k D_k - R`` must vanish;
* the residual share, with every explaind warning turned into an error.

:func:`assert_exact` asserts the bounds of issue 11 on those numbers; tests/hard_models_table.py prints them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import rel_err
from replay_reference import BufferReference, ReplayReference
from torch import Tensor, nn

import explaind
from explaind.exceptions import ExplaindWarning

__all__ = ["DT", "QUAD", "data", "seeded", "train", "measure", "assert_exact", "run_exact"]

DT = torch.float64
#: The error-controlled rule, tight enough that the kinks of an untuned ReLU run leave no quadrature error.
QUAD = {"quadrature": "adaptive", "tol": 1e-11}


def data(n: int, shape: tuple[int, ...], seed: int, *, classes: int = 3, vocab: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` float64 inputs of ``shape`` (token ids below ``vocab`` when given) and labels below ``classes``."""
    gen = torch.Generator().manual_seed(seed)
    if vocab:
        X = torch.randint(0, vocab, (n, *shape), generator=gen)
    else:
        X = torch.randn(n, *shape, generator=gen, dtype=DT)
    return X, torch.randint(0, classes, (n,), generator=gen)


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, in float64."""
    torch.manual_seed(seed)
    return build().to(DT)


def optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    """The untuned optimizers of the issue: ``"sgd"`` (lr 0.5) or ``"adam"`` (lr 1e-2)."""
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model: nn.Module, opt: str, X: Any, y: Tensor, *, steps: int = 3, batch: int = 4, micro: int = 1,
          logits: Callable[[Any], Tensor] = lambda out: out, **recorder: Any) -> tuple[Any, list[dict[str, Tensor]]]:
    """Train ``model`` with a plain loop (``micro`` micro-batches per step); the trajectory and the loop's own copies.

    ``logits`` picks the output tensor from what the model returns (a dict, a tuple, a dataclass). The copies are
    ``theta_0 .. theta_steps`` as ``named_parameters()`` held them before each step and after the last.
    """
    optim = optimizer(model, opt)
    rec = explaind.TrajectoryRecorder(model, optim, loss="cross_entropy", train_data=(X, y), **recorder)
    gen = torch.Generator().manual_seed(0)
    copies = []
    model.train()
    with rec:
        for _ in range(steps):
            copies.append({n: p.detach().clone() for n, p in model.named_parameters()})
            optim.zero_grad()
            for _ in range(micro):
                idx = torch.randperm(len(y), generator=gen)[:batch]
                (F.cross_entropy(logits(model(X[idx])), y[idx]) / micro).backward()
                rec.log_batch(idx, torch.full((batch,), 1.0 / (batch * micro), dtype=DT))
            optim.step()
    copies.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return rec.trajectory, copies


def measure(model: nn.Module, traj: Any, copies: list[dict[str, Tensor]], X_test: Any, *, buffers: bool = False,
            logits: Callable[[Any], Tensor] = lambda out: out, order: int = 8, panels: int = 2) -> dict[str, float]:
    """The errors of one run (see the module docstring); ``buffers``: training changed buffers (beta_s per step).

    ``order``, ``panels``: the reference's Gauss-Legendre nodes per panel and panels per smooth piece of a segment
    (more for the long, curved segments of attention models trained at the untuned learning rates).
    """
    got = {}
    got["params"] = max(float((traj.params(s)[n].to(DT) - c[n]).abs().max())
                        for s, c in enumerate(copies) for n in c)
    model.eval()
    with torch.no_grad():
        trained = logits(model(X_test))
    replica = explaind.KernelReplica(device="cpu", **QUAD).fit(traj)
    got["replica"] = rel_err(replica.predict(X_test), as_numpy(trained))
    got["fidelity_model"] = float(replica.fidelity_report(X_test, model=model)["model_max_rel_error"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # no residual, quadrature or fidelity warning
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **QUAD).fit(traj).transform(X_test)
    got["residual_share"] = float(att.meta["residual_share"])
    got["total"] = rel_err(as_numpy(att.total()), as_numpy(trained))
    ref = (BufferReference if buffers else ReplayReference)(traj, X_test, order=order, panels=panels)
    got["train_vs_reference"] = rel_err(as_numpy(att.values), reference_terms(ref, att)["values"])
    # the reference's own split: its per-sample terms and regularization add up to every recorded update
    moved = max(float(torch.stack(ref.delta).abs().max()), 1e-300)
    got["reference_residual"] = float(ref.E.abs().max()) / moved
    # the reference's path integrals are exact: its endpoint differences miss only the buffers terms
    missed = ref.quad_error - (ref.buffer_terms() if buffers else 0.0)
    got["reference_quadrature"] = float(missed.abs().max())
    if buffers:
        got["buffers_vs_reference"] = rel_err(as_numpy(att.buffers), as_numpy(ref.buffer_terms().sum(0)))
    return got


def assert_exact(got: dict[str, float]) -> None:
    """The bounds of issue 11: replica <= 1e-6, residual share <= 1e-9, train scores <= 1e-9 (references exact)."""
    assert got["params"] == 0.0, got
    assert got["reference_residual"] <= 1e-10 and got["reference_quadrature"] <= 1e-12, got
    assert got["replica"] <= 1e-6 and got["fidelity_model"] <= 1e-6 and got["total"] <= 1e-6, got
    assert got["residual_share"] <= 1e-9, got
    assert got["train_vs_reference"] <= 1e-9, got
    if "buffers_vs_reference" in got:
        assert got["buffers_vs_reference"] <= 1e-12, got



def run_exact(build: Callable[[], nn.Module], opt: str, X: Any, y: Tensor, *, n_train: int = 12,
              buffers: bool = False, logits: Callable[[Any], Tensor] = lambda out: out, order: int = 8,
              panels: int = 2, **recorder: Any) -> dict[str, float]:
    """Build (seeded), train on the first ``n_train`` samples, measure on the rest and :func:`assert_exact`."""
    model = seeded(build)
    traj, copies = train(model, opt, X[:n_train], y[:n_train], logits=logits, **recorder)
    got = measure(model, traj, copies, X[n_train:], buffers=buffers, logits=logits, order=order, panels=panels)
    assert_exact(got)
    return got
