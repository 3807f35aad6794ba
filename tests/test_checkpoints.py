"""Runs known only by checkpoints: macro-steps between safetensors files, HF-style folders or state dicts."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from engine_testkit import rel
from safetensors.torch import save_file
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError

DT = torch.float64


def _model(seed: int = 0, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 8), nn.Tanh()] + ([nn.BatchNorm1d(8)] if norm else []) + [nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(DT)


def _train_with_checkpoints(tmp_path, every: int = 2, steps: int = 6, norm: bool = False):
    """Train with AdamW (no recorder) and save theta every `every` steps in three formats."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(30, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (30,), generator=gen)
    model = _model(norm=norm)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    sources = []

    def save(s: int) -> None:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if len(sources) % 3 == 0:
            path = tmp_path / f"step-{s}.safetensors"
            save_file(state, str(path))
            sources.append(path)
        elif len(sources) % 3 == 1:
            folder = tmp_path / f"checkpoint-{s}"
            folder.mkdir()
            save_file(state, str(folder / "model.safetensors"))
            sources.append(str(folder))
        else:
            sources.append(state)

    save(0)
    for s in range(steps):
        idx = torch.arange(5 * s, 5 * s + 8) % 30
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        if (s + 1) % every == 0:
            save(s + 1)
    model.eval()
    return model, sources, X[:6]


def test_replica_and_whole_update_decompositions_are_exact_along_the_segments(tmp_path):
    model, sources, X = _train_with_checkpoints(tmp_path)
    traj = explaind.Trajectory.from_checkpoints(sources, model=_model(seed=5))
    assert traj.n_steps == 3 and not traj.has_updates
    with torch.no_grad():
        final = model(X)
        first = _model()(X)
    rep = explaind.KernelReplica(device="cpu").fit(traj)
    assert rel(torch.as_tensor(rep.predict(X)), final) <= 1e-8
    for keep in [("step", "group"), ("param",), ("step",)]:
        att = explaind.InfluenceEstimator(keep=keep, split=False, device="cpu").fit(traj).transform(X)
        assert att.completeness_error() <= 1e-10
        assert rel(att.final, final) <= 1e-12 and rel(att.initial, first) <= 1e-12
    by_step = explaind.InfluenceEstimator(keep=("step",), split=False, quadrature="gauss-legendre", nodes=8,
                                          device="cpu").fit(traj).transform(X)
    # each macro-step's contribution is the exact change over its segment up to the quadrature error
    for s in range(3):
        with torch.no_grad():
            a = torch.func.functional_call(model, traj.params(s), (X,))
            b = torch.func.functional_call(model, traj.params(s + 1), (X,))
        got = by_step.values[:, s] + by_step.quadrature_error[:, s]
        assert rel(got, b - a) <= 1e-12


def test_what_needs_the_steps_is_refused_with_the_reason(tmp_path):
    model, sources, X = _train_with_checkpoints(tmp_path)
    traj = explaind.Trajectory.from_checkpoints(sources, model=_model())
    with pytest.raises(ConfigError, match=r"no record of each step's batches.*split=False"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj)
    with pytest.raises(ConfigError, match="split=False"):
        explaind.InfluenceEstimator(keep=("step",), device="cpu").fit(traj)
    with pytest.raises(ConfigError, match="record the run with TrajectoryRecorder"):
        explaind.CounterfactualEstimator(device="cpu").fit(traj)
    with pytest.raises(TrajectoryError, match="no record of the batches"):
        traj.batch(0)
    explaind.KernelReplica(device="cpu").fit(traj)  # no loss needed to explain the outputs
    with pytest.raises(TrajectoryError, match="pass loss="):
        explaind.InfluenceEstimator(keep=("step",), split=False, target="loss", device="cpu").fit(traj).transform(
            X, torch.zeros(6, dtype=torch.long))


def test_bad_checkpoints_are_named(tmp_path):
    model, sources, X = _train_with_checkpoints(tmp_path)
    state = dict(sources[2])
    state.pop("2.weight")
    with pytest.raises(TrajectoryError, match=r"does not fit the model: missing 2.weight"):
        explaind.Trajectory.from_checkpoints([sources[0], state], model=_model()).params(1)
    pickled = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(TrajectoryError, match="not a .safetensors file; explaind reads no pickle"):
        explaind.Trajectory.from_checkpoints([pickled, sources[0]], model=_model())
    with pytest.raises(TrajectoryError, match="at least two checkpoints"):
        explaind.Trajectory.from_checkpoints([sources[0]], model=_model())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrajectoryError, match="holds no model.safetensors"):
        explaind.Trajectory.from_checkpoints([empty, sources[0]], model=_model())


def test_changing_buffers_are_said_not_attributed(tmp_path):
    model, sources, X = _train_with_checkpoints(tmp_path, norm=True)
    with pytest.warns(ExplaindWarning, match=r"2.running_mean.*change between the first and the last checkpoint"):
        traj = explaind.Trajectory.from_checkpoints(sources, model=_model(norm=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("step",), split=False, device="cpu").fit(traj).transform(X)
    assert att.completeness_error() <= 1e-10
    with torch.no_grad():
        assert rel(att.final, model(X)) <= 1e-12  # final buffers: the model as it ended
