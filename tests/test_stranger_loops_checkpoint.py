"""Activation checkpointing around dropout: the block's forward runs again inside ``backward()``.

``torch.utils.checkpoint.checkpoint`` (either ``use_reentrant``) with the default ``preserve_rng_state=True``
recomputes the dropout masks the forward drew, so the captured random state replays them, and explaind runs the
checkpoint as a plain call (explaind/_checkpointing.py): exact with checkpointing left on (before, refused until
the user switched it off with a flag of their own; the slow reference runs with it off). With
``preserve_rng_state=False``, or a layer drawing from its own generator inside the block, the recomputation draws
other masks and the loop's gradient is that of no single function: the gradient check fails, and before the fix
its message listed every cause but that one (the first sentence after the figures asked to check ``loss=``).
Float64; figures from tests/_stranger_loops_kit.py.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from _stranger_loops_kit import Checkpointed, assert_exact, measure, train
from replay_reference import ReplayReference

from explaind._checkpointing import PATCHABLE, plain_checkpoints
from explaind.exceptions import TrajectoryError

pytestmark = pytest.mark.usefixtures("one_thread")

DRAWS = r"Step 0's backward\(\) draws random numbers.*preserve_rng_state=False.*Fix: keep preserve_rng_state=True"


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize(("reentrant", "capture"), [(False, "auto"), (False, True), (True, "auto")])
def test_dropout_inside_a_checkpoint_is_replayed_exactly_with_checkpointing_left_on(reentrant, capture):
    model = Checkpointed({"use_reentrant": reentrant})
    traj = train(model, _sgd(model), capture_random=capture, check_gradients=True)
    assert_exact(measure(model, traj, ReplayReference, before_reference=lambda: setattr(model, "options", None)))


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
    figures = measure(model, traj, ReplayReference, before_reference=lambda: setattr(model, "options", None))
    assert figures["replica"] <= 1e-6  # the replica follows the recorded parameters whatever the gradients were
    assert figures["share"] > 1e-2
    assert any("no gradient check ran" in w and "check_gradients=True" in w for w in figures["warnings"])


def test_the_plain_checkpoint_switch_restores_torchs_internals_after_interleaved_threads():
    assert PATCHABLE  # this torch's checkpoint internals are the known ones (else the switch does nothing)
    original = (ckpt._checkpoint_without_reentrant_generator, ckpt.CheckpointFunction)
    entered, released = threading.Event(), threading.Event()

    def other():
        with plain_checkpoints():
            entered.set()
            released.wait(10)

    thread = threading.Thread(target=other)
    with plain_checkpoints():
        thread.start()
        assert entered.wait(10)
        with plain_checkpoints():  # nested
            assert ckpt.CheckpointFunction is not original[1]
    assert (ckpt._checkpoint_without_reentrant_generator, ckpt.CheckpointFunction) != original  # the thread is in
    released.set()
    thread.join(10)
    assert (ckpt._checkpoint_without_reentrant_generator, ckpt.CheckpointFunction) == original
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    with plain_checkpoints():
        out = torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=True)
        (g,) = torch.autograd.grad(out.sum(), [x])  # the reentrant checkpoint refuses autograd.grad; a plain call not
    assert torch.equal(g, lin.weight.sum(0).expand(4, 3))
