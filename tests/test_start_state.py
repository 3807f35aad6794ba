"""Recordings that start from optimizer state: ``with rec:`` opened after k unrecorded steps of a plain loop.

SGD with momentum, Adam (L2 weight decay) and AdamW, each trained for 3 steps before the recorder opens and 4
recorded steps after, in float64 on a tanh MLP with 4 outputs and a learning-rate schedule (tests/_start_state_kit.py).
Checked for each: the replica against the trained model, the residual share, ``keep=("train",)`` against the slow
loop reference of tests/reference.py, and the ``initial_state`` term against ``carried_part``, which rebuilds the
part of every recorded update that the start buffers carry from the optimizer's own definition (its own momentum and
second-moment recursions from the state saved before the recording, not the recorded coefficients), seen through
the reference's path features (docs/maths.md §4, "Optimizer state at the start").
"""

from __future__ import annotations

import pytest
import torch
from _start_state_kit import BATCH, OPTIMIZERS, batches, carried_part, data, mlp, step, train
from reference import Reference, rel_err

import explaind
from explaind.exceptions import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_recording_opened_after_unrecorded_steps_is_exact_with_its_initial_state_term(kind):
    model, traj, state, rates = train(kind)
    _, _, Xt = data()
    with torch.no_grad():
        truth = model(Xt)
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(Xt), truth) <= 1e-6
    ref = Reference(traj, Xt)
    expected = carried_part(kind, ref, state, rates)
    for momentum in ("forward", "reverse"):  # the per-sample buffer and the test-side accumulator
        att = explaind.InfluenceEstimator(keep=("train",), momentum=momentum, tol=1e-11,
                                          device="cpu").fit(traj).transform(Xt)
        assert att.meta["momentum"] == momentum
        assert att.meta["residual_share"] <= 1e-9 and att.completeness_error() <= 1e-12
        assert rel_err(att.values, ref.kept(("train",))) <= 1e-9
        assert rel_err(att.initial_state, expected) <= 1e-9
    assert expected.abs().sum() >= 1e-2 * (att.final - att.initial).abs().sum()  # a real share of the change


@pytest.mark.parametrize("keep, momentum, path", [((), "auto", "jvp"), (("step",), "auto", "jvp"),
                                                  (("group",), "auto", "jacobian"), (("param",), "auto", "jacobian"),
                                                  (("train",), "reverse", "jacobian"),
                                                  (("step", "train"), "forward", "jacobian")])
def test_every_algorithm_gives_the_same_initial_state_term(keep, momentum, path):
    """The JVP path, the forward and the reverse sweeps carry ``m_-1`` each their own way; all match the reference."""
    _, traj, state, rates = train("adam")
    _, _, Xt = data()
    att = explaind.InfluenceEstimator(keep=keep, momentum=momentum, tol=1e-11, device="cpu").fit(traj).transform(Xt)
    assert att.meta["path"] == path
    assert att.meta["residual_share"] <= 1e-9 and att.completeness_error() <= 1e-12
    assert rel_err(att.initial_state.reshape(3, -1, 4).sum(1), carried_part("adam", Reference(traj, Xt), state,
                                                                            rates)) <= 1e-9


def test_a_window_after_the_first_step_still_carries_the_start_buffers():
    _, traj, state, rates = train("sgd")
    _, _, Xt = data()
    att = explaind.InfluenceEstimator(keep=("train",), steps=(2, None), tol=1e-11, device="cpu").fit(traj).transform(Xt)
    assert att.meta["residual_share"] <= 1e-9 and att.completeness_error() <= 1e-12
    assert rel_err(att.initial_state, carried_part("sgd", Reference(traj, Xt), state, rates, steps=(2, 4))) <= 1e-9


def test_a_fresh_optimizer_has_no_initial_state_and_a_zero_term():
    X, y, Xt = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(2):
            step(model, opt, X, y, torch.arange(BATCH * s, BATCH * (s + 1)), rec)
    assert rec.trajectory.initial_state() == {}
    att = explaind.InfluenceEstimator(keep=("step",), device="cpu").fit(rec.trajectory).transform(Xt)
    assert not att.initial_state.any()


def test_maximize_starts_from_the_negated_buffer():
    """The adapters model ``maximize=True`` with ``-P``: their buffer is the negative of torch's, so is ``m_-1``."""
    X, y, Xt = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, maximize=True)
    for s in range(2):
        step(model, opt, X, y, torch.arange(BATCH * s, BATCH * (s + 1)))
    held = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(2, 4):
            step(model, opt, X, y, torch.arange(BATCH * s, BATCH * (s + 1)), rec)
    assert all(torch.equal(rec.trajectory.initial_state()[n], -held[n]) for n in held)
    assert max(rec.trajectory.audit()) <= 1e-13
    att = explaind.InfluenceEstimator(keep=("step",), tol=1e-11, device="cpu").fit(rec.trajectory).transform(Xt)
    assert att.meta["residual_share"] <= 1e-9 and att.initial_state.abs().sum() > 0


def test_an_adapter_without_start_state_is_refused_naming_the_fix(monkeypatch):
    from explaind_optimizers.sgd import SGDAdapter

    monkeypatch.delattr(SGDAdapter, "start_state")
    with pytest.raises(ConfigError, match=r"already holds SGD state for 4 parameter\(s\).*adapter 'sgd' has no "
                                          r"start_state\(\).*Fix: record from a fresh optimizer"):
        train("sgd", recorded=1)


VARIANTS = {
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    "sgd-dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw-maximize": lambda p: torch.optim.AdamW(p, lr=0.01, maximize=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_optimizer_variants_started_from_state_audit_and_decompose_at_rounding_level(variant):
    """Nesterov (``q = mu``), dampening, AMSGrad's running maximum and ``maximize``: the modelled updates from
    ``m_-1`` match torch's (audit) and the residual share stays at rounding level, with a real initial-state part."""
    X, y, Xt = data()
    model = mlp()
    opt = VARIANTS[variant](model.parameters())
    plan = batches(7)
    for idx in plan[:3]:
        step(model, opt, X, y, idx)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in plan[3:]:
            step(model, opt, X, y, idx, rec)
    assert max(rec.trajectory.audit()) <= 1e-13
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(rec.trajectory).transform(Xt)
    assert att.meta["residual_share"] <= 1e-9 and att.completeness_error() <= 1e-12
    assert att.initial_state.abs().sum() >= 1e-2 * (att.final - att.initial).abs().sum()
