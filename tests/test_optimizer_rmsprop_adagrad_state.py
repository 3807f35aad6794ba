"""RMSprop and Adagrad with optimizer state at the start: exact decomposition, counterfactuals, sparse stores.

Torch builds Adagrad's state (``step = 0``, the accumulator) with the optimizer, so every Adagrad recording opens on
held state; RMSprop holds state after unrecorded steps. Checks (float64 tanh MLP, tests/_rmsprop_adagrad_kit.py):

* the ``keep=("train",)`` scores against the slow reference whose coefficients come from the maths, continued from
  the saved ``square_avg``/``grad_avg`` or ``sum``/``step``; the ``initial_state`` term against the independent
  carried part ``sum_s phi_s . (-lr_s mu^(s+1) m_-1)`` (RMSprop with momentum; zero for Adagrad, which has no
  buffer), and the reference's residual equal to that carried part per step;
* ``CounterfactualEstimator`` against central differences of an independent float64 retraining: a torch optimizer
  loaded with the ``state_dict`` saved when the recorder opened, sample k's weight scaled by ``1 +- h``;
* a sparse store (``checkpoint_every=2``) replays every ``theta_s`` and coefficient bit for bit and gives the
  in-memory counterfactual.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _rmsprop_adagrad_kit import DT, MODELS, batch_plan, data, math_reference, record
from engine_compare import as_numpy
from reference import Reference, rel_err

import explaind
from explaind.trajectory import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

H = 1e-5
BEFORE, STEPS = 3, 4
FIELDS = ("a", "b", "P", "q", "n", "lambda_c", "lambda_d")
KINDS = {
    "rmsprop_momentum_centered": ("rmsprop", torch.optim.RMSprop,
                                  {"lr": 0.01, "momentum": 0.8, "centered": True, "weight_decay": 0.05}),
    "rmsprop_maximize": ("rmsprop", torch.optim.RMSprop, {"lr": 0.01, "maximize": True, "alpha": 0.9}),
    "adagrad": ("adagrad", torch.optim.Adagrad, {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.1}),
}


def _lambda_lr(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))


def _train(name, before=BEFORE, steps=STEPS, **kwargs):
    _, cls, hp = KINDS[name]
    model = MODELS["tanh"][0]()
    opt = cls(model.parameters(), **hp)
    traj, lrs, start = record(model, opt, steps=steps, before=before, schedule=_lambda_lr, **kwargs)
    return model, traj, lrs, start, opt


@pytest.mark.parametrize("name", sorted(KINDS))
def test_a_recording_opened_on_held_state_is_exact_with_its_initial_state_term(name):
    kind, _, hp = KINDS[name]
    model, traj, lrs, start, _ = _train(name)
    _, _, Xt = data()
    with torch.no_grad():
        truth = model(Xt)
    assert rel_err(as_numpy(explaind.KernelReplica(device="cpu").fit(traj).predict(Xt)), as_numpy(truth)) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(Xt)
    assert att.meta["residual_share"] <= 1e-9 and att.completeness_error() <= 1e-12
    ref = math_reference(Reference, kind, hp, lrs, start)(traj, Xt)
    assert rel_err(as_numpy(att.values), ref.kept(("train",))) <= 1e-9
    # the part of each update carried by m_-1, from torch's saved buffer: -lr_s mu^(s+1) m_-1
    mu = float(hp.get("momentum", 0.0))
    m = torch.cat([start["state"][i].get("momentum_buffer", torch.zeros(shape, dtype=DT)).reshape(-1)
                   for i, shape in enumerate(ref.shapes)])
    carried = torch.stack([-lrs[s] * mu ** (s + 1) * m for s in range(ref.N)])
    assert float((ref.E - carried).abs().max()) <= 1e-12 * max(float(torch.stack(ref.delta).abs().max()), 1.0)
    expected = torch.einsum("sxod,sd->xo", ref.phi, carried)
    if mu > 0:
        assert rel_err(as_numpy(att.initial_state), as_numpy(expected)) <= 1e-9
        assert float(expected.abs().sum()) >= 1e-3 * float((att.final - att.initial).abs().sum())
    else:
        assert att.initial_state is None or float(torch.as_tensor(att.initial_state).abs().max()) == 0.0


def _retrain(name, theta0, state, lrs, scale):
    """The recorded steps from the saved optimizer state, sample k's weight times ``scale[k]``."""
    _, cls, hp = KINDS[name]
    X, y, _ = data()
    model = MODELS["tanh"][0]()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta0[n])
    opt = cls(model.parameters(), **hp)
    opt.load_state_dict(copy.deepcopy(state))
    for s, idx in enumerate(batch_plan(BEFORE + len(lrs))[BEFORE:]):
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        opt.zero_grad()
        (F.cross_entropy(model(X[idx]), y[idx], reduction="none") * scale[idx] / len(idx)).sum().backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_counterfactual_matches_an_independent_retraining_from_the_saved_state(name):
    model, traj, lrs, state, _ = _train(name)
    _, _, Xt = data()
    att = explaind.CounterfactualEstimator(device="cpu", checkpoint_every=2).fit(traj).transform(Xt)
    n_train = traj.n_train
    theta0 = traj.params(0)
    cols = []
    for k in range(n_train):
        up, down = torch.ones(n_train, dtype=DT), torch.ones(n_train, dtype=DT)
        up[k], down[k] = 1 + H, 1 - H
        plus, minus = _retrain(name, theta0, state, lrs, up), _retrain(name, theta0, state, lrs, down)
        with torch.no_grad():
            cols.append((plus(Xt) - minus(Xt)) / (2 * H))
    fd = torch.stack(cols, 1)
    err = float((att.values - fd).abs().max() / fd.abs().max())
    assert err <= 1e-6, err
    assert att.meta["replay_residual"] <= 1e-12
    with torch.no_grad():
        assert float((att.final - model(Xt)).abs().max()) <= 1e-12


@pytest.mark.parametrize("name", ["rmsprop_momentum_centered", "adagrad"])
def test_a_sparse_store_replays_from_the_start_state_bit_for_bit(tmp_path, name):
    _, memory, _, _, _ = _train(name, steps=6)
    _train(name, steps=6, store=tmp_path / "run", checkpoint_every=2)
    sparse = Trajectory.load(tmp_path / "run", model=MODELS["tanh"][0]())
    sparse.verify()
    assert sparse.sparse and sparse.optimizer_start() is not None
    for s in (3, 0, 5, 1, 4, 2, 0):  # out of order: segments leave the cache and are replayed again
        assert all(torch.equal(sparse.params(s)[n], memory.params(s)[n]) for n in memory.param_names), s
        for n, u in memory.updates(s).items():
            v = sparse.updates(s)[n]
            assert all(torch.equal(torch.as_tensor(getattr(u, f)), torch.as_tensor(getattr(v, f))) for f in FIELDS)
    _, _, Xt = data()
    want = explaind.CounterfactualEstimator(device="cpu").fit(memory).transform(Xt).values
    got = explaind.CounterfactualEstimator(device="cpu").fit(sparse).transform(Xt).values
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_fresh_optimizers_replay_at_rounding_level_adagrad_from_its_stored_start_state():
    for name in ("rmsprop_momentum_centered", "adagrad"):
        _, traj, _, _, _ = _train(name, before=0, steps=3)
        assert (traj.optimizer_start() is not None) == (KINDS[name][0] == "adagrad")
        _, _, Xt = data()
        att = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(Xt)
        assert att.meta["replay_residual"] <= 1e-12
