"""Optimizer set-ups and loop habits of a new user that no other test records, each exact or refused naming the fix.

Float64 runs of a small tanh MLP (smooth, so the 8-node Gauss-Legendre rule and the slow loop reference of
``reference.py`` integrate exactly). Exact means: replica <= 1e-6 relative to the trained model in evaluation
mode, residual share <= 1e-9 with no warning, the reference's own residual ``Delta theta_s - sum_k D_{s,k} - R_s``
(taken from the actual parameter changes, so an adapter that misreads the optimizer shows up there) <= 1e-12, and
``keep=("train",)`` scores <= 1e-9 relative to the reference.

Cases: AdamW with per-group betas, eps and weight decay and a group at ``lr=0``; fused SGD and fused amsgrad AdamW
on CPU; optimizers built from ``named_parameters()`` (groups holding ``param_names``); optimizers without an adapter
(LBFGS); ``LambdaLR`` stepped after every micro-batch of an uneven accumulation;
``clip_grad_norm_(foreach=True)`` (the recorded scale against torch's clip factor); a guard that skips
``optimizer.step()`` after ``log_batch`` (caught at that step) or before it (exact); a loss that is the sum of two
criteria; an EMA of the weights (``AveragedModel``) and a ``no_grad`` evaluation pass beside the loop.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import Reference, rel_err
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError, UnknownEntryError

DT = torch.float64
N, STEPS, BATCH = 24, 8, 6
QUAD = {"quadrature": "gauss-legendre", "nodes": 8, "device": "cpu"}


def _data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, 4, generator=gen, dtype=DT)
    return X, torch.randint(0, 3, (N,), generator=gen), torch.randn(3, 4, generator=gen, dtype=DT)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randperm(N, generator=gen)[:BATCH] for _ in range(STEPS)]


def _plain(s, model, opt, X, y, idx, rec):
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def _train(make_opt, step=_plain, loss="cross_entropy", after=None, **rec_kwargs):
    """Record STEPS steps of ``step``; ``after(s, model)`` runs after each (EMA updates, evaluation passes)."""
    X, y, X_test = _data()
    model = _mlp()
    opt = make_opt(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), **rec_kwargs)
    with rec:
        for s, idx in enumerate(_batches()):
            step(s, model, opt, X, y, idx, rec)
            if after is not None:
                after(s, model)
    return model.eval(), rec.trajectory, X_test


def assert_exact(model, traj, X_test, reference=Reference) -> None:
    """Replica, residual share and train scores as the module docstring says, against ``reference`` (a class of
    ``reference.py`` or ``replay_reference.py``; its quadrature error is checked where it holds no buffers term)."""
    with torch.no_grad():
        trained = model(X_test)
    assert rel_err(explaind.KernelReplica(**QUAD).fit(traj).predict(X_test), trained) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9
    ref = reference(traj, X_test, panels=1)
    assert float(ref.E.abs().max()) <= 1e-12 * max(float(torch.stack(ref.delta).abs().max()), 1.0)
    if not traj.buffer_names:
        assert float(ref.quad_error.abs().max()) <= 1e-12
    expected = ref.kept(("train",))
    assert rel_err(np.asarray(att.values).reshape(expected.shape), expected) <= 1e-9


def test_adamw_groups_with_their_own_betas_eps_decay_and_a_group_at_lr_zero_are_exact():
    def make(m):
        return torch.optim.AdamW([
            {"params": m[0].parameters(), "betas": (0.8, 0.95), "eps": 1e-4, "weight_decay": 0.3},
            {"params": [m[2].weight], "lr": 0.0, "weight_decay": 0.1},
            {"params": [m[2].bias], "betas": (0.5, 0.9), "weight_decay": 0.0, "amsgrad": True},
        ], lr=0.05)
    model, traj, X_test = _train(make)
    assert torch.equal(traj.params(STEPS)["2.weight"], traj.params(0)["2.weight"])  # lr=0 (and its decay) stand
    assert not torch.equal(traj.params(STEPS)["2.bias"], traj.params(0)["2.bias"])
    assert_exact(model, traj, X_test)


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True),
    lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, amsgrad=True, weight_decay=0.05, fused=True),
    lambda m: torch.optim.AdamW(m.named_parameters(), lr=0.01, weight_decay=0.1),
    lambda m: torch.optim.SGD([{"params": list(m[0].named_parameters())},
                               {"params": list(m[2].named_parameters()), "lr": 0.3}], lr=0.1, momentum=0.9),
], ids=["sgd-nesterov-fused", "adamw-amsgrad-fused", "adamw-named-parameters", "sgd-named-parameter-groups"])
def test_fused_kernels_and_named_parameter_groups_are_exact(make):
    assert_exact(*_train(make))


@pytest.mark.parametrize("cls", [torch.optim.LBFGS])
def test_optimizers_without_an_adapter_are_refused_naming_the_supported_ones(cls):
    model = _mlp()
    with pytest.raises(UnknownEntryError, match=rf"No optimizer adapter handles torch\.optim\..*{cls.__name__}\. "
                                                r"Registered adapters: adadelta, adafactor, adagrad, adam, adamax, "
                                                r"adamw, asgd, hf_adafactor, nadam, radam, rmsprop, rprop, sgd "
                                                r"\(for ASGD, Adadelta, Adafactor, Adagrad, Adam, AdamW, Adamax, "
                                                r"NAdam, RAdam, RMSprop, Rprop, SGD, "
                                                r"transformers.optimization.Adafactor\).*explaind_optimizer_adapters"):
        explaind.TrajectoryRecorder(model, cls(model.parameters(), lr=0.01), loss="cross_entropy")


def test_lambda_lr_stepped_after_every_micro_batch_of_an_uneven_accumulation_is_exact():
    sched = {}

    def step(s, model, opt, X, y, idx, rec):
        sched.setdefault("lr", torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.2 * k)))
        opt.zero_grad()
        for part in (idx[:4], idx[4:]):  # 4 + 2 samples, each summed loss over the step's 6
            (F.cross_entropy(model(X[part]), y[part], reduction="sum") / len(idx)).backward()
            rec.log_batch(part, torch.full((len(part),), 1.0 / len(idx), dtype=DT))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch: scheduler stepped before the optimizer
                sched["lr"].step()
        opt.step()

    model, traj, X_test = _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9), step=step)
    assert [len(traj.micro_batches(s)) for s in range(STEPS)] == [2] * STEPS
    assert_exact(model, traj, X_test)


def test_foreach_clip_grad_norm_is_recorded_as_torchs_clip_factor_and_exact():
    max_norm, norms = 0.05, []

    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)))
        rec.log_batch(idx)
        opt.step()

    model, traj, X_test = _train(lambda m: torch.optim.Adam(m.parameters(), lr=0.01), step=step)
    expected = [min(1.0, max_norm / (n + 1e-6)) for n in norms]  # torch's clip coefficient, clamped at 1
    assert max(expected) < 1.0  # every step clipped
    assert rel_err([traj.grad_scale(s) for s in range(STEPS)], expected) <= 1e-12
    assert_exact(model, traj, X_test)


SKIPPED = 2


def test_a_guard_that_skips_the_step_after_log_batch_is_caught_at_that_step_naming_it():
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        if s != SKIPPED:  # e.g. `if not loss_is_sane: continue` written after log_batch
            opt.step()

    with pytest.raises(TrajectoryError, match=rf"Step {SKIPPED}: the gradient from backward\(\) does not match.*"
                                              r"a guard that skips optimizer\.step\(\) after rec\.log_batch\(\)"):
        _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), step=step)


def test_a_guard_that_skips_the_step_before_log_batch_is_exact():
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        if s == SKIPPED:
            return
        rec.log_batch(idx)
        opt.step()

    model, traj, X_test = _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), step=step)
    assert traj.n_steps == STEPS - 1
    assert_exact(model, traj, X_test)


def _two_criteria(out, target):
    """Cross entropy plus half the squared error of the probabilities (both mean reductions)."""
    return F.cross_entropy(out, target) + 0.5 * F.mse_loss(out.softmax(-1), F.one_hot(target, 3).to(out.dtype))


def test_a_loss_that_sums_two_criteria_is_exact_as_that_callable_and_refused_as_one_of_them():
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        _two_criteria(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()

    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    assert_exact(*_train(make, step=step, loss=_two_criteria))
    with pytest.raises(TrajectoryError, match=r"Step 0: .*under loss 'cross_entropy'.*Check that loss= is the loss "
                                              r"the loop trains with"):
        _train(make, step=step)


def test_an_ema_of_the_weights_and_a_no_grad_evaluation_pass_beside_the_loop_are_exact():
    ema: dict[str, AveragedModel] = {}
    X_val = _data()[2]

    def after(s, model):
        ema.setdefault("m", AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))).update_parameters(model)
        if s % 3 == 2:
            model.eval()
            with torch.no_grad():
                model(X_val)
            model.train()

    model, traj, X_test = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01), after=after)
    assert traj.param_names == tuple(n for n, _ in model.named_parameters())  # the EMA copy is not recorded
    assert not torch.equal(ema["m"].module[0].weight, model[0].weight)
    assert_exact(model, traj, X_test)
