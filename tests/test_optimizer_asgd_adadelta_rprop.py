"""The ``asgd``, ``adadelta`` and ``rprop`` adapters (plugins/explaind_optimizers/asgd.py, adadelta.py, rprop.py).

The conformance check replays every step of their default scenarios (ASGD: decaying step size, ``lambd``, ``t0``,
``alpha``, L2 weight decay; Adadelta: ``rho``, ``eps``, L2 weight decay; Rprop: ``etas``, ``step_sizes``; all:
``maximize``, the foreach path, two groups, schedules, accumulation, clipping, a frozen and a sometimes-unused
parameter) in float64 from the real optimizer's updates; the loop cases of tests/_loops9_kit.py (``asgd_*``,
``adadelta_*``, ``rprop_*``, in tests/test_stranger_loops_round9.py) check replica, residual share and ``train``
scores against the slow loop reference. Before the adapters every ASGD, Adadelta and Rprop run was refused
(``UnknownEntryError``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _loops9_kit import CASES
from _rmsprop_adagrad_kit import MODELS, assert_metagradients_match_retraining, record
from _stranger_loops_kit import batches, data, mlp, train
from reference import rel_err

import explaind
from explaind.exceptions import ConfigError
from explaind.testing import check_optimizer_adapter


@pytest.mark.parametrize(("name", "own"), [("asgd", ("decay_alpha_t0",)), ("adadelta", ("rho_eps",)),
                                           ("rprop", ("etas_step_sizes",))])
def test_every_default_scenario_replays_within_1e_12_in_float64(name, own):
    report = check_optimizer_adapter(explaind.get_entry("optimizer_adapter", name), dtype=torch.float64, tol=1e-12)
    assert not report.failures(), str(report)
    runs = ("plain", *own, "maximize", "foreach", "foreach_maximize", "two_groups", "step_lr", "accumulation_3")
    assert {f"{name}_{run}" for run in runs} <= set(report.residuals)


def test_the_first_step_size_is_lr_in_torchs_scalar_dtype():
    """torch keeps ``eta`` in float32 unless the default dtype is float64: the first step of a float64 model moves by
    ``float32(lr)``, which the adapter reports (``lr`` itself would leave a residual of about 1e-8 of the step)."""
    model = mlp()
    opt = torch.optim.ASGD(model.parameters(), lr=0.1, lambd=0.0)
    adapter = explaind.get_entry("optimizer_adapter", "asgd").implementation.from_optimizer(opt)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    start = [p.detach().clone() for p in model.parameters()]
    before = adapter.before_step(opt)
    opt.step()
    rates = {u.P for u in adapter.after_step(opt, before).values()}
    assert rates == {float(torch.tensor(0.1, dtype=torch.float32))} and 0.1 not in rates
    eta = min(rates)
    assert all(float((a - p.detach() - eta).abs().max()) <= 1e-15 for a, p in zip(start, model.parameters()))
    assert all(float((a - p.detach() - 0.1).abs().max()) > 1e-9 for a, p in zip(start, model.parameters()))


def test_the_recording_explains_the_iterate_not_the_average_asgd_keeps():
    """ASGD's ``state["ax"]`` (the average, from step ``t0`` on) is never written into the model: the replica is the
    trained iterate, within 1e-15, and differs from the average's outputs."""
    model = mlp()
    opt = torch.optim.ASGD(model.parameters(), lr=0.2, lambd=0.1, t0=1.0)
    traj = train(model, opt)
    _, _, X_test = data()
    replica = explaind.KernelReplica(quadrature="gauss-legendre", nodes=8, device="cpu").fit(traj).predict(X_test)
    average = mlp()
    with torch.no_grad():
        for p, q in zip(average.parameters(), model.parameters()):
            p.copy_(opt.state[q]["ax"])
        truth, averaged = model.eval()(X_test), average.eval()(X_test)
    assert rel_err(replica, truth) <= 1e-6
    assert rel_err(averaged, truth) > 1e-3


@pytest.mark.parametrize("cls", [torch.optim.ASGD, torch.optim.Adadelta, torch.optim.Rprop])
@pytest.mark.parametrize(("options", "match"), [
    ({"capturable": True}, r"\['capturable'\]=True.*capturable=False"),
    ({"differentiable": True}, r"\['differentiable'\]=True.*differentiable=False"),
    ({"lr": torch.tensor(0.01)}, r"\['lr'\]=tensor\(0\.0100\) is a tensor.*Fix: pass lr=float"),
])
def test_options_outside_the_recurrence_are_refused_naming_the_fix(cls, options, match):
    model = mlp()
    with pytest.raises(ConfigError, match=match):
        explaind.TrajectoryRecorder(model, cls(model.parameters(), **options), loss="cross_entropy")


@pytest.mark.parametrize("case", ["asgd_lambd_t0_weight_decay_step_lr", "adadelta_rho_weight_decay_cosine_lr"])
def test_a_loop_case_with_a_schedule_audits_to_round_off(case):
    """ASGD's step size of step ``t`` comes from the previous step's ``lr`` (a StepLR changes it in between), read
    from the state as torch applied it; Adadelta's ``acc_delta`` is read before the step overwrites it (the full
    figures: tests/test_stranger_loops_round9.py)."""
    model, traj = CASES[case]()
    assert traj.n_steps == 6 and traj.audit().max() <= 1e-12


def _record(make_opt, store, k):
    """9 steps of 6 samples of the kit's MLP with ``make_opt``'s optimizer and a StepLR, into ``store``."""
    X, y, _ = data()
    model = mlp()
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                      checkpoint_every=k)
    with rec:
        for s in range(9):
            idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(40 + s))[:6]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            sched.step()
    return rec.trajectory


@pytest.mark.parametrize("make_opt", [
    lambda m: torch.optim.ASGD(m.parameters(), lr=0.1, lambd=0.05, t0=3.0, weight_decay=0.01),
    lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0, rho=0.8, weight_decay=0.05),
    lambda m: torch.optim.Rprop(m.parameters(), lr=0.02, etas=(0.3, 1.5)),
], ids=["asgd", "adadelta", "rprop"])
def test_a_sparse_store_replays_the_steps_between_checkpoints(tmp_path, make_opt):
    """``checkpoint_every=3``: the steps between checkpoints are replayed from the stored optimizer state (ASGD's
    ``eta``, ``mu``, ``ax``; Adadelta's two running means; Rprop's step sizes and previous gradients) and match the
    dense store's parameters and ``P``."""
    dense = _record(make_opt, tmp_path / "dense", 1)
    sparse = _record(make_opt, tmp_path / "sparse", 3)
    assert sparse.sparse and sparse.n_steps == dense.n_steps == 9
    for s in range(10):
        for n in dense.param_names:
            assert rel_err(sparse.params(s)[n], dense.params(s)[n]) <= 1e-12, (s, n)
    for s in range(9):
        for n, u in dense.updates(s).items():
            v = sparse.updates(s)[n]
            assert (v.lambda_c, v.lambda_d) == (u.lambda_c, u.lambda_d)
            assert rel_err(torch.as_tensor(v.P), torch.as_tensor(u.P)) <= 1e-12, (s, n)
    gaps = sparse.replay_error()
    assert (gaps[~np.isnan(gaps)] <= 1e-12).all() and (~np.isnan(gaps)).any()
    sparse.verify()


def test_rprop_entries_whose_sign_flipped_do_not_move_and_get_p_zero():
    """Rprop leaves an entry whose gradient changed sign where it is (``P = 0`` there) and moves the others by their
    step size, clamped to ``step_sizes``: the loop case holds both kinds of entry, and its audit is round-off."""
    model, traj = CASES["rprop_etas_step_sizes_two_groups"]()
    zeros = sum(int((u.P == 0).sum()) for s in range(1, traj.n_steps) for u in traj.updates(s).values())
    moved = sum(int((u.P != 0).sum()) for s in range(traj.n_steps) for u in traj.updates(s).values())
    assert zeros > 0 and moved > zeros
    assert traj.audit().max() <= 1e-12


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.ASGD(ps, lr=0.2, lambd=0.1, t0=2.0, weight_decay=0.01),
    lambda ps: torch.optim.Adadelta(ps, lr=1.0, rho=0.8, weight_decay=0.05),
], ids=["asgd", "adadelta"])
def test_the_counterfactual_matches_central_differences_of_retraining(make_optimizer):
    """ASGD (its coefficients do not depend on the gradient: the ``sgd`` record's linear update is its pure update)
    and Adadelta (``explaind_optimizers.pure_adadelta``): ``CounterfactualEstimator`` replays the run to 1e-12 and its
    metagradient in one sample matches central differences of re-training to 1e-6 (tests/_rmsprop_adagrad_kit.py).
    Before, both were refused (no ``update_fn``)."""
    build = MODELS["tanh"][0]
    model = build()
    traj, _, _ = record(model, make_optimizer(model.parameters()), steps=5)
    assert_metagradients_match_retraining(build, make_optimizer, traj, steps=5)


def _resumable(make_optimizer, store, stop, resume=False):
    """Steps up to ``stop`` of the kit's loop into ``store``; ``resume``: ``restore()`` first and go on from there."""
    X, y, _ = data()
    model = mlp()
    opt = make_optimizer(model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store, resume=resume)
    start = rec.restore() if resume else 0
    with rec:
        for idx in batches()[start:stop]:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.ASGD(ps, lr=0.2, lambd=0.1, t0=2.0),
    lambda ps: torch.optim.Adadelta(ps, lr=1.0, rho=0.8),
    lambda ps: torch.optim.Rprop(ps, lr=0.02, etas=(0.3, 1.5)),
], ids=["asgd", "adadelta", "rprop"])
def test_a_resumed_recording_continues_bit_for_bit(tmp_path, make_optimizer):
    """3 steps, then a new recorder with ``resume=True`` and ``restore()`` (ASGD's ``eta``, ``mu``, ``ax``; Adadelta's
    running means; Rprop's step sizes and previous gradients loaded from the store): the model and every stored
    step equal those of one uninterrupted run."""
    whole_model, whole = _resumable(make_optimizer, tmp_path / "whole", 6)
    _resumable(make_optimizer, tmp_path / "part", 3)
    model, resumed = _resumable(make_optimizer, tmp_path / "part", 6, resume=True)
    assert resumed.n_steps == whole.n_steps == 6
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), whole_model.parameters()))
    for s in range(7):
        assert all(torch.equal(resumed.params(s)[n], whole.params(s)[n]) for n in whole.param_names)


def test_the_counterfactual_refuses_rprop_naming_the_adapters_that_have_a_pure_update():
    """Rprop has no pure update (its step sizes follow the signs of the gradients): the refusal lists the adapters
    registered with one, read from the registry (a fixed list in the message missed asgd and adadelta)."""
    model = MODELS["tanh"][0]()
    traj, _, _ = record(model, torch.optim.Rprop(model.parameters(), lr=0.02), steps=2)
    with pytest.raises(ConfigError, match=r"adapter 'rprop' has no update_fn") as caught:
        explaind.CounterfactualEstimator(device="cpu").fit(traj)
    listed = re.search(r"registered now: ([a-z_, ]+)\)", str(caught.value)).group(1).split(", ")
    assert {"sgd", "adam", "asgd", "adadelta", "adagrad", "hf_adafactor"} <= set(listed) and "rprop" not in listed
