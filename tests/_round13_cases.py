"""Cases of the thirteenth round (tests/test_stranger_round13.py, tests/test_stranger_round13_more.py,
tests/stranger_round13_table.py): loops whose scripts do something unusual between ``backward()`` and
``optimizer.step()``, or around them.

Every case builds on tests/_stranger_loops_kit.py (float64, 6 steps of 6 of 24 samples, a small tanh MLP unless
the case names another model) and is measured by :func:`figures` (replica against the trained model in evaluation
mode, residual share, ``keep=("train",)`` scores against the slow float64 loop reference and that reference's own
per-step residual); the ReLU cases (:data:`DEFAULT_RULE`) with the default estimators. A case is a function
returning ``(model, trajectory)``; one that the library refuses raises. The default gradient check
(``check_gradients="auto"``) runs at steps 0, 1 and 4 of these 6 steps: several cases edit the loop at the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _loops8_kit import _run
from _loops9_kit import DeepRelu, grad_step, with_opt
from _round13_models import (
    ManifoldMixup,
    NormNet,
    OutsideTemperature,
    PReluNet,
    RunningNormaliser,
    TwoTransforms,
    teacher_run,
)
from _stranger_loops_kit import N, adam, batches, data, dropout_mlp, measure, mlp, plain, sgd, train
from reference import Reference
from replay_reference import BufferReference, ReplayReference
from torch import nn

import explaind

Case = Callable[[], tuple[nn.Module, Any]]


# ---------------------------------------------------------------------------------------------- loss scales


def weighted_loss_step(weight: Callable[[int], float]) -> Callable:
    """The textbook step with the loss multiplied by ``weight(s)`` (a loss-weight warm-up)."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        (weight(s) * F.cross_entropy(model(X[idx]), y[idx])).backward()
        rec.log_batch(idx)
        opt.step()
    return step


def warmup(s: int) -> float:
    """``min(1, (s + 1) / 6)``: the weight grows at every step."""
    return min(1.0, (s + 1) / 6)


def late_ramp(s: int) -> float:
    """1 at steps 0 and 1, then ``1 + 1e-4 (s - 1)``: a weight that starts moving after the first checks, by little."""
    return 1.0 + 1e-4 * max(0, s - 1)


def bump(s: int) -> float:
    """1, except ``1.001`` at step 2 (between the checks at steps 1 and 4)."""
    return 1.001 if s == 2 else 1.0


def warmup_run(weight: Callable[[int], float] = warmup, **rec_kwargs: Any) -> Case:
    """SGD momentum over the loss times ``weight(s)``."""
    def run():
        model = mlp()
        return model, train(model, sgd(model), step=weighted_loss_step(weight), **rec_kwargs)
    return run


def halved_micro_batches(s, model, opt, X, y, idx, rec) -> None:
    """Two micro-batches of 3, each mean divided by 2 (gradient accumulation), each logged."""
    opt.zero_grad()
    for part in (idx[:3], idx[3:]):
        (F.cross_entropy(model(X[part]), y[part]) / 2).backward()
        rec.log_batch(part)
    opt.step()


def dropout_accumulation() -> tuple[nn.Module, Any]:
    """:func:`halved_micro_batches` on the dropout MLP (random state captured)."""
    model = dropout_mlp()
    return model, train(model, sgd(model), step=halved_micro_batches)


def backward_with_gradient(s, model, opt, X, y, idx, rec) -> None:
    """``loss.backward(gradient=torch.tensor(2.0))``: the loss's gradient seeded with 2."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward(gradient=torch.tensor(2.0, dtype=torch.float64))
    rec.log_batch(idx)
    opt.step()


def sample_weights(idx: torch.Tensor) -> torch.Tensor:
    """Fixed per-sample weights (``1 + index mod 3``), normalised over the batch."""
    w = 1.0 + (idx % 3).to(torch.float64)
    return w / w.sum()


def vector_backward(logged: bool) -> Callable:
    """The per-sample losses backwarded as a vector with ``gradient=w`` (:func:`sample_weights`); ``logged``: ``w``
    goes to ``log_batch``."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        w = sample_weights(idx)
        F.cross_entropy(model(X[idx]), y[idx], reduction="none").backward(gradient=w)
        rec.log_batch(idx, w if logged else None)
        opt.step()
    return step


def autograd_backward_list(s, model, opt, X, y, idx, rec) -> None:
    """``torch.autograd.backward([l1 / 2, l2 / 2])`` over the batch's halves."""
    opt.zero_grad()
    halves = [F.cross_entropy(model(X[p]), y[p]) / 2 for p in (idx[:3], idx[3:])]
    torch.autograd.backward(halves)
    rec.log_batch(idx)
    opt.step()


# ---------------------------------------------------------------------------------------------- .grad edits late


def per_parameter_clip_from(start: int) -> Callable:
    """``clip_grad_norm_([p], 0.05)`` for every parameter on its own, from step ``start`` on (after a warm-up)."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        if s >= start:
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], 0.05)
        rec.log_batch(idx)
        opt.step()
    return step


def noise_at_last_step(s, model, opt, X, y, idx, rec) -> None:
    """Gaussian noise (``1e-3``) added to every ``.grad`` at the last step only."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    if s == 5:
        gen = torch.Generator().manual_seed(s)
        for p in model.parameters():
            p.grad += 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
    rec.log_batch(idx)
    opt.step()


def unlogged_backward_at(steps: tuple[int, ...]) -> Callable:
    """The textbook step; at ``steps`` a second batch (the rows after the logged ones) is backwarded after
    ``log_batch``, at half weight, and not logged (an auxiliary batch)."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        if s in steps:
            other = (idx + 1) % N
            (0.5 * F.cross_entropy(model(X[other]), y[other])).backward()
        opt.step()
    return step


def decay_by_hand(model: nn.Module, s: int) -> None:
    """Weight decay written into ``.grad`` by hand, ``p.grad.add_(p, alpha=0.01)`` (before ``log_batch``)."""
    with torch.no_grad():
        for p in model.parameters():
            p.grad.add_(p, alpha=0.01)


def momentum_by_hand() -> Callable[[nn.Module, int], None]:
    """An exponential average of the gradients kept by hand and written into ``.grad`` (momentum by hand)."""
    average: dict[str, torch.Tensor] = {}

    def edit(model: nn.Module, s: int) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                average[n] = p.grad.clone() if n not in average else 0.9 * average[n] + 0.1 * p.grad
                p.grad.copy_(average[n])
    return edit


def plain_sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def global_factor_by_hand(model: nn.Module, s: int) -> None:
    """Every ``.grad`` multiplied by ``0.5 ** s`` by hand (a schedule written into the gradients)."""
    with torch.no_grad():
        for p in model.parameters():
            p.grad.mul_(0.5 ** s)


def logged_before_forward(parts: int) -> Callable:
    """Each of ``parts`` micro-batches logged before its forward (a loop that logs what it is about to train on)."""
    def step(s, model, opt, X, y, idx, rec):
        opt.zero_grad()
        for part in idx.chunk(parts):
            rec.log_batch(part)
            (F.cross_entropy(model(X[part]), y[part]) / parts).backward()
        opt.step()
    return step


def head_skipped(s, model, opt, X, y, idx, rec) -> None:
    """The textbook step, the head's ``.grad`` set to ``None`` at steps 2 and 3 (the optimizer skips it)."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    if s in (2, 3):
        for p in model[2].parameters():
            p.grad = None
    rec.log_batch(idx)
    opt.step()


# ---------------------------------------------------------------------------------------------- loop structure


def eval_forgotten(s, model, opt, X, y, idx, rec) -> None:
    """The textbook step; after step 2 a validation forward under ``model.eval()`` and no ``model.train()``."""
    plain(s, model, opt, X, y, idx, rec)
    if s == 2:
        model.eval()
        with torch.no_grad():
            model(X[:4])


def dropout_run(step: Callable, before: Callable[[nn.Module], None] | None = None,
                build: Callable[[], nn.Module] = dropout_mlp) -> Case:
    """The dropout MLP (or ``build()``) trained by ``step`` with SGD momentum, ``before(model)`` run first."""
    def run():
        model = build()
        if before is not None:
            before(model)
        return model, train(model, sgd(model), step=step)
    return run


def logged_then_skipped(s, model, opt, X, y, idx, rec) -> None:
    """At step 2 the batch is logged, then a guard zeroes the gradients and skips ``optimizer.step()``."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    if s == 2:
        opt.zero_grad()
        return
    opt.step()


def negative_indices(s, model, opt, X, y, idx, rec) -> None:
    """The textbook step with the batch's indices written from the end (``idx - N``, which index the same rows)."""
    neg = idx - N
    opt.zero_grad()
    F.cross_entropy(model(X[neg]), y[neg]).backward()
    rec.log_batch(neg)
    opt.step()


def float32_weights(s, model, opt, X, y, idx, rec) -> None:
    """The textbook mean loss, the batch logged with weights ``1/6`` in float32."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx, torch.full((len(idx),), 1 / len(idx), dtype=torch.float32))
    opt.step()


def unlearning(s, model, opt, X, y, idx, rec) -> None:
    """Gradient ascent on a forget set: ``mean CE(retain) - mean CE(forget)`` (4 and 2 rows), logged with weights
    ``1/4`` and ``-1/2``."""
    retain, forget = idx[:4], idx[4:]
    opt.zero_grad()
    (F.cross_entropy(model(X[retain]), y[retain]) - F.cross_entropy(model(X[forget]), y[forget])).backward()
    rec.log_batch(idx, torch.tensor([0.25] * 4 + [-0.5] * 2, dtype=torch.float64))
    opt.step()


def two_steps_per_batch(s, model, opt, X, y, idx, rec) -> None:
    """Two full steps (forward, ``backward()``, ``log_batch``, ``step()``) on every batch (data echoing)."""
    for _ in range(2):
        plain(s, model, opt, X, y, idx, rec)


def lagged_loop() -> tuple[nn.Module, Any]:
    """``optimizer.step()`` at the top of the loop, for the previous iteration's gradient (the last batch is
    backwarded and logged but never stepped)."""
    model, (X, y, _) = mlp(), data()
    opt = sgd(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s, idx in enumerate(batches()):
            if s > 0:
                opt.step()
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
    return model, rec.trajectory


def reverse_group(opt: Any, s: int) -> None:
    """The group's parameter list reversed in place after step 2."""
    if s == 2:
        opt.param_groups[0]["params"].reverse()


def amsgrad_off(opt: Any, s: int) -> None:
    if s == 2:
        opt.param_groups[0]["amsgrad"] = False


def edited(make_opt: Callable[[nn.Module], Any], edit: Callable[[Any, int], None]) -> Case:
    """``make_opt``'s optimizer over the MLP, ``edit(opt, s)`` after every step."""
    return with_opt(make_opt, after=lambda opt, model: (lambda s: edit(opt, s)))


def reload_same(model: nn.Module) -> Callable[[int], None]:
    """``model.load_state_dict(model.state_dict())`` after step 2 (a checkpoint restored onto itself)."""
    def after(s: int) -> None:
        if s == 2:
            model.load_state_dict(model.state_dict())
    return after


def module_run(build: Callable[[], nn.Module], make_opt: Callable[[nn.Module], Any] = sgd,
               **rec_kwargs: Any) -> Case:
    """``build()`` trained by the textbook step."""
    def run():
        model = build()
        return model, train(model, make_opt(model), **rec_kwargs)
    return run


CASES: dict[str, Case] = {
    # loss scales
    "loss_weight_warmup_default_check": warmup_run(),
    "loss_weight_warmup_checked_every_step": warmup_run(check_gradients=True),
    "loss_weight_small_ramp_from_step_2": warmup_run(late_ramp),
    "loss_weight_bump_between_checks": warmup_run(bump),
    "loss_weight_bump_checked_every_step": warmup_run(bump, check_gradients=True),
    "dropout_loss_weight_small_ramp_from_step_2": dropout_run(weighted_loss_step(late_ramp)),
    "dropout_accumulation_each_mean_halved": dropout_accumulation,
    "backward_gradient_argument_two": with_opt(sgd, backward_with_gradient),
    "vector_backward_weights_logged": with_opt(adam, vector_backward(True)),
    "vector_backward_weights_not_logged": with_opt(adam, vector_backward(False)),
    "autograd_backward_list_of_halves": with_opt(sgd, autograd_backward_list),
    # .grad edited at steps the check skips
    "per_parameter_clip_from_step_3": with_opt(sgd, per_parameter_clip_from(3)),
    "gradient_noise_at_last_step": with_opt(sgd, noise_at_last_step),
    "unlogged_backward_after_log_batch_at_step_2": with_opt(sgd, unlogged_backward_at((2,))),
    "unlogged_backward_after_log_batch_every_step": with_opt(sgd, unlogged_backward_at(tuple(range(6)))),
    "unlogged_backward_at_step_2_check_off": lambda: _run(mlp, sgd, unlogged_backward_at((2,)),
                                                          check_gradients=False),
    "gradient_factor_by_hand_every_step": with_opt(adam, grad_step(global_factor_by_hand)),
    "weight_decay_written_into_grad": with_opt(sgd, grad_step(decay_by_hand)),
    "weight_decay_as_sgd_weight_decay": with_opt(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9,
                                                                           weight_decay=0.01)),
    "gradient_average_written_into_grad": lambda: with_opt(plain_sgd, grad_step(momentum_by_hand()))(),
    "gradient_average_as_sgd_dampening": with_opt(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9,
                                                                            dampening=0.9)),
    "log_batch_before_the_forward": with_opt(sgd, logged_before_forward(1)),
    "log_batch_before_each_micro_batch_forward": with_opt(adam, logged_before_forward(2)),
    "adamw_head_grad_none_two_steps": with_opt(lambda m: torch.optim.AdamW(m.parameters(), lr=0.02,
                                                                           weight_decay=0.1), head_skipped),
    # loop structure
    "eval_mode_forgotten_after_validation": dropout_run(eval_forgotten),
    "batch_norm_eval_forgotten_after_validation": dropout_run(eval_forgotten, build=NormNet),
    "trained_in_eval_mode_throughout": dropout_run(plain, before=lambda m: m.eval()),
    "batch_logged_then_step_skipped": with_opt(sgd, logged_then_skipped),
    "negative_indices_logged": with_opt(sgd, negative_indices),
    "float32_weights_logged": with_opt(sgd, float32_weights),
    "unlearning_negative_weights": with_opt(sgd, unlearning),
    "two_steps_per_batch": with_opt(adam, two_steps_per_batch),
    "step_at_top_of_loop_lagged": lagged_loop,
    # optimizer options
    "sgd_group_params_reversed_mid_run": edited(sgd, reverse_group),
    "adam_group_params_reversed_mid_run": edited(adam, reverse_group),
    "load_state_dict_of_itself_mid_run": with_opt(sgd, after=lambda opt, model: reload_same(model)),
    "adam_amsgrad_switched_off_mid_run": edited(lambda m: torch.optim.Adam(m.parameters(), lr=0.02, amsgrad=True),
                                                amsgrad_off),
    "sgd_differentiable_from_start": with_opt(lambda m: torch.optim.SGD(m.parameters(), lr=0.1,
                                                                        differentiable=True)),
    # models the loop treats unusually
    "trainable_parameter_outside_optimizer": module_run(OutsideTemperature,
                                                        lambda m: torch.optim.SGD(m.net.parameters(), lr=0.1)),
    "running_mean_std_input_normaliser": module_run(RunningNormaliser),
    "running_mean_std_input_normaliser_captured": module_run(RunningNormaliser, capture_random=True),
    "manifold_mixup_in_forward": module_run(ManifoldMixup, capture_random=True),
    "frozen_teacher_inside_model_kd": teacher_run,
    "weight_used_twice_plain_and_exp": module_run(TwoTransforms, adam),
    # untuned rates, ReLU-heavy
    "deep_relu_adam_lr0.5_amsgrad_weight_decay": with_opt(
        lambda m: torch.optim.Adam(m.parameters(), lr=0.5, amsgrad=True, weight_decay=0.01), build=DeepRelu),
    "prelu_net_sgd_lr2_momentum": with_opt(lambda m: torch.optim.SGD(m.parameters(), lr=2.0, momentum=0.9),
                                           build=PReluNet),
}

#: Cases whose ReLU paths are measured with the default estimators (adaptive rule) instead of the 8-node rule.
DEFAULT_RULE = ("deep_relu_adam_lr0.5_amsgrad_weight_decay", "prelu_net_sgd_lr2_momentum")

#: Cases with dropout masks or draws in the forward, replayed by the reference (``replay_reference.ReplayReference``).
REPLAYED = ("dropout_accumulation_each_mean_halved", "dropout_loss_weight_small_ramp_from_step_2",
            "eval_mode_forgotten_after_validation", "manifold_mixup_in_forward")

#: Cases whose buffers the forward moves (``replay_reference.BufferReference``).
BUFFERS = ("batch_norm_eval_forgotten_after_validation", "running_mean_std_input_normaliser",
           "running_mean_std_input_normaliser_captured")


def figures(name: str, model: nn.Module, traj: Any) -> dict[str, Any]:
    """The figures of case ``name``: :func:`~_stranger_loops_kit.measure` against the slow loop reference (the
    replayed cases against ``ReplayReference``, those with moving buffers against ``BufferReference``)."""
    reference = BufferReference if name in BUFFERS else ReplayReference if name in REPLAYED else Reference
    return measure(model, traj, reference)
