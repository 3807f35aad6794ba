"""Training loops this repository does not contain, recorded as a demanding user writes them.

Each loop is either exact — replica <= 1e-6 relative to the trained model, residual share <= 1e-9 in the engine
*and* in the slow float64 loop reference (tests/reference.py: per-sample gradients one at a time, the recurrence
unrolled by hand, the residual ``Delta theta_s - sum_k D_{s,k} - R_s`` from the actual parameter changes), and
``keep=("train",)`` scores <= 1e-9 relative to that reference — or refused with an explaind error that names the
value, the cause and the fix, keeping every step recorded before it.

Options an adapter refuses at construction, clipping by value, a step without a logged batch and the gradient
check's wrong-loss/wrong-batch cases are tested in tests/test_adapters_errors.py and tests/test_recorder_errors.py;
the second half of this file is in tests/test_hard_loops_edits.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import Reference, rel_err
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, UnknownEntryError

N_TRAIN, BATCH, EPOCHS = 24, 6, 2
TARGET = [0, 1, 2]
QUAD = {"quadrature": "gauss-legendre", "nodes": 8, "device": "cpu"}  # tanh is smooth: 8 nodes are exact


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_TRAIN, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (N_TRAIN,), generator=g)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batches():
    out = []
    for epoch in range(EPOCHS):
        perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(epoch))
        out += [perm[i : i + BATCH] for i in range(0, N_TRAIN, BATCH)]
    return out


def plain_step(s, model, opt, X, y, idx, rec):
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def train(make_opt, step=plain_step, after=None, loss="cross_entropy", **rec_kwargs):
    """Record the loop; ``after(s, opt)`` runs after every step (schedulers, hand edits of param_groups)."""
    X, y = data()
    model = make_model()
    opt = make_opt(model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), **rec_kwargs)
    with rec:
        for s, idx in enumerate(batches()):
            step(s, model, opt, X, y, idx, rec)
            if after is not None:
                after(s, opt)
    return model, rec.trajectory


def assert_exact(model, traj):
    """Replica against the trained model; engine and reference residual shares; train scores against the reference."""
    X, _ = data()
    x = X[:3]
    with torch.no_grad():
        trained = model(x).numpy()
    assert rel_err(explaind.KernelReplica(**QUAD).fit(traj).predict(x), trained) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), target=TARGET, **QUAD).fit(traj).transform(x)
    assert att.meta["residual_share"] <= 1e-9
    ref = Reference(traj, x, target=TARGET, panels=1)
    expected = ref.kept(("train",))
    assert rel_err(np.asarray(att.values).reshape(expected.shape), expected) <= 1e-9
    change = ref.final() - ref.initial()
    assert float(np.abs(ref.residual(())).sum()) <= 1e-9 * float(np.abs(change).sum())


def sgd(**kw):
    return lambda ps: torch.optim.SGD(ps, lr=0.1, **kw)


def adam(cls=torch.optim.Adam, **kw):
    return lambda ps: cls(ps, lr=0.01, **kw)


@pytest.mark.parametrize("make_opt", [
    sgd(momentum=0.9, nesterov=True, foreach=True),
    adam(amsgrad=True, fused=True),
    adam(maximize=True, weight_decay=0.01),
    adam(torch.optim.AdamW, maximize=True, foreach=True, weight_decay=0.1),
    sgd(momentum=0.9, dampening=0.3, maximize=True, weight_decay=0.01, foreach=False),
], ids=["sgd-nesterov-foreach", "adam-amsgrad-fused", "adam-maximize-l2", "adamw-maximize-foreach",
        "sgd-dampening-maximize"])
def test_optimizer_flags_the_adapters_cover_are_exact(make_opt):
    assert_exact(*train(make_opt))


def _edit_groups(changes):
    """``after`` hook that sets ``param_groups`` entries by hand after step ``s``: ``{s: {key: value}}``."""
    def after(s, opt):
        for g in opt.param_groups:
            g.update(changes.get(s, {}))
    return after


@pytest.mark.parametrize("make_opt, changes", [
    (sgd(momentum=0.9), {2: {"lr": 0.03}, 4: {"weight_decay": 0.05, "momentum": 0.5}, 5: {"nesterov": True}}),
    (sgd(), {1: {"momentum": 0.9}, 3: {"dampening": 0.5}}),
    (adam(torch.optim.AdamW), {2: {"lr": 0.003, "weight_decay": 0.2}, 4: {"betas": (0.5, 0.9), "eps": 1e-3}}),
    (adam(), {3: {"decoupled_weight_decay": True, "weight_decay": 0.1}, 5: {"foreach": True}}),
], ids=["sgd-lr-wd-momentum-nesterov", "sgd-momentum-switched-on", "adamw-lr-wd-betas-eps", "adam-decoupled-foreach"])
def test_hyperparameters_changed_by_hand_mid_run_are_exact(make_opt, changes):
    assert_exact(*train(make_opt, after=_edit_groups(changes)))


def _scheduler(kind):
    made = {}

    def after(s, opt):
        if "s" not in made:  # built after the first step, as a loop that creates it lazily does
            made["s"] = {
                "plateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
                "warm-restarts": lambda: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3),
                "per-epoch": lambda: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.2),
            }[kind]()
        sched = made["s"]
        if kind == "plateau":
            sched.step(1.0)  # a metric that never improves: the rate halves at every step
        elif kind == "warm-restarts":
            sched.step()
        elif (s + 1) % (N_TRAIN // BATCH) == 0:
            sched.step()
    return after


@pytest.mark.parametrize("kind", ["plateau", "warm-restarts", "per-epoch"])
def test_schedulers_are_followed_exactly(kind):
    model, traj = train(sgd(momentum=0.9), after=_scheduler(kind))
    lrs = {float(traj.manifest.adapter_hyperparameters["param_groups"][0]["lr"])}
    assert len(lrs) == 1  # the manifest keeps the start; the steps follow the schedule
    assert_exact(model, traj)


def test_backward_twice_every_step_is_measured_as_a_loss_scale():
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward(retain_graph=True)
        loss.backward()
        rec.log_batch(idx)
        opt.step()

    model, traj = train(sgd(momentum=0.9), step=step)
    assert all(float(traj.grad_scale(s)) == 2.0 for s in range(traj.n_steps))
    assert_exact(model, traj)


def test_a_second_backward_at_one_step_is_checked_there_and_exact():
    """Steps 5 and 6 are not auto-checked; 5 saw two backward passes and 6 one again: both are checked."""
    twice = 5

    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward(retain_graph=True)
        if s == twice:
            loss.backward()
        rec.log_batch(idx)
        opt.step()

    model, traj = train(sgd(momentum=0.9), step=step)
    checked = np.isfinite(np.asarray(traj.gradient_check()))
    assert checked.tolist() == [True, True, False, False, True, True, True, False]
    assert [float(traj.grad_scale(s)) for s in range(traj.n_steps)] == [1.0] * twice + [2.0] + [1.0] * 2
    assert_exact(model, traj)


def test_sum_reduction_with_an_uneven_batch_is_checked_again_and_exact():
    """``reduction="sum"`` makes the loss scale the batch size: a step with another size is measured anew."""
    small = 6

    def step(s, model, opt, X, y, idx, rec):
        idx = idx[:3] if s == small else idx
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx], reduction="sum").backward()
        rec.log_batch(idx)
        opt.step()

    model, traj = train(lambda ps: torch.optim.SGD(ps, lr=0.01), step=step)
    checked = np.isfinite(np.asarray(traj.gradient_check()))
    # "auto" checks steps 0, 1 and 4; step 6 (3 samples) and step 7 (6 again) are checked for their new size
    assert checked.tolist() == [True, True, False, False, True, False, True, True]
    scales = [float(traj.grad_scale(s)) for s in range(traj.n_steps)]
    assert scales[small] == pytest.approx(3.0, rel=1e-12)
    assert scales[small + 1] == pytest.approx(6.0, rel=1e-12)
    assert_exact(model, traj)


def test_label_smoothing_is_exact_when_given_as_the_loss_and_refused_otherwise():
    smoothed = lambda out, t: F.cross_entropy(out, t, label_smoothing=0.1)  # noqa: E731

    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        smoothed(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()

    assert_exact(*train(sgd(momentum=0.9), step=step, loss=smoothed))
    with pytest.raises(explaind.exceptions.TrajectoryError, match=r"Step 0: .*label-smoothed loss must be given"):
        train(sgd(momentum=0.9), step=step)


def test_a_hand_written_l2_penalty_is_refused_naming_weight_decay_which_is_exact():
    lam = 5e-3

    def penalised(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        (F.cross_entropy(model(X[idx]), y[idx]) + lam * sum((p ** 2).sum() for p in model.parameters())).backward()
        rec.log_batch(idx)
        opt.step()

    with pytest.raises(explaind.exceptions.TrajectoryError, match=r"Step 0: .*penalty on the parameters.*"
                                                                 r"weight_decay=2\*lam"):
        train(sgd(momentum=0.9), step=penalised)
    # the fix trains the same model: compare the parameters with the hand-penalised loop, run without recording
    X, y = data()
    by_hand = make_model()
    opt = torch.optim.SGD(by_hand.parameters(), lr=0.1, momentum=0.9)
    for idx in batches():
        opt.zero_grad()
        (F.cross_entropy(by_hand(X[idx]), y[idx]) + lam * sum((p ** 2).sum() for p in by_hand.parameters())).backward()
        opt.step()
    model, traj = train(sgd(momentum=0.9, weight_decay=2 * lam))
    for a, b in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert_exact(model, traj)


def test_two_recorders_on_one_model_record_the_same_exact_run(tmp_path):
    X, y = data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    second = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "b")
    with first, second:
        for idx in batches():
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            first.log_batch(idx)
            second.log_batch(idx)
            opt.step()
    a, b = first.trajectory, second.trajectory
    assert a.n_steps == b.n_steps == len(batches())
    for s in range(a.n_steps + 1):
        for name in a.param_names:
            assert torch.equal(a.params(s)[name], b.params(s)[name])
    assert_exact(model, b)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.LBFGS(ps, lr=0.1),
], ids=["LBFGS"])
def test_optimizers_without_an_adapter_are_refused_with_the_plugin_route(make_opt):
    model = make_model()
    opt = make_opt(model.parameters())
    with pytest.raises(UnknownEntryError, match=rf"No optimizer adapter handles torch\.optim\..*{type(opt).__name__}"
                                                r".*Registered adapters: adadelta, adafactor, adagrad, adam, adamax, "
                                                r"adamw, asgd, hf_adafactor, nadam, radam, rmsprop, rprop, sgd.*"
                                                r"entry-point group"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy")


@pytest.mark.parametrize("key, value, message", [
    ("maximize", True, r"\['maximize'\] was switched from False to True while its parameters hold 'exp_avg'.*"
                       r"Fix: keep maximize fixed"),
    ("capturable", True, r"\['capturable'\]=True is not supported"),
    ("differentiable", True, r"\['differentiable'\]=True is not supported"),
    ("lr", torch.tensor(0.02), r"\['lr'\]=tensor\(0\.0200.*is a tensor.*Fix: pass lr=float"),
])
def test_an_option_switched_on_mid_run_is_refused_at_that_step_keeping_the_earlier_ones(key, value, message):
    switch_after = 3

    def after(s, opt):
        if s == switch_after:
            opt.param_groups[0][key] = value

    X, y = data()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(ConfigError, match=message):
        with rec:
            for s, idx in enumerate(batches()):
                plain_step(s, model, opt, X, y, idx, rec)
                after(s, opt)
    assert rec.trajectory.n_steps == switch_after + 1


def test_maximize_switched_on_an_sgd_with_momentum_is_refused_but_without_momentum_is_exact():
    with pytest.raises(ConfigError, match=r"'momentum_buffer' built with maximize=False"):
        train(sgd(momentum=0.9), after=_edit_groups({2: {"maximize": True}}))
    assert_exact(*train(sgd(), after=_edit_groups({2: {"maximize": True}})))
