"""Normalisation and stochastic layers the repository's models do not use, and random draws no module shows.

Exact where explaind can replay the training forward (tests/hard_models_kit.py checks against the trained model
and the slow loop reference); a clear error naming the cause and the fix where it cannot, or until the user
says so (``capture_random=True`` for ``F.dropout``, ``torch.rand`` or a buffer the forward updates).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hard_models_kit import assert_exact, data, measure, seeded, train
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")

X, Y = data(14, (4,), 3)
XI, YI = data(14, (1, 5, 5), 5)


def mlp(*middle: nn.Module) -> nn.Sequential:
    """``Linear(4, 6) - ReLU - *middle - Linear(6, 3)``."""
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), *middle, nn.Linear(6, 3))


class ConvNorm(nn.Module):
    """``Conv2d(1, 3, 3)`` on ``(n, 1, 5, 5)``, then ``middle``, ReLU, ``Linear(27, 3)``."""

    def __init__(self, middle: nn.Module, relu_first: bool = False):
        super().__init__()
        self.c, self.middle, self.r, self.h = nn.Conv2d(1, 3, 3), middle, nn.ReLU(), nn.Linear(27, 3)
        self.relu_first = relu_first

    def forward(self, x):
        h = self.c(x)
        h = self.middle(self.r(h)) if self.relu_first else self.r(self.middle(h))
        return self.h(h.flatten(1))


def run_exact(build, opt="sgd", *, X=X, Y=Y, buffers=False, **recorder) -> None:
    model = seeded(build)
    traj, copies = train(model, opt, X[:12], Y[:12], **recorder)
    assert_exact(measure(model, traj, copies, X[12:], buffers=buffers))


def test_batch_norm_without_running_statistics_is_refused_by_name():
    """Such a layer normalises by the statistics of whatever batch it sees, in evaluation mode too."""
    model = seeded(lambda: mlp(nn.BatchNorm1d(6, track_running_stats=False)))
    traj, _ = train(model, "sgd", X[:12], Y[:12])
    match = r"'2' \(BatchNorm1d\) have track_running_stats=False.*Fix: track_running_stats=True.*nn.LayerNorm"
    for estimator in (explaind.KernelReplica(device="cpu"), explaind.InfluenceEstimator(device="cpu")):
        with pytest.raises(UnsupportedModelError, match=match):
            getattr(estimator.fit(traj), "predict" if hasattr(estimator, "predict") else "transform")(X[12:])


def test_instance_norm_with_running_statistics_is_exact():
    """Instance statistics in training, running statistics in evaluation: the running ones are beta_s per step."""
    run_exact(lambda: ConvNorm(nn.InstanceNorm2d(3, affine=True, track_running_stats=True)), X=XI, Y=YI,
              buffers=True)


def test_layer_norm_without_affine_is_exact():
    run_exact(lambda: mlp(nn.LayerNorm(6, elementwise_affine=False)), "adam")


def test_dropout2d_is_exact():
    run_exact(lambda: ConvNorm(nn.Dropout2d(0.3), relu_first=True), X=XI, Y=YI)


def test_alpha_dropout_with_selu_is_exact():
    run_exact(lambda: nn.Sequential(nn.Linear(4, 6), nn.SELU(), nn.AlphaDropout(0.2), nn.Linear(6, 3)))


class FunctionalDropout(nn.Module):
    """``F.dropout`` called in ``forward``: no module shows the random draw."""

    def __init__(self):
        super().__init__()
        self.a, self.r, self.b = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.dropout(self.r(self.a(x)), 0.3, training=self.training))


class StochasticDepth(nn.Module):
    """A residual block dropped per sample with ``torch.rand`` in training (stochastic depth by hand)."""

    def __init__(self):
        super().__init__()
        self.a, self.r, self.b = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    def forward(self, x):
        h = self.r(self.a(x))
        if self.training:
            keep = (torch.rand(x.shape[0], 1, dtype=x.dtype) > 0.4).to(x.dtype)
            return self.b(h + keep * self.block(h) / 0.6)
        return self.b(h + self.block(h))


class RunningCenter(nn.Module):
    """Inputs centred by a non-persistent buffer that each training forward updates before using it."""

    def __init__(self):
        super().__init__()
        self.a, self.r, self.b = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)
        self.register_buffer("center", torch.zeros(4), persistent=False)

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.center.mul_(0.5).add_(0.5 * x.mean(0))
        return self.b(self.r(self.a(x - self.center)))


@pytest.mark.parametrize("build", [FunctionalDropout, StochasticDepth, RunningCenter],
                         ids=["F.dropout", "torch.rand", "buffer-updated-in-forward"])
def test_hidden_training_behaviour_is_refused_at_step_0_then_exact_with_capture(build):
    model = seeded(build)
    with pytest.raises(TrajectoryError, match=r"Step 0: .*training mode.*evaluation mode.*capture_random=True"):
        train(model, "sgd", X[:12], Y[:12])
    run_exact(build, "sgd", buffers=build is RunningCenter, capture_random=True)
    traj, _ = train(seeded(build), "adam", X[:12], Y[:12], capture_random=True)
    assert traj.manifest.coupled == [f"{build.__name__}.forward"]


def test_hidden_randomness_without_the_check_warns_naming_capture():
    """check_gradients=False records the F.dropout run; the residual share then names the fix."""
    traj, _ = train(seeded(FunctionalDropout), "sgd", X[:12], Y[:12], check_gradients=False)
    with pytest.warns(match=r"residual share .*capture_random=True"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X[12:])
