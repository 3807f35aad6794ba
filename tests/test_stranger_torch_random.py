"""Random numbers drawn inside ``forward`` by means other than dropout modules.

``F.scaled_dot_product_attention(dropout_p=...)`` and stochastic depth with ``torch.rand``/``torch.bernoulli``
draw from torch's generators: no module shows them, so the gradient check refuses step 0 naming
``capture_random=True``, which replays them exactly (the replay runs the training forward the recorder saw,
with the same attention backend, so the masks are the loop's). Draws from ``numpy.random``'s global state are
captured and replayed with ``capture_random=True`` (refused at the forward without it); Python's ``random`` or a
numpy generator held by a module cannot be replayed: they are refused at the forward that drew them, with or
without the gradient check. Exactness is measured by tests/hard_models_kit.py in float64.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hard_models_kit import data, run_exact, seeded, train
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError

pytestmark = pytest.mark.usefixtures("one_thread")

X, Y = data(14, (4, 3), 2)


class Attention(nn.Module):
    """Causal self-attention through ``F.scaled_dot_product_attention`` with ``dropout_p=0.1`` in training."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(3, 24), nn.Linear(8, 3)

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0, is_causal=True)
        return self.head(o.transpose(1, 2).reshape(n, length, 8)[:, -1])


class DropPath(nn.Module):
    """A residual block kept per sample with probability 0.7 in training, the draw made by ``how``."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.block, self.b = nn.Linear(12, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3)
        self.rng = np.random.default_rng(0)

    def keep(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        if self.how == "torch.rand":
            return (torch.rand(n, 1, dtype=h.dtype, device=h.device) < 0.7).to(h.dtype)
        if self.how == "torch.bernoulli":
            return torch.bernoulli(torch.full((n, 1), 0.7, dtype=h.dtype, device=h.device))
        if self.how == "numpy.random":
            return torch.as_tensor(np.random.rand(n, 1) < 0.7, dtype=h.dtype)
        if self.how == "random":
            return torch.tensor([[float(random.random() < 0.7)] for _ in range(n)], dtype=h.dtype)
        return torch.as_tensor(self.rng.random((n, 1)) < 0.7, dtype=h.dtype)  # a held numpy Generator

    def forward(self, x):
        h = torch.tanh(self.a(x.flatten(1)))
        if self.training:
            return self.b(h + self.keep(h) * self.block(h) / 0.7)
        return self.b(h + self.block(h))


def test_sdpa_dropout_is_refused_at_step_0_naming_capture_random_then_exact_with_it():
    with pytest.raises(TrajectoryError, match=r"Step 0: .*scaled_dot_product_attention.*capture_random=True"):
        train(seeded(Attention), "sgd", X[:12], Y[:12])
    run_exact(Attention, "sgd", X, Y, capture_random=True)
    run_exact(Attention, "sgd", X, Y, capture_random=True, micro=2, batch=3)  # masks per micro-batch


@pytest.mark.parametrize("how", ["torch.rand", "torch.bernoulli"])
def test_stochastic_depth_drawn_with_torch_is_exact_with_capture_random(how):
    with pytest.raises(TrajectoryError, match=r"Step 0: .*capture_random=True"):
        train(seeded(lambda: DropPath(how)), "sgd", X[:12], Y[:12])
    run_exact(lambda: DropPath(how), "sgd", X, Y, capture_random=True)


@pytest.mark.parametrize("how, source", [("random", r"random \(Python's module-level functions\)"),
                                         ("rng", r"'rng'")])
@pytest.mark.parametrize("check", [True, False])
def test_stochastic_depth_drawn_outside_torch_is_refused_at_the_forward_naming_the_source(how, source, check):
    """Before, with the gradient check off, such a run was recorded and its residual share named only
    capture_random=True, which cannot help."""
    model = seeded(lambda: DropPath(how))
    with pytest.raises(TrajectoryError, match=rf"drew random numbers from \[.*{source}.*\].*Fix: draw with torch"):
        train(model, "sgd", X[:12], Y[:12], capture_random=True, check_gradients=check)


def test_numpy_global_draws_are_refused_without_capture_and_replayed_with_it():
    """numpy's global state is captured with the torch states (tests/test_stranger_hf_audio_vision.py checks such a
    replay against a loop reference); here: the gradient check at every step and the residual share."""
    with pytest.raises(TrajectoryError, match=r"numpy.random \(the global state\).*capture_random=True"):
        train(seeded(lambda: DropPath("numpy.random")), "sgd", X[:12], Y[:12])  # nothing captured: refused
    np.random.seed(0)
    traj, _ = train(seeded(lambda: DropPath("numpy.random")), "sgd", X[:12], Y[:12], capture_random=True,
                    check_gradients=True)
    assert max(traj.gradient_check()) <= 1e-12
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X[12:])
    assert att.meta["residual_share"] <= 1e-9


def test_capture_random_false_switches_the_guard_off_and_the_gradient_check_still_fails():
    """The escape hatch for draws the guard would misattribute (another thread's): nothing is replayed then."""
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match"):
        train(seeded(lambda: DropPath("numpy.random")), "sgd", X[:12], Y[:12], capture_random=False)


def test_numpy_draws_between_the_forwards_and_in_evaluation_mode_are_not_refused():
    """A loop that shuffles with numpy, and an evaluation forward that draws, are outside the training forwards."""
    model = seeded(lambda: DropPath("torch.rand"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:12], Y[:12]),
                                      capture_random=True)
    np.random.seed(0)
    with rec:
        for _ in range(2):
            idx = torch.as_tensor(np.random.permutation(12)[:4])
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
        model.how = "numpy.random"
        model.eval()
        with torch.no_grad():
            model(X[12:])
    assert rec.trajectory.n_steps == 2



@pytest.mark.parametrize(("how", "kept"), [("torch.rand", False), ("numpy.random", True)])
def test_numpy_state_is_kept_only_for_micro_batches_whose_forward_drew_from_it(tmp_path, how, kept):
    """A forward that draws nothing from numpy leaves numpy's state out of the step file (5 KB per micro-batch);
    one that draws keeps the state its forward started from, in the store as in memory."""
    np.random.seed(0)
    seed0_keys = torch.as_tensor(np.random.get_state()[1].astype(np.float64))
    traj, _ = train(seeded(lambda: DropPath(how)), "sgd", X[:12], Y[:12], capture_random=True,
                    store=str(tmp_path / "run"))
    for loaded in (traj, explaind.Trajectory.load(str(tmp_path / "run"), model=seeded(lambda: DropPath(how)))):
        states = [m.state for s in range(loaded.n_steps) for m in loaded.micro_batches(s)]
        assert len(states) == 3 and all(st is not None for st in states)
        assert [st.numpy is not None for st in states] == [kept] * 3
        if kept:  # the first forward began from the seed's state (nothing else drew from numpy before it)
            assert torch.equal(states[0].numpy[:624], seed0_keys)


@pytest.mark.parametrize("draw", [lambda: np.random.rand(1), lambda: np.random.rand(624), lambda: np.random.rand(1248),
                                  lambda: np.random.randn(2), lambda: np.random.seed(7)],
                         ids=["one word", "624 words", "two wraps", "normals", "reseed"])
def test_the_in_place_fingerprint_of_numpys_global_generator_sees_every_draw(draw):
    """The guard reads numpy's position and key words in place; a draw of whole keys leaves the position alone."""
    from explaind.trajectory._host_random import HostDrawGuard, _GlobalPosition

    found = _GlobalPosition.find()
    assert found is not None  # this numpy's layout agrees with get_state(); the guard reads in place
    _, key, pos, *_ = np.random.get_state(legacy=True)
    assert found.state() == (int(pos), int(key[0]), int(key[623]))
    model = nn.Linear(2, 2)
    guard = HostDrawGuard(model, lambda: True)
    guard._pre(model, ())
    draw()
    with pytest.raises(TrajectoryError, match=r"numpy.random \(the global state\)"):
        guard._post(model, (), None)
    guard._pre(model, ())
    guard._post(model, (), None)  # no draw: nothing raised
