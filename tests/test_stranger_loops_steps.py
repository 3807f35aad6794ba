"""How a new user steps the optimizer: closures, clipping, chained schedulers, gradients by hand, SWA.

Exact (tests/_stranger_loops_kit.py: replica <= 1e-6 against the trained model, residual share <= 1e-9 without a
warning, train scores <= 1e-9 against the slow float64 loop reference, whose own residual is <= 1e-12):
``optimizer.step(closure)`` with ``rec.log_batch`` inside the closure or before ``step``; ``clip_grad_norm_``
with ``norm_type=inf`` or called after ``log_batch``; ``ChainedScheduler`` and ``SequentialLR``; a backbone run
under ``torch.no_grad()``. Refused naming the fix: clipping a subset of the parameters; a gradient from
``torch.autograd.grad`` assigned to ``.grad`` (before, the fix named only a leftover gradient);
``torch.optim.swa_utils.AveragedModel`` given to the recorder (before, only "not parameters of the model"); a
closure with dropout whose ``log_batch`` comes before ``step(closure)`` (now named: inside the closure); a second
optimizer over part of the model (now named: one optimizer, a parameter group per part); ``SparseAdam`` over a
``sparse=True`` embedding (now naming Adam or AdamW with ``sparse=False``).
Warned: the SWA average passed to ``fidelity_report`` is named as no point of the trajectory (before, the
warning blamed a change after recording or unrecorded buffers).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _stranger_loops_kit import (
    DT,
    NoGradBackbone,
    adam,
    assert_exact,
    autograd_step,
    closure_step,
    data,
    dropout_mlp,
    measure,
    mlp,
    plain,
    sgd,
    swa_run,
    train,
    two_optimizer_step,
)
from replay_reference import ReplayReference
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = {"sgd": sgd, "adam": adam}


@pytest.mark.parametrize("where", ["inside", "before", "keyword"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_step_with_a_closure_is_exact(where, opt):
    model = mlp()
    traj = train(model, OPTIMIZERS[opt](model), step=closure_step(where), check_gradients=True)
    assert_exact(measure(model, traj))


def _clipped(clip):
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        if clip == "after-log":
            rec.log_batch(idx)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        else:
            if clip == "inf":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01, norm_type=float("inf"))
            else:  # the first layer only
                torch.nn.utils.clip_grad_norm_(model[0].parameters(), 0.01)
            rec.log_batch(idx)
        opt.step()
    return step


@pytest.mark.parametrize("clip", ["inf", "after-log"])
def test_clipping_by_the_max_norm_or_after_log_batch_is_exact(clip):
    model = mlp()
    traj = train(model, OPTIMIZERS["adam"](model), step=_clipped(clip), check_gradients=True)
    assert max(traj.grad_scale(s) for s in range(traj.n_steps)) < 1.0  # every step clipped
    assert_exact(measure(model, traj))


@pytest.mark.parametrize("check", [True, False])
def test_clipping_a_subset_of_the_parameters_is_refused_naming_the_fix(check):
    model = mlp()
    with pytest.raises(TrajectoryError, match=r"Step 0: .*gradient of 0\.weight, 0\.bias was changed by more than a "
                                              r"global factor.*clip_grad_norm_ over all parameters"):
        train(model, OPTIMIZERS["adam"](model), step=_clipped("subset"), check_gradients=check)


SCHEDULERS = {
    "chained": lambda o: lr_scheduler.ChainedScheduler([lr_scheduler.LinearLR(o, 0.3, total_iters=3),
                                                        lr_scheduler.ExponentialLR(o, 0.8)]),
    "sequential": lambda o: lr_scheduler.SequentialLR(o, [lr_scheduler.LinearLR(o, 0.3, total_iters=2),
                                                          lr_scheduler.CosineAnnealingLR(o, 4)], milestones=[2]),
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_chained_and_sequential_schedulers_are_exact(kind):
    model = mlp()
    opt = OPTIMIZERS["sgd"](model)
    sched = SCHEDULERS[kind](opt)
    lrs = []
    traj = train(model, opt, after=lambda s: (lrs.append(opt.param_groups[0]["lr"]), sched.step()))
    assert len({round(lr, 12) for lr in lrs}) == len(lrs)  # a new rate at every step
    assert [float(traj.updates(s)["0.weight"].P) for s in range(traj.n_steps)] == pytest.approx(lrs, rel=1e-12)
    assert_exact(measure(model, traj))


def test_a_backbone_under_no_grad_in_the_optimizer_is_exact():
    model = NoGradBackbone()
    traj = train(model, torch.optim.AdamW(model.parameters(), lr=0.01), check_gradients=True)
    assert torch.equal(traj.params(traj.n_steps)["backbone.0.weight"], traj.params(0)["backbone.0.weight"])
    assert_exact(measure(model, traj))


def test_a_gradient_from_autograd_grad_assigned_to_grad_is_refused_naming_backward():
    model = mlp()
    with pytest.raises(TrajectoryError, match=r"Step 0: .*0\.weight with a gradient that no backward\(\) of this step "
                                              r"produced.*torch\.autograd\.grad and assigned to \.grad.*compute it "
                                              r"with loss\.backward\(\)"):
        train(model, OPTIMIZERS["sgd"](model), step=autograd_step)


def test_swa_records_the_last_iterate_exactly_and_names_the_average_at_fidelity_report():
    model, swa, traj = swa_run()
    assert_exact(measure(model, traj))
    replica = explaind.KernelReplica(device="cpu").fit(traj)
    X_test = data()[2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        assert replica.fidelity_report(X_test, model=model)["model_max_rel_error"] <= 1e-6
    with pytest.warns(ExplaindWarning, match=r"AveragedModel and differs from the recorded final state by .*average "
                                             r"of the iterates.*last iterate"):
        report = replica.fidelity_report(X_test, model=swa)
    assert report["model_max_rel_error"] > 1e-2


def test_an_averaged_model_given_to_the_recorder_is_refused_naming_it():
    model = mlp()
    swa = AveragedModel(model)
    with pytest.raises(TrajectoryError, match=r"not parameters of the model.*given a torch\.optim\.swa_utils\."
                                              r"AveragedModel.*Record the model the optimizer trains"):
        train(swa, OPTIMIZERS["sgd"](model), step=plain)


def test_a_closure_with_dropout_is_exact_logged_inside_and_refused_before_naming_the_closure():
    model = dropout_mlp()
    traj = train(model, OPTIMIZERS["sgd"](model), step=closure_step("inside"), check_gradients=True)
    assert_exact(measure(model, traj, ReplayReference))
    model = dropout_mlp()
    with pytest.raises(TrajectoryError, match=r"no forward of the model since the previous call.*with "
                                              r"optimizer\.step\(closure\): inside the closure, after backward\(\)"):
        train(model, OPTIMIZERS["sgd"](model), step=closure_step("before"))


def test_a_second_optimizer_over_part_of_the_model_is_refused_naming_parameter_groups():
    model = mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    second = torch.optim.Adam(model[2].parameters(), lr=0.01)
    with pytest.raises(TrajectoryError, match=r"Step 1: the parameter\(s\) 2\.weight .*another optimizer stepping "
                                              r"them.*Two optimizers over one model.*a parameter group per part"):
        train(model, first, step=two_optimizer_step(first, second))


def test_sparse_adam_over_a_sparse_embedding_is_refused_naming_the_dense_optimizer():
    """Before: the fix (sparse=False) led to SparseAdam's own error on dense gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, sparse=True), nn.Flatten(), nn.Linear(6, 3)).to(DT)
    with pytest.raises(UnsupportedModelError, match=r"sparse=True.*SparseAdam takes only sparse ones: train them with "
                                                    r"Adam or AdamW.*lazy update"):
        explaind.TrajectoryRecorder(model, torch.optim.SparseAdam(list(model[0].parameters())), loss="cross_entropy")
