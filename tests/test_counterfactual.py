"""CounterfactualEstimator: exact metagradients against central finite differences of deterministic retraining."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from engine_fixtures import recorded_run
from torch import nn

import explaind
from explaind.exceptions import ConfigError, NotFittedError
from explaind.testing import parametrize_with_checks

pytestmark = pytest.mark.usefixtures("one_thread")

M, N_STEPS, H = 8, 6, 1e-5
BATCHES = [[0, 1, 2, 3], [4, 5, 6, 1], [2, 7, 0, 5], [3, 6, 1, 4], [0, 2, 4, 6], [7, 5, 3, 1]]
SETUPS = {
    "sgd_momentum_schedule": (torch.optim.SGD, {"lr": 0.3, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
                              True),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.2, "momentum": 0.8, "nesterov": True, "weight_decay": 0.02}, False),
    "adam_l2": (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.01}, False),
    "adamw_wd_schedule": (torch.optim.AdamW, {"lr": 0.05, "betas": (0.8, 0.95), "weight_decay": 0.1}, True),
    "adamw_amsgrad": (torch.optim.AdamW, {"lr": 0.04, "weight_decay": 0.1, "amsgrad": True}, False),
}


def _data():
    gen = torch.Generator().manual_seed(21)
    X = torch.randn(M + 3, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (M + 3,), generator=gen)
    return X[:M], y[:M], X[M:]


def _model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _train(setup, scale=None, record=False):
    """Train from the same theta_0 with the same batches; sample k's weight 1/|B| times ``scale[k]``."""
    cls, kwargs, schedule = SETUPS[setup]
    X, y, _ = _data()
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if schedule else None
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y)) if record else None
    scale = torch.ones(M, dtype=torch.float64) if scale is None else scale
    if rec is not None:
        rec.__enter__()
    for batch in BATCHES[:N_STEPS]:
        idx = torch.tensor(batch)
        opt.zero_grad()
        losses = nn.functional.cross_entropy(model(X[idx]), y[idx], reduction="none")
        (losses * scale[idx] / len(batch)).sum().backward()
        if rec is not None:
            rec.log_batch(idx)
        opt.step()
        if sched is not None:
            sched.step()
    if rec is not None:
        rec.__exit__(None, None, None)
        return rec.trajectory
    return model


def _finite_differences(setup, X_test):
    """Central differences of the retrained model's outputs, shape ``(T, M, O)``."""
    out = []
    for k in range(M):
        up, down = torch.ones(M, dtype=torch.float64), torch.ones(M, dtype=torch.float64)
        up[k], down[k] = 1 + H, 1 - H
        plus, minus = _train(setup, up), _train(setup, down)
        with torch.no_grad():
            out.append((plus(X_test) - minus(X_test)) / (2 * H))
    return torch.stack(out, 1)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_metagradient_matches_finite_differences_of_retraining(setup):
    traj = _train(setup, record=True)
    X_test = _data()[2]
    att = explaind.CounterfactualEstimator(device="cpu", checkpoint_every=2).fit(traj).transform(X_test)
    fd = _finite_differences(setup, X_test)
    assert att.axes == ("test", "train", "output") and att.values.shape == fd.shape
    err = float((att.values - fd).abs().max() / fd.abs().max())
    assert err <= 1e-6, err
    assert att.meta["replay_residual"] <= 1e-12


def test_checkpoint_interval_and_chunks_do_not_change_the_result():
    traj = _train("adamw_wd_schedule", record=True)
    X_test = _data()[2]
    every = explaind.CounterfactualEstimator(device="cpu", checkpoint_every=1).fit(traj).transform(X_test).values
    sqrt = explaind.CounterfactualEstimator(device="cpu", test_chunk_size=2).fit(traj).transform(X_test).values
    assert float((every - sqrt).abs().max()) <= 1e-13 * float(every.abs().max())


def test_sample_chunks_bound_the_gradients_held_and_do_not_change_the_result(monkeypatch):
    """chunk_size=1 and 3 (batches of 4) equal the whole batch at once (chunk_size=None) to 1e-12."""
    import explaind.kernel.metagrad as metagrad

    traj = _train("sgd_momentum_schedule", record=True)
    X_test = _data()[2]
    whole = explaind.CounterfactualEstimator(device="cpu", chunk_size=None).fit(traj).transform(X_test).values
    held, inner = [], metagrad._sample_grads

    def spy(replay, theta, idx):
        held.append(int(idx.shape[0]))
        return inner(replay, theta, idx)

    monkeypatch.setattr(metagrad, "_sample_grads", spy)
    for chunk in (1, 3):
        held.clear()
        att = explaind.CounterfactualEstimator(device="cpu", chunk_size=chunk).fit(traj).transform(X_test)
        assert max(held) == chunk and sum(held) == sum(len(b) for b in BATCHES[:N_STEPS])  # one backward sweep
        assert att.meta["chunk_size"] == chunk
        assert float((att.values - whole).abs().max()) <= 1e-12 * float(whole.abs().max())


def test_target_selects_one_output():
    traj = _train("adam_l2", record=True)
    X_test = _data()[2]
    full = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test).values
    one = explaind.CounterfactualEstimator(device="cpu", target=[2, 0, 1]).fit(traj).transform(X_test).values
    expected = torch.stack([full[0, :, 2], full[1, :, 0], full[2, :, 1]])[..., None]
    assert float((one - expected).abs().max()) <= 1e-13 * float(full.abs().max())


def test_adapter_without_update_fn_is_refused(monkeypatch):
    traj = _train("sgd_nesterov", record=True)
    bare = dataclasses.replace(explaind.get_entry("optimizer_adapter", "sgd"), update_fn=None)
    monkeypatch.setattr(explaind.plugins, "get_entry", lambda kind, name: bare)
    with pytest.raises(ConfigError, match=r"optimizer adapter 'sgd' has no update_fn.*Fix: add update_fn"):
        explaind.CounterfactualEstimator(device="cpu").fit(traj)


def test_adam_groups_with_different_eps_are_refused():
    X, y, _ = _data()
    model = _model()
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "eps": 1e-3}])
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        rec.log_batch(torch.arange(M))
        opt.step()
    with pytest.raises(ConfigError, match=r"groups differ in betas\[1\], eps or amsgrad.*Fix:"):
        explaind.CounterfactualEstimator(device="cpu").fit(rec.trajectory)


def test_not_fitted_and_bad_parameters():
    with pytest.raises(NotFittedError):
        explaind.CounterfactualEstimator().transform(torch.zeros(1, 3))
    traj = _train("adam_l2", record=True)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        explaind.CounterfactualEstimator(checkpoint_every=0).fit(traj)
    with pytest.raises(ConfigError, match="chunk_size"):
        explaind.CounterfactualEstimator(chunk_size=0).fit(traj)
    with pytest.raises(ConfigError, match="Trajectory"):
        explaind.CounterfactualEstimator().fit("run/")


@parametrize_with_checks([explaind.CounterfactualEstimator(device="cpu", checkpoint_every=3)])
def test_counterfactual_estimator_conforms(estimator, check):
    run = recorded_run("tanh", "sgd_nesterov_wd")
    check(estimator, run.trajectory, run.X_test)


def _resume(setup, snapshot, window, scale):
    """Retrain from the state saved at the window start: steps ``start <= s < stop`` with weights scaled."""
    cls, kwargs, schedule = SETUPS[setup]
    X, y, _ = _data()
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if schedule else None
    snapshot = copy.deepcopy(snapshot)  # load_state_dict shares the optimizer's tensors, which step() updates
    model.load_state_dict(snapshot["model"])
    opt.load_state_dict(snapshot["opt"])
    if sched is not None:
        sched.load_state_dict(snapshot["sched"])
    for batch in BATCHES[window[0]:window[1]]:
        idx = torch.tensor(batch)
        opt.zero_grad()
        losses = nn.functional.cross_entropy(model(X[idx]), y[idx], reduction="none")
        (losses * scale[idx] / len(batch)).sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model


def _snapshot(setup, start):
    """Model, optimizer and schedule state after the first ``start`` steps of the recorded loop."""
    cls, kwargs, schedule = SETUPS[setup]
    X, y, _ = _data()
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if schedule else None
    for batch in BATCHES[:start]:
        idx = torch.tensor(batch)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "sched": copy.deepcopy(sched.state_dict()) if sched is not None else None}


@pytest.mark.parametrize(("setup", "window"), [("adamw_wd_schedule", (2, 5)), ("sgd_momentum_schedule", (1, None))])
def test_window_matches_finite_differences_of_retraining_from_its_start(setup, window):
    traj = _train(setup, record=True)
    X_test = _data()[2]
    start, stop = window[0], N_STEPS if window[1] is None else window[1]
    att = explaind.CounterfactualEstimator(device="cpu", steps=window).fit(traj).transform(X_test)
    snapshot = _snapshot(setup, start)
    fd = []
    for k in range(M):
        up, down = torch.ones(M, dtype=torch.float64), torch.ones(M, dtype=torch.float64)
        up[k], down[k] = 1 + H, 1 - H
        plus, minus = _resume(setup, snapshot, (start, stop), up), _resume(setup, snapshot, (start, stop), down)
        with torch.no_grad():
            fd.append((plus(X_test) - minus(X_test)) / (2 * H))
    fd_t = torch.stack(fd, 1)
    assert att.meta["window"] == [start, stop]
    err = float((att.values - fd_t).abs().max() / fd_t.abs().max())
    assert err <= 1e-6, err
    resumed = _resume(setup, snapshot, (start, stop), torch.ones(M, dtype=torch.float64))
    at_start = _resume(setup, snapshot, (start, start), torch.ones(M, dtype=torch.float64))
    with torch.no_grad():
        assert float((att.final - resumed(X_test)).abs().max()) <= 1e-12
        assert float((att.initial - at_start(X_test)).abs().max()) <= 1e-12
    # samples in no batch of the window have no effect on theta_stop
    outside = set(range(M)) - {k for batch in BATCHES[start:stop] for k in batch}
    for k in outside:
        assert float(att.values[:, k].abs().max()) == 0.0


def test_whole_run_window_is_the_default_and_bad_windows_are_refused():
    traj = _train("adam_l2", record=True)
    X_test = _data()[2]
    full = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test)
    window = explaind.CounterfactualEstimator(device="cpu", steps=(0, None)).fit(traj).transform(X_test)
    assert torch.equal(full.values, window.values) and full.meta["window"] == [0, N_STEPS]
    for bad in ((3, 3), (-1, 2), (0, N_STEPS + 1)):
        with pytest.raises(ConfigError, match=r"invalid value for 'steps'.*0 <= start < stop <= n_steps = 6"):
            explaind.CounterfactualEstimator(device="cpu", steps=bad).fit(traj)
