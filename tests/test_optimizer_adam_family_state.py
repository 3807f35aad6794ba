"""NAdam, RAdam and Adamax from optimizer state, in sparse stores, and under CounterfactualEstimator.

The counterfactual reference is an independent float64 retraining: a torch optimizer built with the same options
(and, for a run recorded from held state, loaded with the state_dict saved when the recorder opened), retrained
over the recorded steps with sample k's weight scaled by 1 +- h (central differences).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _adam_family_kit import Setup, batches, data, record, tanh_mlp

import explaind
from explaind.exceptions import ConfigError
from explaind.trajectory import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

H = 1e-5
N_TRAIN = 20
SETUPS = {
    "nadam": Setup("nadam", lr=0.05, weight_decay=0.1, momentum_decay=0.02),
    "nadam_decoupled_maximize": Setup("nadam", lr=0.05, weight_decay=0.5, decoupled=True, maximize=True),
    "radam": Setup("radam", lr=0.2, weight_decay=0.1),
    "radam_decoupled": Setup("radam", lr=0.2, weight_decay=0.5, decoupled=True),
    "adamax": Setup("adamax", lr=0.05, weight_decay=0.1),
    "adamax_maximize": Setup("adamax", lr=0.05, maximize=True, betas=(0.9, 0.8)),
}


def _retrain(setup, theta0, state, before, steps, scale):
    """The recorded steps from ``theta0`` (and the saved optimizer ``state``), sample k's weight times ``scale[k]``."""
    X, y = data()
    X, y = X[:N_TRAIN], y[:N_TRAIN]
    model = tanh_mlp()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta0[n])
    opt = setup.build(model.parameters())
    if state is not None:
        opt.load_state_dict(copy.deepcopy(state))
    plan = batches(N_TRAIN, before + steps)
    for s in range(before, before + steps):
        for group in opt.param_groups:
            group["lr"] = setup.rate(s)
        idx = plan[s]
        opt.zero_grad()
        (F.cross_entropy(model(X[idx]), y[idx], reduction="none") * scale[idx] / len(idx)).sum().backward()
        opt.step()
    return model.eval()


def _central_differences(setup, traj, state, before, steps, X_test):
    out = []
    for k in range(N_TRAIN):
        up, down = torch.ones(N_TRAIN, dtype=torch.float64), torch.ones(N_TRAIN, dtype=torch.float64)
        up[k], down[k] = 1 + H, 1 - H
        plus = _retrain(setup, traj.params(0), state, before, steps, up)
        minus = _retrain(setup, traj.params(0), state, before, steps, down)
        with torch.no_grad():
            out.append((plus(X_test) - minus(X_test)) / (2 * H))
    return torch.stack(out, 1)


def _run(setup, before, steps=7, **kwargs):
    X, y = data()
    model = tanh_mlp()
    if before:  # the state when the recorder opens: train the same steps on a copy first
        warm = tanh_mlp()
        opt = setup.build(warm.parameters())
        plan = batches(N_TRAIN, before)
        for s in range(before):
            for group in opt.param_groups:
                group["lr"] = setup.rate(s)
            opt.zero_grad()
            F.cross_entropy(warm(X[plan[s]]), y[plan[s]]).backward()
            opt.step()
        state = copy.deepcopy(opt.state_dict())
    else:
        state = None
    rec, _ = record(model, setup, X[:N_TRAIN], y[:N_TRAIN], steps, before=before, **kwargs)
    return model, rec.trajectory, state, X[N_TRAIN:]


@pytest.mark.parametrize("name", sorted(SETUPS))
@pytest.mark.parametrize("before", [0, 3])
def test_counterfactual_matches_central_differences_of_a_retraining(name, before):
    setup = SETUPS[name]
    model, traj, state, X_test = _run(setup, before)
    assert (traj.optimizer_start() is not None) == (before > 0)
    assert float(traj.audit().max()) <= 1e-12  # the recurrence continues from the held state
    att = explaind.CounterfactualEstimator(device="cpu", checkpoint_every=2).fit(traj).transform(X_test)
    fd = _central_differences(setup, traj, state, before, 7, X_test)
    err = float((att.values - fd).abs().max() / fd.abs().max())
    assert err <= 1e-6, err
    assert att.meta["replay_residual"] <= 1e-12
    with torch.no_grad():
        assert float((att.final - model(X_test)).abs().max()) <= 1e-12


@pytest.mark.parametrize("name", ["nadam", "radam", "adamax_maximize"])
def test_stored_and_sparse_runs_from_held_state_give_the_in_memory_values(tmp_path, name):
    setup = SETUPS[name]
    _, memory, _, X_test = _run(setup, 3)
    want_cf = explaind.CounterfactualEstimator(device="cpu").fit(memory).transform(X_test).values
    want_if = explaind.InfluenceEstimator(device="cpu", quadrature="gauss-legendre", nodes=6).fit(memory).transform(
        X_test).values
    for every in (1, 3):
        _run(setup, 3, store=tmp_path / f"run{every}", checkpoint_every=every)
        loaded = Trajectory.load(tmp_path / f"run{every}", model=tanh_mlp())
        assert loaded.optimizer_start() is not None and loaded.sparse == (every > 1)
        got_cf = explaind.CounterfactualEstimator(device="cpu").fit(loaded).transform(X_test).values
        assert float((got_cf - want_cf).abs().max()) <= 1e-12 * float(want_cf.abs().max())
        got_if = explaind.InfluenceEstimator(device="cpu", quadrature="gauss-legendre", nodes=6).fit(
            loaded).transform(X_test).values
        assert float((got_if - want_if).abs().max()) <= 1e-12 * float(want_if.abs().max())


def test_resume_continues_a_stored_run_exactly(tmp_path):
    """A recording stopped and restored from its store continues NAdam's mu_product and step count.

    torch's ``load_state_dict`` casts ``mu_product`` from float32 to the parameters' float64, so the resumed
    steps' ``q`` and ``n`` differ from those of the uninterrupted run in their last float32 bits, and the two runs
    part by that much: the resumed recording is exact for the run it records (its audit).
    """
    setup = SETUPS["nadam"]
    X, y = data()
    _, whole, _, _ = _run(setup, 0, steps=6)
    record(tanh_mlp(), setup, X[:N_TRAIN], y[:N_TRAIN], 3, store=tmp_path / "run")
    model, plan = tanh_mlp(), batches(N_TRAIN, 6)
    optimizer = setup.build(model.parameters())
    optimizer.param_groups[0]["lr"] = setup.rate(2)  # the value restore() loads (no warning)
    rec = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X[:N_TRAIN], y[:N_TRAIN]),
                                      store=tmp_path / "run", resume=True)
    assert rec.restore() == 3
    with rec:
        for s in range(3, 6):
            for group in optimizer.param_groups:
                group["lr"] = setup.rate(s)
            optimizer.zero_grad()
            F.cross_entropy(model(X[plan[s]]), y[plan[s]]).backward()
            rec.log_batch(plan[s])
            optimizer.step()
    loaded = Trajectory.load(tmp_path / "run", model=tanh_mlp())
    assert loaded.n_steps == 6 and float(loaded.audit().max()) <= 1e-12
    for s in range(6):
        got, want = loaded.updates(s)["0.weight"], whole.updates(s)["0.weight"]
        # step 3 starts from the same theta (same P), with the float64 mu_product (other q); then the runs part
        assert torch.equal(got.P, want.P) == (s <= 3) and (got.q == want.q) == (s < 3)
        assert float((got.P - want.P).abs().max()) <= 1e-7 * float(want.P.abs().max())
        assert got.q == pytest.approx(want.q, rel=1e-7) and got.n == pytest.approx(want.n, rel=1e-7)
    assert float((loaded.params(6)["0.weight"] - whole.params(6)["0.weight"]).abs().max()) <= 1e-8


def test_pure_updates_refuse_groups_with_different_statistics_naming_the_fix():
    from explaind_optimizers.pure_adam_family import adamax_update_fn, nadam_update_fn, radam_update_fn

    groups = {"param_groups": [{"betas": [0.9, 0.999], "eps": 1e-8}, {"betas": [0.9, 0.99], "eps": 1e-8}]}
    for fn, label in ((nadam_update_fn, "NAdam"), (radam_update_fn, "RAdam"), (adamax_update_fn, "Adamax")):
        with pytest.raises(ConfigError, match=rf"{label} pure update: the parameter groups differ in betas\[1\] or "
                                              rf"eps.*Fix: record the run with shared betas\[1\] and eps"):
            fn(groups)


def test_pure_update_start_state_without_the_saved_statistics_is_refused():
    from explaind_optimizers.pure_adam_family import adamax_update_fn

    pure = adamax_update_fn({"param_groups": [{}]})
    theta = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"Adamax pure update: .*does not hold \['exp_inf', 'step'\].*Fix: "
                                          r"re-record the run"):
        pure.start_state(theta, None, None)
    state = pure.start_state(theta, None, {"exp_inf": torch.ones(3), "step": 4.0})
    assert float(state["step"]) == 4.0 and torch.equal(state["w"], torch.ones(3, dtype=torch.float64))
