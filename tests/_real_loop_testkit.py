"""Two real-loop workloads shared by the plain-loop and the framework-callback tests, with their exactness checks.

* A ResNet-18-shaped CNN with train-mode BatchNorm (tests/resnet_model.py at widths 4/8/16/32, float64, 32x32
  inputs, SGD momentum with a small learning rate so the ReLU kinks the reference locates stay few), checked
  against ``BufferReference`` (tests/replay_reference.py: the batched training forward replayed with its batch
  statistics, step ``s``'s path at the recorded buffers ``beta_s``).
* A dropout MLP trained in float32 under ``torch.autocast`` (float16 with a ``GradScaler``, or bfloat16), checked
  against ``ReplayReference`` (the dropout masks replayed from the captured random states). The residual share
  is the autocast rounding, not rounding level: tests/test_amp_dropout.py says why and measures it.

Every helper asserts; none returns a value computed by the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
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


def assert_resnet_exact(model: nn.Module, traj, X_test: Tensor) -> None:
    """The recorded ResNet run against the trained ``model`` (evaluation mode) and the replaying loop reference.

    Final buffers recorded as the model holds them; replica <= 1e-6 relative to ``model(X_test)``; on one input
    and one logit: residual share <= 1e-9 with no warning, ``keep=("train",)`` <= 1e-9 relative to
    ``BufferReference``, the buffers term <= 1e-12 relative to the reference's, and the total the trained output.
    """
    final = dict(model.named_buffers())
    assert set(traj.buffer_names) == set(final)
    assert all(torch.equal(traj.buffers(traj.n_steps)[n], final[n]) for n in final)
    with torch.no_grad():
        trained = model(X_test)
    replica = explaind.KernelReplica(device="cpu", **RESNET_QUAD).fit(traj).predict(X_test)
    assert rel_err(replica, as_numpy(trained)) <= 1e-6
    x, target = X_test[:1], [3]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # no residual or quadrature warning
        att = explaind.InfluenceEstimator(keep=("train",), target=target, device="cpu", **RESNET_QUAD).fit(
            traj).transform(x)
    assert att.meta["residual_share"] <= 1e-9
    ref = BufferReference(traj, x, target=target, panels=1)
    buffers = ref.buffer_terms()
    assert float(buffers.abs().max()) > 1e-3  # the running statistics moved the explained output
    # the reference's path integrals are exact, so its endpoint differences miss exactly the buffers terms
    assert float((ref.quad_error - buffers).abs().max()) <= 1e-12
    want = reference_terms(ref, att)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert rel_err(as_numpy(att.buffers), as_numpy(buffers.sum(0))) <= 1e-12
    assert rel_err(as_numpy(att.total()), as_numpy(trained[:1, target])) <= 1e-6


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


def assert_autocast_run_exact(model: nn.Module, traj, X_test: Tensor, precision: str) -> None:
    """A dropout-MLP run under autocast in ``precision`` ("float16" or "bfloat16") against the loop reference.

    Every step recorded under that autocast, checked at its tolerance (at least three steps checked);
    ``keep=("train",)`` and the residual <= 1e-9 relative to ``ReplayReference``; the residual share in the
    measured range of ``AMP_SHARE_RANGE``; completeness <= 1e-12; replica <= 1e-6 relative to ``model`` (the
    trained parameters in evaluation mode, run without autocast).
    """
    assert {r.autocast for r in traj.manifest.steps} == {precision}
    checked = np.asarray(traj.gradient_check())
    assert np.isfinite(checked).sum() >= 3 and float(np.nanmax(checked)) <= AMP_CHECK_TOL[precision]
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu", residual_tol=1.0, **MLP_QUAD).fit(
        traj).transform(X_test)
    ref = ReplayReference(traj, X_test)
    assert float(ref.quad_error.abs().max()) <= 1e-12
    want = reference_terms(ref, att)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert rel_err(as_numpy(att.residual), want["residual"]) <= 1e-9  # the autocast rounding, measured alike
    low, high = AMP_SHARE_RANGE[precision]
    assert low <= att.meta["residual_share"] <= high
    assert att.completeness_error() <= 1e-12
    with torch.no_grad():
        trained = model(X_test)
    replica = explaind.KernelReplica(device="cpu", **MLP_QUAD).fit(traj).predict(X_test)
    assert rel_err(replica, as_numpy(trained)) <= 1e-6
