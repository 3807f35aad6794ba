"""CounterfactualEstimator on runs recorded from an optimizer that held state (docs/maths.md §9, "A run that started
from optimizer state").

The metagradient replays the optimizer from its state before step 0: the stored first moment m_-1 and, kept in the
same start file, torch's own state then (Adam's second moment and step count, AMSGrad's maximum). The reference is an
independent float64 loop: a torch optimizer loaded with the state_dict saved when the recorder opened, retrained over
the recorded steps with sample k's weight scaled by 1 +- h (central differences; h = -1 would remove it).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from _start_state_kit import BEFORE, DT, N_TRAIN, OPTIMIZERS, batches, data, mlp, train
from safetensors.torch import load_file, save_file
from test_store_round7 import _as_schema_2

import explaind
from explaind.exceptions import ConfigError
from explaind.trajectory import Trajectory
from explaind.trajectory._checksum import checksum

pytestmark = pytest.mark.usefixtures("one_thread")

H = 1e-5
KINDS = {**OPTIMIZERS, "amsgrad": lambda p: torch.optim.AdamW(p, lr=0.02, betas=(0.8, 0.95), weight_decay=0.1,
                                                             amsgrad=True),
         "adam_maximize": lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.95), maximize=True)}


def _retrain(kind, theta0, state, rates, scale, start=0):
    """The recorded steps from the saved optimizer state, sample k's weight times ``scale[k]`` in steps >= ``start``."""
    X, y, _ = data()
    model = mlp()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta0[n])
    opt = KINDS[kind](model.parameters())
    opt.load_state_dict(copy.deepcopy(state))
    for s, idx in enumerate(batches(BEFORE + len(rates))[BEFORE:]):
        for group in opt.param_groups:
            group["lr"] = rates[s]
        w = scale[idx] if s >= start else torch.ones(len(idx), dtype=DT)
        opt.zero_grad()
        (F.cross_entropy(model(X[idx]), y[idx], reduction="none") * w / len(idx)).sum().backward()
        opt.step()
    return model.eval()


def _differences(kind, traj, state, rates, start=0):
    """Central differences of the retrained outputs, ``(T, M, O)``."""
    _, _, Xt = data()
    theta0 = traj.params(0)
    out = []
    for k in range(N_TRAIN):
        up, down = torch.ones(N_TRAIN, dtype=DT), torch.ones(N_TRAIN, dtype=DT)
        up[k], down[k] = 1 + H, 1 - H
        plus, minus = _retrain(kind, theta0, state, rates, up, start), _retrain(kind, theta0, state, rates, down, start)
        with torch.no_grad():
            out.append((plus(Xt) - minus(Xt)) / (2 * H))
    return torch.stack(out, 1)


def _train(kind, **kwargs):
    if kind in OPTIMIZERS:
        return train(kind, **kwargs)
    OPTIMIZERS[kind] = KINDS[kind]
    try:
        return train(kind, **kwargs)
    finally:
        del OPTIMIZERS[kind]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_counterfactual_starts_from_the_saved_optimizer_state(kind):
    model, traj, state, rates = _train(kind)
    _, _, Xt = data()
    att = explaind.CounterfactualEstimator(device="cpu", checkpoint_every=2).fit(traj).transform(Xt)
    fd = _differences(kind, traj, state, rates)
    err = float((att.values - fd).abs().max() / fd.abs().max())
    assert err <= 1e-6, err
    assert att.meta["replay_residual"] <= 1e-12
    with torch.no_grad():
        assert float((att.final - model(Xt)).abs().max()) <= 1e-12


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_window_replays_from_the_saved_state_up_to_its_start(kind):
    _, traj, state, rates = _train(kind)
    _, _, Xt = data()
    att = explaind.CounterfactualEstimator(device="cpu", steps=(2, None)).fit(traj).transform(Xt)
    fd = _differences(kind, traj, state, rates, start=2)
    assert float((att.values - fd).abs().max() / fd.abs().max()) <= 1e-6
    assert att.meta["replay_residual"] <= 1e-12


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_stored_run_and_a_sparse_store_give_the_in_memory_values(tmp_path, kind):
    _, memory, _, _ = _train(kind)
    _, _, Xt = data()
    want = explaind.CounterfactualEstimator(device="cpu").fit(memory).transform(Xt).values
    for every in (1, 2):
        _train(kind, store=tmp_path / f"run{every}", checkpoint_every=every)
        loaded = Trajectory.load(tmp_path / f"run{every}", model=mlp())
        assert loaded.optimizer_start() is not None and loaded.sparse == (every > 1)
        got = explaind.CounterfactualEstimator(device="cpu").fit(loaded).transform(Xt).values
        assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_a_pure_update_without_start_state_is_refused_naming_the_fix(monkeypatch):
    from explaind_optimizers.pure import SGDUpdate

    _, traj, _, _ = _train("sgd", recorded=2)
    monkeypatch.delattr(SGDUpdate, "start_state")
    with pytest.raises(ConfigError, match=r"CounterfactualEstimator.fit: The run started from optimizer state.*pure "
                                          r"update SGDUpdate of the adapter 'sgd' has no start_state.*Fix: add "
                                          r"start_state"):
        explaind.CounterfactualEstimator(device="cpu").fit(traj)


def _keep_first_moment_only(root):
    """Rewrite the start file as an explaind that stored only m_-1 wrote it (its manifest record updated)."""
    path = root / "initial_state.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if k.startswith("m.")}
    save_file(tensors, str(path))
    manifest = json.loads((root / "manifest.json").read_text())
    raw = path.read_bytes()
    manifest["initial_state_file"].update(nbytes=len(raw), checksum=checksum(raw))
    (root / "manifest.json").write_text(json.dumps(manifest))
    _as_schema_2(root)  # that explaind wrote schema 2: step files that bind neither the run nor its start files


def test_a_store_that_kept_only_the_first_moment_is_exact_for_sgd_and_refused_for_adam(tmp_path):
    _, _, Xt = data()
    _, memory, _, _ = _train("sgd")
    for kind in ("sgd", "adam"):
        _train(kind, store=tmp_path / kind)
        _keep_first_moment_only(tmp_path / kind)
        loaded = Trajectory.load(tmp_path / kind, model=mlp())
        loaded.verify()
        assert loaded.optimizer_start() is None and loaded.initial_state()
    want = explaind.CounterfactualEstimator(device="cpu").fit(memory).transform(Xt).values
    got = explaind.CounterfactualEstimator(device="cpu").fit(Trajectory.load(tmp_path / "sgd", model=mlp()))
    assert float((got.transform(Xt).values - want).abs().max()) <= 1e-12 * float(want.abs().max())
    with pytest.raises(ConfigError, match=r"start file does not hold \['exp_avg_sq', 'step'\].*Fix: re-record the "
                                          r"run with this explaind, or use InfluenceEstimator"):
        explaind.CounterfactualEstimator(device="cpu").fit(Trajectory.load(tmp_path / "adam", model=mlp()))
