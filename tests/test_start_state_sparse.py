"""Sparse stores (``checkpoint_every > 1``) of runs recorded from an optimizer that held state.

The first segment of a sparse store is replayed from the optimizer's state when the recorder opened, kept in the
start file (docs/recording.md, "Starting from optimizer state"). Checked per optimizer (SGD with momentum, Adam with
L2 decay, AdamW; 3 unrecorded steps, then 8 recorded, float64, tests/_start_state_kit.py): every replayed theta_s and
coefficient equals the in-memory recording bit for bit with the segments visited out of order (so some are replayed
twice), every replay gap is 0, and the decomposition meets the bounds of tests/test_start_state.py against the slow
loop reference and the independent recursion ``carried_part``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _start_state_kit import OPTIMIZERS, carried_part, data, mlp, train
from reference import Reference, rel_err

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
FIELDS = ("a", "b", "P", "q", "n", "lambda_c", "lambda_d")


def _same(u, v) -> bool:
    return all(torch.equal(torch.as_tensor(getattr(u, f)), torch.as_tensor(getattr(v, f))) for f in FIELDS)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_sparse_store_replays_its_first_segment_from_the_start_state(tmp_path, kind):
    model, memory, state, rates = train(kind, recorded=STEPS)
    train(kind, recorded=STEPS, store=tmp_path / "run", checkpoint_every=2)
    sparse = Trajectory.load(tmp_path / "run", model=mlp())
    sparse.verify()
    assert sparse.sparse and sparse.optimizer_start() is not None
    stored = [s for s, r in enumerate(sparse.manifest.steps) if r.has_params]
    assert 0 not in stored  # theta_1 is replayed from theta_0 and the start state
    for s in (3, 0, 5, 1, 7, 2, 6, 0, 4):  # out of order: segments leave the cache and are replayed again
        assert all(torch.equal(sparse.params(s)[n], memory.params(s)[n]) for n in memory.param_names), s
        assert all(_same(sparse.updates(s)[n], u) for n, u in memory.updates(s).items()), s
    gaps = sparse.replay_error()
    assert (gaps[stored] == 0.0).all()
    _, _, Xt = data()
    with torch.no_grad():
        truth = model(Xt)
    assert rel_err(explaind.KernelReplica(device="cpu").fit(sparse).predict(Xt), truth) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(sparse).transform(Xt)
    ref = Reference(memory, Xt)
    assert att.meta["residual_share"] <= 1e-9 and att.completeness_error() <= 1e-12
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9
    assert rel_err(att.initial_state, carried_part(kind, ref, state, rates)) <= 1e-9


def test_a_start_state_of_other_parameters_than_step_0s_groups_is_refused(tmp_path):
    """A start file naming the parameters in another order than the first step's groups cannot seed the replay."""
    train("adam", recorded=4, store=tmp_path / "run", checkpoint_every=2)
    sparse = Trajectory.load(tmp_path / "run", model=mlp())
    start = sparse.optimizer_start()
    object.__setattr__(start, "names", tuple(reversed(start.names)))
    with pytest.raises(TrajectoryError, match=r"start state .* covers the parameters \['2.bias'.*step 0's parameter "
                                              r"groups \['0.weight'.*Re-record with checkpoint_every=1"):
        sparse.params(1)


def test_replay_gaps_of_a_fresh_start_are_unchanged(tmp_path):
    """A store from a fresh optimizer keeps no optimizer start state and replays as before."""
    X, y, _ = data()
    model = mlp()
    opt = OPTIMIZERS["adam"](model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run",
                                      checkpoint_every=2)
    with rec:
        for s in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[8 * s:8 * s + 8]), y[8 * s:8 * s + 8]).backward()
            rec.log_batch(torch.arange(8 * s, 8 * s + 8))
            opt.step()
    sparse = Trajectory.load(tmp_path / "run", model=mlp())
    assert sparse.optimizer_start() is None and sparse.initial_state() == {}
    assert np.nanmax(sparse.replay_error()) == 0.0
