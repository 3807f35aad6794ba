"""Two real-loop workloads shared by the plain-loop and the framework-callback tests, with their exactness checks.

* A ResNet-18-shaped CNN with train-mode BatchNorm (tests/resnet_model.py at widths 4/8/16/32, float64, 32x32
  inputs, SGD momentum with a small learning rate so the ReLU kinks the reference locates stay few), checked
  against ``BufferReference`` (tests/replay_reference.py: the batched training forward replayed with its batch
  statistics, step ``s``'s path at the recorded buffers ``beta_s``).
* A dropout MLP trained in float32 under ``torch.autocast`` (float16 with a ``GradScaler``, or bfloat16), checked
  against ``ReplayReference`` (the dropout masks replayed from the captured random states). The residual share
  is the autocast rounding, not rounding level: tests/test_amp_dropout.py says why and measures it.

``*_figures`` measure a run (the errors against the trained model and the reference, for the tests and for
tests/issue11_table.py); ``assert_*`` hold those figures to their bounds.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import rel_err
from replay_reference import BufferReference, ReplayReference
from resnet_model import ResNet18
from torch import Tensor, nn

import explaind
from explaind.exceptions import ExplaindWarning

#: ResNet run: training set size, SGD learning rate, and the adaptive quadrature that follows the ReLU kinks.
RESNET_N_TRAIN, RESNET_LR = 12, 5e-5
RESNET_QUAD = {"quadrature": "adaptive", "tol": 1e-10}
#: Dropout-MLP run: training set size, SGD learning rate, and an 8-node Gauss-Legendre rule (tanh is smooth).
MLP_N_TRAIN, MLP_LR = 40, 0.2
MLP_QUAD = {"quadrature": "gauss-legendre", "nodes": 8}
#: The gradient check's largest mismatch under autocast, and the measured range of the residual share.
AMP_CHECK_TOL = {"float16": 2e-3, "bfloat16": 2e-2}
AMP_SHARE_RANGE = {"float16": (2e-5, 1e-3), "bfloat16": (2e-4, 5e-3)}


def narrow_resnet() -> ResNet18:
    """ResNet-18 at widths 4/8/16/32, float64, seeded."""
    torch.manual_seed(0)
    return ResNet18(widths=(4, 8, 16, 32)).to(torch.float64)


def resnet_data(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``RESNET_N_TRAIN + 2`` images ``(n, 3, 32, 32)`` in float64 and labels in ``0..9``; the last two are tests."""
    X = torch.randn(RESNET_N_TRAIN + 2, 3, 32, 32, generator=gen, dtype=torch.float64)
    return X, torch.randint(0, 10, (RESNET_N_TRAIN + 2,), generator=gen)


def resnet_optimizer(params) -> torch.optim.SGD:
    """SGD with momentum 0.9 at a learning rate small enough for the reference's kink search."""
    return torch.optim.SGD(params, lr=RESNET_LR, momentum=0.9)


def resnet_figures(model: nn.Module, traj, X_test: Tensor) -> dict[str, float]:
    """The recorded ResNet run measured against the trained ``model`` (evaluation mode) and ``BufferReference``.

    Asserts what is not a figure: the final buffers recorded as the model holds them, no ``ExplaindWarning``
    (residual or quadrature) on one input and one logit. Returns the relative errors ``replica`` (against
    ``model(X_test)``), ``train`` (``keep=("train",)`` against the reference), ``buffers`` (the buffers term
    against the reference's), ``total`` (against the trained logit) and ``ref_quad`` (the reference's own path
    error less its buffers terms, absolute), the ``residual_share`` and ``buffers_moved`` (largest reference
    buffers term).
    """
    final = dict(model.named_buffers())
    assert set(traj.buffer_names) == set(final)
    assert all(torch.equal(traj.buffers(traj.n_steps)[n], final[n]) for n in final)
    with torch.no_grad():
        trained = model(X_test)
    replica = explaind.KernelReplica(device="cpu", **RESNET_QUAD).fit(traj).predict(X_test)
    x, target = X_test[:1], [3]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # no residual or quadrature warning
        att = explaind.InfluenceEstimator(keep=("train",), target=target, device="cpu", **RESNET_QUAD).fit(
            traj).transform(x)
    ref = BufferReference(traj, x, target=target, panels=1)
    buffers = ref.buffer_terms()
    return {"replica": rel_err(replica, as_numpy(trained)), "residual_share": att.meta["residual_share"],
            "train": rel_err(as_numpy(att.values), reference_terms(ref, att)["values"]),
            "buffers": rel_err(as_numpy(att.buffers), as_numpy(buffers.sum(0))),
            "total": rel_err(as_numpy(att.total()), as_numpy(trained[:1, target])),
            "ref_quad": float((ref.quad_error - buffers).abs().max()), "buffers_moved": float(buffers.abs().max())}


def assert_resnet_exact(model: nn.Module, traj, X_test: Tensor) -> None:
    """``resnet_figures`` within the bounds: replica <= 1e-6, residual share <= 1e-9, train scores <= 1e-9,
    buffers term <= 1e-12, total <= 1e-6; the running statistics moved the output (> 1e-3) and the reference's
    path integrals are exact (its endpoint differences miss exactly the buffers terms, <= 1e-12)."""
    got = resnet_figures(model, traj, X_test)
    assert got["buffers_moved"] > 1e-3 and got["ref_quad"] <= 1e-12
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["total"] <= 1e-6
    assert got["train"] <= 1e-9 and got["buffers"] <= 1e-12


def dropout_mlp() -> nn.Sequential:
    """``Linear(6, 32) - Tanh - Dropout(0.2) - Linear(32, 3)`` in float32, seeded."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 3))


def mlp_data(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``MLP_N_TRAIN + 4`` float32 inputs ``(n, 6)`` and labels in ``0..2``; the last four are tests."""
    X = torch.randn(MLP_N_TRAIN + 4, 6, generator=gen)
    return X, torch.randint(0, 3, (MLP_N_TRAIN + 4,), generator=gen)


def mlp_optimizer(params) -> torch.optim.SGD:
    """SGD with momentum 0.9."""
    return torch.optim.SGD(params, lr=MLP_LR, momentum=0.9)


def record_autocast_mlp(precision: str, optimizer, steps: int, batch: int):
    """The dropout MLP trained by the documented recipe: ``torch.autocast("cpu", dtype)`` (none for "float32"),
    float16 with ``GradScaler("cpu", init_scale=1024)`` handed to the recorder (``unscale_`` before the step);
    ``optimizer(params)`` builds the optimizer. Returns the trained model (evaluation mode), the trajectory and
    the four test inputs."""
    gen = torch.Generator().manual_seed(2)
    X, y = mlp_data(gen)
    model = dropout_mlp()
    opt = optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if precision == "float16" else None
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:MLP_N_TRAIN], y[:MLP_N_TRAIN]),
                                      grad_scaler=scaler)
    model.train()
    with rec:
        for _ in range(steps):
            idx = torch.randperm(MLP_N_TRAIN, generator=gen)[:batch]
            opt.zero_grad()
            with torch.autocast("cpu", dtype=getattr(torch, precision), enabled=precision != "float32"):
                loss = F.cross_entropy(model(X[idx]), y[idx])
            if scaler is None:
                loss.backward()
                rec.log_batch(idx)
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                rec.log_batch(idx)
                scaler.step(opt)
                scaler.update()
    return model.eval(), rec.trajectory, X[MLP_N_TRAIN:]


def autocast_figures(model: nn.Module, traj, X_test: Tensor, precision: str) -> dict[str, float]:
    """A dropout-MLP run under autocast in ``precision`` ("float16" or "bfloat16"; "float32": no autocast) measured
    against the loop reference.

    Asserts what is not a figure: every step recorded under that autocast (none for "float32"), at least three
    steps checked. Returns
    ``check`` (the largest gradient-check mismatch), the relative errors of ``keep=("train",)`` (``train``) and of
    the residual (``residual``) against ``ReplayReference``, the reference's own path error ``ref_quad``
    (absolute), the ``residual_share``, ``completeness`` and ``replica`` (against ``model``: the trained
    parameters in evaluation mode, run without autocast).
    """
    assert {r.autocast for r in traj.manifest.steps} == {None if precision == "float32" else precision}
    checked = np.asarray(traj.gradient_check())
    assert np.isfinite(checked).sum() >= 3
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu", residual_tol=1.0, **MLP_QUAD).fit(
        traj).transform(X_test)
    ref = ReplayReference(traj, X_test)
    want = reference_terms(ref, att)
    with torch.no_grad():
        trained = model(X_test)
    replica = explaind.KernelReplica(device="cpu", **MLP_QUAD).fit(traj).predict(X_test)
    return {"check": float(np.nanmax(checked)), "train": rel_err(as_numpy(att.values), want["values"]),
            "residual": rel_err(as_numpy(att.residual), want["residual"]),
            "ref_quad": float(ref.quad_error.abs().max()), "residual_share": att.meta["residual_share"],
            "completeness": att.completeness_error(), "replica": rel_err(replica, as_numpy(trained))}


def assert_autocast_run_exact(model: nn.Module, traj, X_test: Tensor, precision: str,
                              share_range: tuple[float, float] | None = None) -> dict[str, float]:
    """``autocast_figures`` within the bounds: the check at its tolerance; train scores and the residual (the
    autocast rounding, measured alike) <= 1e-9 relative to the reference, whose path error is <= 1e-12; the
    residual share in ``share_range`` (default: the SGD run's measured range, ``AMP_SHARE_RANGE``); completeness
    <= 1e-12; replica <= 1e-6. Returns the figures."""
    got = autocast_figures(model, traj, X_test, precision)
    assert got["check"] <= AMP_CHECK_TOL[precision] and got["ref_quad"] <= 1e-12
    assert got["train"] <= 1e-9 and got["residual"] <= 1e-9
    low, high = share_range or AMP_SHARE_RANGE[precision]
    assert low <= got["residual_share"] <= high
    assert got["completeness"] <= 1e-12 and got["replica"] <= 1e-6
    return got
