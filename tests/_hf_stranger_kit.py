"""The plain loop and the exactness checks of the tests/test_stranger_hf_*.py files (tiny Hugging Face models).

``train`` is the loop of docs/guide_own_model.md: AdamW in float64, 3 steps of 4 random samples, the model called
as ``model(**inputs)`` and the loop's own loss on what it returns, ``rec.log_batch(idx)`` after ``backward()``.
``assert_exact`` checks the recorded run against the trained model in evaluation mode and against an independent
slow float64 loop reference (tests/reference.py, tests/_hf_testkit.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from reference import rel_err

import explaind
from explaind.exceptions import ExplaindWarning

DT = torch.float64
VOCAB, LENGTH, N = 30, 8, 12


def ids(n: int, seed: int, length: int = LENGTH) -> torch.Tensor:
    """Token ids in ``1..VOCAB-1``, ``(n, length)``."""
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def padded(n: int, seed: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A padding mask ``(n, LENGTH)`` of lengths 3..LENGTH (right- or left-aligned) and a generator for more draws."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)
    pos = torch.arange(LENGTH)[None, :]
    mask = pos >= (LENGTH - lengths)[:, None] if left else pos < lengths[:, None]
    return mask.long(), gen


def per_sample_ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample cross entropy, the reference's loss for classifiers."""
    return F.cross_entropy(out, t, reduction="none")


def train(model, X, y, loss, batch_loss, *, steps: int = 3, lr: float = 0.02, **recorder):
    """Record ``steps`` AdamW steps of 4 random samples; ``batch_loss(model_output, targets)`` is the loop's loss.

    Returns the model in evaluation mode and the trajectory; every step's gradient check must pass at 1e-12.
    """
    model = model.to(DT).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=True, **recorder)
    gen = torch.Generator().manual_seed(0)
    n = next(iter(X.values())).shape[0] if isinstance(X, dict) else X.shape[0]
    with rec:
        for _ in range(steps):
            idx = torch.randperm(n, generator=gen)[:4]
            opt.zero_grad()
            out = model(**{k: v[idx] for k, v in X.items()}) if isinstance(X, dict) else model(X[idx])
            batch_loss(out, y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    assert max(traj.gradient_check()) <= 1e-12
    return model.eval(), traj


def assert_exact(traj, X_test, truth, ref, target, *, max_share: float = 1e-9):
    """Replica <= 1e-6 relative to ``truth`` (the trained model in evaluation mode), no warning, residual share
    <= ``max_share``, ``keep=("train",)`` <= 1e-9 relative to ``ref`` (whose own quadrature must be exact).

    Returns the attribution.
    """
    assert float(ref.quad_error.abs().max()) <= 1e-11
    n = truth.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        replica = explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
        assert rel_err(replica, truth.reshape(n, -1)) <= 1e-6
        att = explaind.InfluenceEstimator(keep=("train",), target=target, tol=1e-11, device="cpu").fit(traj)
        att = att.transform(X_test)
    assert att.meta["residual_share"] <= max_share
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9
    return att
