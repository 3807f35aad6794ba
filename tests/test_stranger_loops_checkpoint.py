"""Activation checkpointing around dropout: the block's forward runs again inside ``backward()``.

``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` with the default ``preserve_rng_state=True`` recomputes
the dropout masks the forward drew, so the captured random state replays them: exact once checkpointing is
switched off for explaining (tests/test_stranger_loops.py covers the refusal while it is on). With
``preserve_rng_state=False``, or a layer drawing from its own generator inside the block, the recomputation draws
other masks and the loop's gradient is that of no single function: the gradient check fails, and before the fix
its message listed every cause but that one (the first sentence after the figures asked to check ``loss=``).
Float64; figures from tests/_stranger_loops_kit.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _stranger_loops_kit import Checkpointed, assert_exact, measure, train
from replay_reference import ReplayReference

from explaind.exceptions import TrajectoryError

pytestmark = pytest.mark.usefixtures("one_thread")

DRAWS = r"Step 0's backward\(\) draws random numbers.*preserve_rng_state=False.*Fix: keep preserve_rng_state=True"


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("capture", ["auto", True])
def test_dropout_inside_a_non_reentrant_checkpoint_is_replayed_exactly(capture):
    model = Checkpointed({"use_reentrant": False})
    traj = train(model, _sgd(model), capture_random=capture, check_gradients=True)
    model.options = None  # the same function without checkpointing, which torch.func can evaluate
    assert_exact(measure(model, traj, ReplayReference))


def test_preserve_rng_state_false_is_refused_naming_it():
    model = Checkpointed({"use_reentrant": False, "preserve_rng_state": False})
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match.*" + DRAWS):
        train(model, _sgd(model), check_gradients=True)


def test_a_private_generator_inside_a_checkpointed_block_is_refused_naming_it():
    model = Checkpointed({"use_reentrant": False}, private=True)
    with pytest.raises(TrajectoryError, match=DRAWS.replace("preserve_rng_state=False", "its own torch.Generator")):
        train(model, _sgd(model), check_gradients=True)


def test_the_same_private_generator_without_checkpointing_is_not_named():
    """The diagnosis replays forward and backward: a layer that draws only in its forward is no backward draw."""
    model = Checkpointed(None, private=True)
    traj = train(model, _sgd(model), check_gradients=True)
    assert traj.n_steps == 6


def test_a_wrong_loss_under_checkpointing_that_preserves_the_state_is_not_blamed_on_backward_draws():
    model = Checkpointed({"use_reentrant": False})

    def smoothed(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx], label_smoothing=0.2).backward()
        rec.log_batch(idx)
        opt.step()

    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match") as info:
        train(model, _sgd(model), step=smoothed, check_gradients=True)
    assert "draws random numbers" not in str(info.value)


def test_preserve_rng_state_false_without_the_check_warns_with_a_large_residual_share():
    model = Checkpointed({"use_reentrant": False, "preserve_rng_state": False})
    traj = train(model, _sgd(model), check_gradients=False)
    model.options = None
    figures = measure(model, traj, ReplayReference)
    assert figures["replica"] <= 1e-6  # the replica follows the recorded parameters whatever the gradients were
    assert figures["share"] > 1e-2
    assert any("no gradient check ran" in w and "check_gradients=True" in w for w in figures["warnings"])
