"""Set-up of tests/test_hf_zoo_round9.py, tests/test_hf_zoo_round9_more.py and tests/hf_zoo_round9_table.py: Hugging
Face architectures built from tiny configs (random weights, no downloads) and trained in a plain loop.

Every case is a :class:`Case`: a model, its inputs (a mapping, ``N`` training rows then ``N_TEST`` held-out rows),
targets, the loop's own loss on the model's ``ModelOutput`` (the model's own loss with ``labels`` in the call where
it has one), the per-sample loss the recorder is given, and a per-sample loss written as a plain loop for the
reference. :func:`record` trains it in float64 (3 steps of 4 random samples, AdamW 0.02 unless the case names
another optimizer or rate, dropout on where the config has it, the recorder's gradient check at 1e-12), and
:func:`figures` measures the run: the replica against the trained model in evaluation mode, the residual share,
and ``keep=("train",)`` against tests/_hf_testkit.py's slow float64 ``MappingReplayReference`` (each micro-batch's
recorded dropout masks replayed, one ``autograd.grad`` per sample, Gauss-Legendre path integrals), whose own
quadrature error must vanish. :func:`assert_exact` holds them to 1e-6, 1e-9 and 1e-9.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _hf_testkit import MappingReplayReference
from reference import rel_err
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import explaind
from explaind.exceptions import ExplaindWarning

DT = torch.float64
VOCAB, LENGTH, N, N_TEST = 32, 8, 12, 2
ROWS = N + N_TEST

__all__ = ["DT", "LENGTH", "N", "N_TEST", "ROWS", "VOCAB", "Case", "assert_exact", "assert_float32_exact", "figures",
           "next_token", "record", "run", "token_ids"]


def token_ids(seed: int, rows: int = ROWS, length: int = LENGTH) -> Tensor:
    """Token ids in ``1..VOCAB-1``, ``(rows, length)``."""
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits_of(out: Any) -> Tensor:
    """The logits of a model's output, as explaind's output adapter picks them (a tensor, or ``.logits``)."""
    return out if torch.is_tensor(out) else out.logits


@dataclass
class Case:
    """One architecture in a plain loop.

    ``build()`` returns the model (built under ``torch.manual_seed(0)``); ``data()`` the inputs ``X`` (a mapping of
    ``ROWS`` rows) and targets ``y``; ``step(model, xb, yb)`` the loop's scalar loss on a batch; ``loss`` the
    recorder's per-sample loss (a registered name or a callable); ``ref_loss(out, y)`` the reference's per-sample
    loss, a loop independent of ``loss``; ``target`` what is explained (``"loss"``, ``None`` or logit indices).
    """

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], tuple[dict[str, Tensor], Tensor]]
    step: Callable[[nn.Module, dict[str, Tensor], Tensor], Tensor]
    loss: Any
    ref_loss: Callable[[Any, Tensor], Tensor]
    target: Any = "loss"
    optimizer: str = "adamw"
    lr: float = 0.02
    panels: int = 8
    tol: float = 1e-10
    recorder: dict[str, Any] = field(default_factory=lambda: {"capture_random": True})
    notes: dict[str, Any] = field(default_factory=dict)


def _rows(X: dict[str, Tensor], idx) -> dict[str, Tensor]:
    return {k: v[idx] if torch.is_tensor(v) else v for k, v in X.items()}


def record(case: Case, *, check: bool = True):
    """Train ``case`` for 3 steps of 4 of its ``N`` training rows; returns the model (evaluation mode), the
    trajectory, the held-out inputs and targets."""
    torch.manual_seed(0)
    model = case.build().to(DT).train()
    X, y = case.data()
    train_X, train_y = _rows(X, slice(0, N)), y[:N]
    if case.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=case.lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=case.lr, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss=case.loss, train_data=(train_X, train_y),
                                      check_gradients=check, **case.recorder)
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(3):
            idx = torch.randperm(N, generator=gen)[:4]
            opt.zero_grad()
            case.step(model, _rows(train_X, idx), train_y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory, _rows(X, slice(N, ROWS)), y[N:]


class NoFloat32(TorchFunctionMode):
    """Every conversion to float32 inside the block converts to float64 instead: ``.float()``, ``.to(float32)``,
    ``.type(float32)`` and ``dtype=torch.float32`` arguments (softmax upcasts), so a model that computes parts of
    its forward in float32 whatever its dtype (RMS norms, routers, state-space scans) runs wholly in float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in (kwargs or {}).items()}
        if func is Tensor.float:
            func = Tensor.double
        elif func in (Tensor.to, Tensor.type):
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


class Float64ReplayReference(MappingReplayReference):
    """``MappingReplayReference`` whose explained function runs under :class:`NoFloat32` (the model's function in
    float64, as explaind's default ``casts="auto"`` explains it); the training gradients, one ``autograd.grad`` per
    sample through each replayed micro-batch, round as the run did."""

    def _logits(self, vec: Tensor, x: dict[str, Tensor]) -> Tensor:
        with NoFloat32():
            return super()._logits(vec, x)


def figures(case: Case, model: nn.Module, traj, X_test: dict[str, Tensor], y_test: Tensor,
            reference: bool | type = True) -> dict[str, Any]:
    """Replica error against ``model`` (evaluation mode), residual share, ``keep=("train",)`` error against the
    replaying loop reference, that reference's own quadrature error (both NaN without ``reference``), the
    conversions to float32 explaind found, the gradient check's largest mismatch and the explaind warnings raised.

    ``reference`` may name the reference class (default :class:`Float64ReplayReference`); one with a method
    ``figures(attribution)`` adds the figures it returns."""
    with torch.no_grad():
        truth = logits_of(model(**X_test)).reshape(N_TEST, -1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
        est = explaind.InfluenceEstimator(keep=("train",), target=case.target, tol=case.tol, device="cpu")
        att = est.fit(traj).transform(X_test, y_test if case.target == "loss" else None)
    train = ref_quad = float("nan")
    more: dict[str, Any] = {}
    if reference:
        kwargs = dict(target=case.target, loss_fn=case.ref_loss, panels=case.panels)
        if case.target == "loss":
            kwargs["y"] = y_test
        ref = (reference if isinstance(reference, type) else Float64ReplayReference)(traj, X_test, **kwargs)
        train, ref_quad = rel_err(att.values, ref.kept(("train",))), float(ref.quad_error.abs().max())
        more = ref.figures(att) if hasattr(ref, "figures") else {}
    return {"replica": rel_err(replica, truth), "share": float(att.meta["residual_share"]), "train": train,
            "ref_quad": ref_quad,
            "check": float(np.nanmax(traj.gradient_check())),
            "casts": len(att.meta.get("promoted_casts") or ()),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)], **more}


def run(case: Case, reference: bool | type = True) -> dict[str, Any]:
    """:func:`record` then :func:`figures`."""
    return figures(case, *record(case), reference=reference)


def assert_exact(got: dict[str, Any], train_tol: float = 1e-9) -> None:
    """Replica <= 1e-6, residual share <= 1e-9, train scores <= ``train_tol``, the reference's quadrature <= 1e-11,
    gradient check <= 1e-12, no warning."""
    assert got["ref_quad"] <= 1e-11 and got["check"] <= 1e-12, got
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["train"] <= train_tol, got
    assert not got["warnings"], got


def assert_float32_exact(got: dict[str, Any]) -> None:
    """A model that computes parts of its forward in float32 whatever its dtype: the conversions are found
    (``meta["promoted_casts"]``), the replica is within 1e-6 of the trained model, and the training gradients,
    which round in float32 there, leave a residual share <= 1e-7 and train scores within 1e-6 of the reference
    (whose per-sample gradients round so too, in another order); the reference's quadrature <= 1e-11, no warning."""
    assert got["casts"] > 0 and got["ref_quad"] <= 1e-11 and got["check"] <= 1e-7, got
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-7 and got["train"] <= 1e-6, got
    assert not got["warnings"], got


def next_token(out: Any, labels: Tensor) -> Tensor:
    """The loop's mean next-token cross entropy over the labels that are not -100 (``ignore_index``)."""
    logits = logits_of(out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
