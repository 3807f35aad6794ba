"""Cases of the ninth loops round (tests/test_stranger_loops_round9.py, tests/stranger_loops_round9_table.py):
schedulers that edit momentum and betas, optimizer options and loop habits not recorded in earlier rounds.

Every case builds on tests/_stranger_loops_kit.py (float64, 6 steps of 6 of 24 samples, a small tanh MLP unless
the case names another model) and is measured by its :func:`~_stranger_loops_kit.measure` (replica against the
trained model in evaluation mode, residual share, ``keep=("train",)`` scores against the slow loop reference and
that reference's own per-step residual); the dropout cases against ``replay_reference.ReplayReference``, the
ReLU cases (:data:`DEFAULT_RULE`) with the default estimators. A case is a function returning
``(model, trajectory)``; one that the library refuses raises.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _loops8_kit import ReluCNN, _run, scheduled
from _start_state_kit import carried_part
from _stranger_loops_kit import DT, QUAD, STEPS, N, adam, batches, data, dropout_mlp, measure, mlp, plain, sgd, train
from reference import Reference, rel_err
from replay_reference import ReplayReference
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import explaind
from explaind.exceptions import ExplaindWarning

Case = Callable[[], tuple[nn.Module, Any]]


def two_groups(cls: type, first: dict[str, Any], second: dict[str, Any], **defaults: Any) -> Callable:
    """``cls`` over two groups: the weights with ``first``'s options, the biases with ``second``'s."""
    def make(model: nn.Module) -> Any:
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return cls([{"params": weights, **first}, {"params": biases, **second}], **defaults)
    return make


def with_opt(make_opt: Callable[[nn.Module], Any], step: Callable = plain,
             after: Callable[[Any, nn.Module], Callable[[int], None]] | None = None, build: Callable = mlp) -> Case:
    """A case over ``build()`` trained by ``make_opt`` with ``step`` (and ``after``)."""
    return lambda: _run(build, make_opt, step, after)


def scheduled_with(make_opt: Callable[[nn.Module], Any], make: Callable[[Any], Any],
                   call: Callable[[Any, int], None] | None = None) -> Case:
    """A scheduler ``make(opt)`` over ``make_opt``'s optimizer, stepped after each step (or by ``call``)."""
    def after(opt, model):
        sched = make(opt)
        return (lambda s: call(sched, s)) if call else (lambda s: sched.step())
    return with_opt(make_opt, after=after)


# ---------------------------------------------------------------------------------------------- schedulers


def plateau_step(metric: Callable[[int], float]) -> Callable[[Any, int], None]:
    """``ReduceLROnPlateau.step(metric(s))``."""
    return lambda sched, s: sched.step(metric(s))


def lambda_per_group(opt: Any) -> Any:
    """``LambdaLR`` with one function per group (the weights halve per step, the biases grow)."""
    return lr_scheduler.LambdaLR(opt, [lambda e: 0.5 ** e, lambda e: 1.0 + e])


# ---------------------------------------------------------------------------------------------- loop structure


def grad_step(edit: Callable[[nn.Module, int], None]) -> Callable:
    """The textbook step with ``edit(model, s)`` between ``backward()`` and ``log_batch``."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        edit(model, s)
        rec.log_batch(idx)
        opt.step()
    return step


def maximized_step(s, model, opt, X, y, idx, rec) -> None:
    """``maximize=True`` over the negated loss (ascending ``-loss`` trains the model as usual)."""
    opt.zero_grad()
    (-F.cross_entropy(model(X[idx]), y[idx])).backward()
    rec.log_batch(idx)
    opt.step()


def nan_skipped_after_backward(s, model, opt, X, y, idx, rec) -> None:
    """At step 2 the loss is NaN (a poisoned batch); the loop runs ``backward()``, finds non-finite gradients,
    calls ``zero_grad()`` and skips the step before ``log_batch``."""
    opt.zero_grad()
    loss = F.cross_entropy(model(X[idx]), y[idx])
    if s == 2:
        loss = loss * torch.tensor(float("nan"), dtype=DT)
    loss.backward()
    if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
        opt.zero_grad()
        return
    rec.log_batch(idx)
    opt.step()


def two_forwards(s, model, opt, X, y, idx, rec) -> None:
    """Two forward passes over the halves of the batch, each loss (sum over the half / batch size) backwarded
    into the same gradients."""
    opt.zero_grad()
    for part in (idx[:3], idx[3:]):
        (F.cross_entropy(model(X[part]), y[part], reduction="sum") / len(idx)).backward()
    rec.log_batch(idx)
    opt.step()


def gradient_penalty(s, model, opt, X, y, idx, rec) -> None:
    """The loss plus 0.1 times the squared norm of its parameter gradient (``create_graph=True``, a double
    backward): not a sum of per-sample losses."""
    opt.zero_grad()
    loss = F.cross_entropy(model(X[idx]), y[idx])
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    (loss + 0.1 * sum((g ** 2).sum() for g in grads)).backward()
    rec.log_batch(idx)
    opt.step()


def uneven_accumulation(s, model, opt, X, y, idx, rec) -> None:
    """Micro-batches of 4, 4 and 2 (the last uneven) from a batch of 10, each mean loss divided by the
    accumulation count 3, each logged with ``rec.log_batch(part)``."""
    gen = torch.Generator().manual_seed(11 + s)
    batch = torch.randperm(N, generator=gen)[:10]
    opt.zero_grad()
    for part in (batch[:4], batch[4:8], batch[8:]):
        (F.cross_entropy(model(X[part]), y[part]) / 3).backward()
        rec.log_batch(part)
    opt.step()


def curriculum_batch_sizes() -> tuple[nn.Module, Any]:
    """A batch size that grows with the curriculum: 3, 3, 6, 6, 12, 12 samples."""
    X, y, _ = data()
    model = mlp()
    opt = sgd(model)
    gen = torch.Generator().manual_seed(9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for size in (3, 3, 6, 6, 12, 12):
            plain(0, model, opt, X, y, torch.randperm(N, generator=gen)[:size], rec)
    return model, rec.trajectory


def manual_update() -> tuple[nn.Module, Any]:
    """No ``optimizer.step()``: the loop updates ``p.data.add_(-lr * p.grad)`` under ``no_grad``; the recorder holds
    an ``SGD(lr=lr)`` the loop uses only for ``zero_grad()``."""
    X, y, _ = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in batches():
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            with torch.no_grad():
                for p in model.parameters():
                    p.data.add_(-0.1 * p.grad)
    return model, rec.trajectory


def lbfgs_run(record: bool) -> tuple[nn.Module, Any]:
    """``LBFGS(lr=0.5, max_iter=4)`` stepped with a closure over each batch: handed to the recorder (``record``), or
    explained from the parameters saved after every step, ``Trajectory.from_checkpoints`` (the fix the refusal
    names)."""
    X, y, _ = data()
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    if record:
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    saved = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for idx in batches():
        def closure(idx=idx):
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            return loss

        opt.step(closure)
        saved.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return model, explaind.Trajectory.from_checkpoints(saved, model=mlp())


def checkpoint_figures(model: nn.Module, traj: Any) -> dict[str, Any]:
    """A trajectory of checkpoints (no samples to split over, no residual: each step's update is its segment): the
    replica against ``model``; as ``share``, the quadrature share of ``keep=("step", "group")`` with
    ``split=False``; as ``scores``, that attribution's total (every term added up) against ``model``."""
    _, _, X_test = data()
    with torch.no_grad():
        truth = model.eval()(X_test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = rel_err(explaind.KernelReplica(**QUAD).fit(traj).predict(X_test), truth)
        att = explaind.InfluenceEstimator(keep=("step", "group"), split=False, **QUAD).fit(traj).transform(X_test)
    return {"replica": replica, "share": float(att.meta["quadrature_share"]),
            "scores": rel_err(np.asarray(att.total()), truth), "reference_residual": 0.0,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]}


def step_twice(s, model, opt, X, y, idx, rec) -> None:
    """``optimizer.step()`` twice on one logged batch's gradient (a copy-paste slip)."""
    plain(s, model, opt, X, y, idx, rec)
    opt.step()


def logged_twice(s, model, opt, X, y, idx, rec) -> None:
    """``rec.log_batch(idx)`` called twice for one batch (once in the loop, once in a helper)."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    rec.log_batch(idx)
    opt.step()


def negated_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss a ``maximize=True`` loop backwards: ``-F.cross_entropy`` (the fix the refusal names)."""
    return -F.cross_entropy(out, target)


def maximized_with_negated_loss(make_opt: Callable[[nn.Module], Any]) -> Case:
    """:func:`maximized_step` recorded with ``loss=negated_loss``."""
    def case() -> tuple[nn.Module, Any]:
        X, y, _ = data()
        model = mlp()
        opt = make_opt(model)
        rec = explaind.TrajectoryRecorder(model, opt, loss=negated_loss, train_data=(X, y))
        with rec:
            for s, idx in enumerate(batches()):
                maximized_step(s, model, opt, X, y, idx, rec)
        return model, rec.trajectory
    return case


def head_gradient_scaled(model: nn.Module, s: int) -> None:
    """The head's gradients times 0.1 (a per-layer learning rate written as a gradient scale)."""
    for p in model[2].parameters():
        p.grad.mul_(0.1)


def clip_nonfinite_foreach(model: nn.Module, s: int) -> None:
    """``clip_grad_norm_(max_norm=0.05, error_if_nonfinite=True, foreach=True)``."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, error_if_nonfinite=True, foreach=True)


def other_run_state() -> dict[str, Any]:
    """The ``state_dict`` of another SGD momentum run (lr 0.05, 3 steps on doubled inputs)."""
    X, y, _ = data()
    other = mlp()
    other_opt = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9)
    for idx in batches()[:3]:
        other_opt.zero_grad()
        F.cross_entropy(other(X[idx] * 2), y[idx]).backward()
        other_opt.step()
    return copy.deepcopy(other_opt.state_dict())


def other_run_state_loaded_first() -> tuple[nn.Module, Any]:
    """SGD momentum whose ``state_dict`` from another run (:func:`other_run_state`) is loaded before ``with rec:``:
    the buffers and the other run's lr (0.05, which replaces this one's 0.1) carry over."""
    model = mlp()
    opt = sgd(model)
    opt.load_state_dict(other_run_state())
    return model, train(model, opt)


def start_state_figures(model: nn.Module, traj: Any) -> dict[str, Any]:
    """:func:`measure` of :func:`other_run_state_loaded_first`, its ``reference_residual`` replaced by the
    relative error of the estimator's ``initial_state`` term against the slow reference's carried part
    (tests/_start_state_kit.py, ``carried_part``): the plain reference starts from zero momentum, so its own
    residual is that carried part."""
    figures = measure(model, traj)
    _, _, X_test = data()
    att = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(traj).transform(X_test)
    ref = Reference(traj, X_test, panels=1)
    expected = carried_part("sgd", ref, other_run_state(), [0.05] * STEPS)
    figures["reference_residual"] = rel_err(att.initial_state.reshape(len(X_test), -1, 3).sum(1), expected)
    return figures


def seed_reset(s, model, opt, X, y, idx, rec) -> None:
    """``torch.manual_seed(s % 2)`` before every forward (dropout draws repeat every other step)."""
    torch.manual_seed(s % 2)
    plain(s, model, opt, X, y, idx, rec)


def ema_with_buffers() -> tuple[nn.Module, Any]:
    """An EMA ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)`` of a dropout MLP
    updated after every step inside ``with rec:`` (the recording explains the model the optimizer trained)."""
    model = dropout_mlp()
    opt = adam(model)
    ema: dict[str, AveragedModel] = {}

    def after(s):
        ema.setdefault("m", AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True))
        ema["m"].update_parameters(model)

    return model, train(model, opt, after=after)


class DeepRelu(nn.Module):
    """Four ReLU layers of 16 units and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for d in (4, 16, 16, 16):
            layers += [nn.Linear(d, 16), nn.ReLU()]
        self.body, self.head = nn.Sequential(*layers), nn.Linear(16, 3)
        self.to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def sgd_nesterov_groups(model: nn.Module) -> torch.optim.SGD:
    """Nesterov SGD, the weights with ``weight_decay=0.1``, momentum 0.9; the biases without decay, momentum 0.8."""
    return two_groups(torch.optim.SGD, {"weight_decay": 0.1}, {"weight_decay": 0.0, "momentum": 0.8},
                      lr=0.1, momentum=0.9, nesterov=True)(model)


CASES: dict[str, Case] = {
    # schedulers that edit momentum / betas, or read a metric
    "plateau_max_abs_cooldown": scheduled(
        lambda o: lr_scheduler.ReduceLROnPlateau(o, mode="max", threshold_mode="abs", threshold=0.01, cooldown=1,
                                                 patience=0, factor=0.5),
        plateau_step(lambda s: 1.0)),
    "plateau_per_group_min_lr": scheduled_with(
        two_groups(torch.optim.SGD, {}, {"lr": 0.2}, lr=0.1, momentum=0.9),
        lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.3, min_lr=[0.05, 0.0], eps=1e-3),
        plateau_step(lambda s: 1.0)),
    "sequential_lr_two_milestones": scheduled(lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.7),
            lr_scheduler.StepLR(o, 1, 0.5)], milestones=[2, 4])),
    "chained_cyclic_momentum_and_exponential": scheduled_with(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
        lambda o: lr_scheduler.ChainedScheduler([
            lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=2, cycle_momentum=True,
                                  base_momentum=0.5, max_momentum=0.95),
            lr_scheduler.ExponentialLR(o, 0.9)])),
    "lambda_lr_one_function_per_group": scheduled_with(two_groups(torch.optim.SGD, {}, {}, lr=0.1, momentum=0.9),
                                                       lambda_per_group),
    "cyclic_lr_cycling_nadam_beta1": scheduled_with(
        lambda m: torch.optim.NAdam(m.parameters(), lr=0.01),
        lambda o: lr_scheduler.CyclicLR(o, base_lr=0.005, max_lr=0.05, step_size_up=2, mode="exp_range",
                                        gamma=0.9, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95)),
    "one_cycle_three_phase_radam": scheduled_with(
        lambda m: torch.optim.RAdam(m.parameters(), lr=0.01, betas=(0.9, 0.9)),
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS, three_phase=True)),
    "one_cycle_linear_adamax": scheduled_with(
        lambda m: torch.optim.Adamax(m.parameters(), lr=0.01),
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS, anneal_strategy="linear",
                                          base_momentum=0.7, max_momentum=0.9)),
    "exponential_lr_adagrad_lr_decay": scheduled_with(
        lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, lr_decay=0.1, initial_accumulator_value=0.5),
        lambda o: lr_scheduler.ExponentialLR(o, 0.8)),
    # optimizer options
    "sgd_nesterov_weight_decay_per_group": with_opt(sgd_nesterov_groups),
    "adam_amsgrad_maximize_weight_decay": with_opt(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True, maximize=True, weight_decay=0.1),
        maximized_step),
    "nadam_momentum_decay_decoupled_foreach": with_opt(lambda m: torch.optim.NAdam(
        m.parameters(), lr=0.01, momentum_decay=0.01, decoupled_weight_decay=True, weight_decay=0.1, foreach=True)),
    "radam_decoupled_maximize_foreach": with_opt(lambda m: torch.optim.RAdam(
        m.parameters(), lr=0.01, betas=(0.9, 0.9), decoupled_weight_decay=True, weight_decay=0.1, maximize=True,
        foreach=True), maximized_step),
    "adamax_maximize_weight_decay_foreach": with_opt(lambda m: torch.optim.Adamax(
        m.parameters(), lr=0.02, weight_decay=0.05, maximize=True, foreach=True), maximized_step),
    "adagrad_maximize_initial_accumulator": with_opt(lambda m: torch.optim.Adagrad(
        m.parameters(), lr=0.1, initial_accumulator_value=0.3, weight_decay=0.01, maximize=True), maximized_step),
    "adam_amsgrad_maximize_negated_loss_callable": maximized_with_negated_loss(lambda m: torch.optim.Adam(
        m.parameters(), lr=0.01, amsgrad=True, maximize=True, weight_decay=0.1)),
    "adagrad_maximize_negated_loss_callable": maximized_with_negated_loss(lambda m: torch.optim.Adagrad(
        m.parameters(), lr=0.1, initial_accumulator_value=0.3, weight_decay=0.01, maximize=True)),
    "asgd_lambd_t0_weight_decay_step_lr": scheduled_with(
        lambda m: torch.optim.ASGD(m.parameters(), lr=0.2, lambd=0.1, alpha=0.75, t0=2.0, weight_decay=0.01),
        lambda o: lr_scheduler.StepLR(o, 1, 0.7)),
    "asgd_foreach_two_groups": with_opt(two_groups(torch.optim.ASGD, {"lambd": 0.2}, {"lambd": 0.0, "lr": 0.3},
                                                   lr=0.1, foreach=True, weight_decay=0.02)),
    "adadelta_rho_weight_decay_cosine_lr": scheduled_with(
        lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0, rho=0.8, weight_decay=0.05),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS)),
    "adadelta_foreach_maximize_negated_loss_callable": maximized_with_negated_loss(lambda m: torch.optim.Adadelta(
        m.parameters(), lr=2.0, eps=1e-4, foreach=True, maximize=True)),
    "rprop_etas_step_sizes_two_groups": with_opt(two_groups(torch.optim.Rprop, {"etas": (0.3, 1.5)},
                                                            {"lr": 0.05, "step_sizes": (1e-3, 0.02)}, lr=0.02)),
    "rprop_foreach_maximize_negated_loss_callable": maximized_with_negated_loss(lambda m: torch.optim.Rprop(
        m.parameters(), lr=0.05, foreach=True, maximize=True)),
    "adamw_tensor_lr_from_start": with_opt(lambda m: torch.optim.AdamW(m.parameters(), lr=torch.tensor(0.01))),
    # loop structure
    "clip_norm_error_if_nonfinite_foreach": with_opt(adam, grad_step(clip_nonfinite_foreach)),
    "nan_loss_backwarded_then_skipped": with_opt(sgd, nan_skipped_after_backward),
    "two_forwards_two_backwards": with_opt(sgd, two_forwards),
    "gradient_penalty_double_backward": with_opt(sgd, gradient_penalty),
    "uneven_last_micro_batch_mean_over_count": with_opt(adam, uneven_accumulation),
    "batch_size_grows_with_curriculum": curriculum_batch_sizes,
    "manual_update_without_optimizer_step": manual_update,
    "manual_update_as_sgd_step": with_opt(lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    "optimizer_step_twice_per_batch": with_opt(sgd, step_twice),
    "lbfgs_closure_max_iter_4": lambda: lbfgs_run(True),
    "lbfgs_saved_each_step_from_checkpoints": lambda: lbfgs_run(False),
    "log_batch_twice_per_batch": with_opt(sgd, logged_twice),
    "head_gradient_scaled_by_hand": with_opt(sgd, grad_step(head_gradient_scaled)),
    "head_in_its_own_group_at_lr_times_0.1": with_opt(lambda m: torch.optim.SGD(
        [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.01}], lr=0.1, momentum=0.9)),
    "other_runs_state_dict_loaded_before_recording": other_run_state_loaded_first,
    "manual_seed_reset_every_step_dropout": with_opt(sgd, seed_reset, build=dropout_mlp),
    "ema_averaged_model_use_buffers_dropout": ema_with_buffers,
    # untuned learning rates, ReLU-heavy models
    "deep_relu_sgd_momentum_lr2": with_opt(lambda m: torch.optim.SGD(m.parameters(), lr=2.0, momentum=0.9),
                                           build=DeepRelu),
    "relu_cnn_adamax_lr1": with_opt(lambda m: torch.optim.Adamax(m.parameters(), lr=1.0), build=ReluCNN),
    "deep_relu_nadam_lr3": with_opt(lambda m: torch.optim.NAdam(m.parameters(), lr=3.0), build=DeepRelu),
}

#: Cases whose ReLU paths are measured with the default estimators (adaptive rule) instead of the 8-node rule.
DEFAULT_RULE = ("deep_relu_sgd_momentum_lr2", "relu_cnn_adamax_lr1", "deep_relu_nadam_lr3")

#: Cases whose dropout masks the reference replays.
REFERENCES: dict[str, type] = {"manual_seed_reset_every_step_dropout": ReplayReference,
                               "ema_averaged_model_use_buffers_dropout": ReplayReference}


def figures(name: str, model: nn.Module, traj: Any) -> dict[str, Any]:
    """The figures of case ``name``: :func:`measure` against its reference (:func:`start_state_figures` for the
    optimizer state loaded before recording)."""
    if name == "other_runs_state_dict_loaded_before_recording":
        return start_state_figures(model, traj)
    if name == "lbfgs_saved_each_step_from_checkpoints":
        return checkpoint_figures(model, traj)
    return measure(model, traj, REFERENCES.get(name, Reference))

