"""Cases of the tenth loops round (tests/test_stranger_loops_round10.py, tests/stranger_loops_round10_table.py):
per-sample clipping and noise, gradient surgery, teachers, samplers and loaders, padding, curricula, hand-edited
optimizer options, schedulers written by users, SWA recipes and dtype habits.

Every case builds on tests/_stranger_loops_kit.py (float64, 6 steps of 6 of 24 samples, a small tanh MLP unless
the case names another model) and is measured by its :func:`~_stranger_loops_kit.measure` (replica against the
trained model in evaluation mode, residual share, ``keep=("train",)`` scores against the slow float64 loop
reference and that reference's own per-step residual); the ReLU cases (:data:`DEFAULT_RULE`) with the default
estimators. A case is a function returning ``(model, trajectory)``; one that the library refuses raises.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _loops8_kit import ReluCNN
from _loops9_kit import DeepRelu, grad_step, two_groups, with_opt
from _loops10_data import bucketed_padding, curriculum_swap, loader_run, weighted_sampler
from _stranger_loops_kit import DT, STEPS, adam, batches, data, measure, mlp, plain, sgd, train
from reference import Reference
from replay_reference import BufferReference
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR, AveragedModel

import explaind

Case = Callable[[], tuple[nn.Module, Any]]

CLIP, SIGMA = 0.5, 0.5


# ---------------------------------------------------------------------------------------------- DP-SGD by hand


def clip_factors(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each sample's clip factor ``min(1, CLIP / |grad l_k|)``, the per-sample gradients from ``torch.func``."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x, t):
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in per_sample.values()))
    return torch.clamp(CLIP / norms, max=1.0)


def dp_step(weighted: bool, logged: bool, noise: bool) -> Callable:
    """DP-SGD by hand over a batch: clip factors from ``torch.func`` (:func:`clip_factors`); ``weighted``: the loss
    ``sum_k f_k l_k / B`` is backwarded (the clipped mean gradient), else the plain mean; ``logged``: those weights
    ``f_k / B`` go to ``log_batch``; ``noise``: Gaussian noise ``SIGMA * CLIP / B`` added to every ``.grad``."""
    def step(s, model, opt, X, y, idx, rec):
        w = clip_factors(model, X[idx], y[idx]) / len(idx)
        opt.zero_grad()
        losses = F.cross_entropy(model(X[idx]), y[idx], reduction="none")
        (losses * w).sum().backward() if weighted else losses.mean().backward()
        if noise:
            for p in model.parameters():
                p.grad.add_(torch.randn_like(p), alpha=SIGMA * CLIP / len(idx))
        rec.log_batch(idx, w if logged else None)
        opt.step()
    return step


def dp_clip_sum(s, model, opt, X, y, idx, rec) -> None:
    """DP-SGD's clipping written the usual way: the per-sample gradients clipped and summed into ``.grad`` by hand
    (``p.grad = sum_k f_k g_k / B``) after a plain ``backward()``, the batch logged without weights."""
    params = dict(model.named_parameters())
    w = clip_factors(model, X[idx], y[idx]) / len(idx)
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()

    def loss(p, x, t):
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))({n: p.detach() for n, p in params.items()}, X[idx], y[idx])
    for n, p in params.items():
        p.grad = torch.einsum("k,k...->...", w, per_sample[n])
    rec.log_batch(idx)
    opt.step()


# ---------------------------------------------------------------------------------------------- gradients by hand


def pcgrad_step(s, model, opt, X, y, idx, rec) -> None:
    """PCGrad between two tasks (the batch's halves): each task gradient loses its component along the other when
    they conflict, the sum written into ``.grad``."""
    params = list(model.parameters())
    g1 = torch.autograd.grad(F.cross_entropy(model(X[idx[:3]]), y[idx[:3]]), params)
    g2 = torch.autograd.grad(F.cross_entropy(model(X[idx[3:]]), y[idx[3:]]), params)
    f1, f2 = torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g2])
    dot = torch.dot(f1, f2)
    if dot < 0:
        f1, f2 = f1 - dot / f2.dot(f2) * f2, f2 - dot / f1.dot(f1) * f1
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    total, start = (f1 + f2) / 2, 0
    for p in params:
        p.grad = total[start:start + p.numel()].view_as(p).clone()
        start += p.numel()
    rec.log_batch(idx)
    opt.step()


def head_grad_none(model: nn.Module, s: int) -> None:
    """``p.grad = None`` for the head at steps 2 and 3 (the head skipped: SGD leaves it and its momentum as they
    are)."""
    if s in (2, 3):
        for p in model[2].parameters():
            p.grad = None


def head_grad_from_autograd(s, model, opt, X, y, idx, rec) -> None:
    """``backward()`` for the whole model, then the head's ``.grad`` assigned from ``torch.autograd.grad`` of the same
    loss (``p.grad = g`` for some parameters only; the values are the same)."""
    opt.zero_grad()
    loss = F.cross_entropy(model(X[idx]), y[idx])
    head = list(model[2].parameters())
    grads = torch.autograd.grad(loss, head, retain_graph=True)
    loss.backward()
    for p, g in zip(head, grads):
        p.grad = g
    rec.log_batch(idx)
    opt.step()


def func_grad_assigned(s, model, opt, X, y, idx, rec) -> None:
    """The step's gradient from ``torch.func.grad`` over ``functional_call``, assigned to ``.grad`` with no
    ``backward()`` at all."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = grad(lambda p: F.cross_entropy(functional_call(model, p, (X[idx],)), y[idx]))(params)
    opt.zero_grad()
    for n, p in model.named_parameters():
        p.grad = grads[n]
    rec.log_batch(idx)
    opt.step()


def gradnorm_weights() -> tuple[nn.Module, Any]:
    """Two task losses (cross entropy and a penalty on the outputs' squares, per sample) weighted by task weights
    that the loop edits after every step (GradNorm-style), given as the loss callable reading them from its closure."""
    weights = {"ce": 1.0, "square": 0.5}

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return weights["ce"] * F.cross_entropy(out, target) + weights["square"] * (out ** 2).mean(1).mean()

    def edit() -> None:
        weights["ce"], weights["square"] = weights["ce"] * 0.8, weights["square"] * 1.3

    _, y, _ = data()
    return loss_loop(loss, loss, y, y, edit)


def loss_loop(recorded: Any, trained: Callable, train_targets: torch.Tensor, loop_targets: torch.Tensor,
              after: Callable[[], None] | None = None) -> tuple[nn.Module, Any]:
    """SGD momentum over the usual batches, the loop backwarding ``trained(model(x), loop_targets[idx])``, recorded
    with ``loss=recorded`` and ``train_data=(X, train_targets)``; ``after()`` runs after every step."""
    X, _, _ = data()
    model = mlp()
    opt = sgd(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss=recorded, train_data=(X, train_targets))
    with rec:
        for idx in batches():
            opt.zero_grad()
            trained(model(X[idx]), loop_targets[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            if after is not None:
                after()
    return model, rec.trajectory


# ---------------------------------------------------------------------------------------------- teachers


def teacher_logits() -> torch.Tensor:
    """A fixed teacher's logits on the training inputs (another MLP, seeded apart)."""
    X, _, _ = data()
    torch.manual_seed(42)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    with torch.no_grad():
        return teacher(X)


def distill_loss(out: torch.Tensor, target: torch.Tensor, tau: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Hinton's distillation: ``alpha`` cross entropy on the label (``target[:, 0]``) plus ``1 - alpha`` times
    ``tau^2`` KL from the teacher's tempered logits (``target[:, 1:]``), a mean over the batch."""
    hard = F.cross_entropy(out, target[:, 0].long())
    soft = F.kl_div(F.log_softmax(out / tau, -1), F.log_softmax(target[:, 1:] / tau, -1), log_target=True,
                    reduction="batchmean")
    return alpha * hard + (1 - alpha) * tau ** 2 * soft


def distillation(in_targets: bool) -> tuple[nn.Module, Any]:
    """A student distilled from a fixed teacher (:func:`distill_loss`): the teacher's logits stored next to the
    labels as targets and the loss given as ``loss=distill_loss`` (``in_targets``), or the teacher's logits computed
    in the loop and the run recorded with ``loss="cross_entropy"``."""
    _, y, _ = data()
    targets = torch.cat([y[:, None].to(DT), teacher_logits()], 1)
    return loss_loop(distill_loss if in_targets else "cross_entropy", distill_loss, targets if in_targets else y,
                     targets)


class WithTeacher(nn.Module):
    """A student MLP and an EMA teacher copy kept as a submodule (``requires_grad=False``); ``forward`` is the
    student's."""

    def __init__(self) -> None:
        super().__init__()
        self.student = mlp()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def ema_teacher_outside() -> tuple[nn.Module, Any]:
    """The same mean teacher kept outside the recorded model (its own copy, updated by hand after every step): the
    fix the refusal of :func:`ema_teacher_submodule` names."""
    model = mlp()
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = sgd(model)

    def after(s):
        with torch.no_grad():
            for t, p in zip(teacher.parameters(), model.parameters()):
                t.mul_(0.9).add_(p, alpha=0.1)

    return model, train(model, opt, after=after)


def ema_teacher_submodule() -> tuple[nn.Module, Any]:
    """A mean teacher (BYOL/DINO style) held inside the recorded model and updated by hand after every step,
    ``t = 0.9 t + 0.1 s`` under ``no_grad``; the loop's loss is the student's cross entropy."""
    model = WithTeacher()
    opt = torch.optim.SGD(model.student.parameters(), lr=0.1, momentum=0.9)

    def after(s):
        with torch.no_grad():
            for t, p in zip(model.teacher.parameters(), model.student.parameters()):
                t.mul_(0.9).add_(p, alpha=0.1)

    return model, train(model, opt, after=after)


# ---------------------------------------------------------------------------------------------- options by hand


def per_group_lr_every_step(opt: Any, model: nn.Module, s: int) -> None:
    """``param_groups[i]["lr"]`` of each group set by hand after every step (the weights decay, the biases grow)."""
    opt.param_groups[0]["lr"] *= 0.7
    opt.param_groups[1]["lr"] = 0.01 * (s + 2)


def weight_decay_ramp(opt: Any, model: nn.Module, s: int) -> None:
    """AdamW's ``weight_decay`` ramped by hand after every step (a weight-decay schedule)."""
    opt.param_groups[0]["weight_decay"] = 0.05 * (s + 1)


def betas_edit(opt: Any, model: nn.Module, s: int) -> None:
    """``betas`` set by hand after step 1 and again after step 3."""
    if s in (1, 3):
        opt.param_groups[0]["betas"] = (0.5, 0.9) if s == 1 else (0.95, 0.999)


def group_edit(edit: Callable[[Any, nn.Module, int], None], make_opt: Callable[[nn.Module], Any]) -> Case:
    return with_opt(make_opt, after=lambda opt, model: (lambda s: edit(opt, model, s)))


# ---------------------------------------------------------------------------------------------- schedulers


class WarmupInverseSqrt(lr_scheduler.LRScheduler):
    """A user's ``LRScheduler`` subclass: linear warm-up over ``warmup`` steps, then ``1/sqrt(step)`` decay
    (``get_lr`` only)."""

    def __init__(self, optimizer: Any, warmup: int = 2, last_epoch: int = -1) -> None:
        self.warmup = warmup
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch + 1
        factor = min(step / self.warmup, (self.warmup / step) ** 0.5)
        return [base * factor for base in self.base_lrs]


class MomentumAndLr(lr_scheduler.LRScheduler):
    """A user's ``LRScheduler`` subclass that also writes each group's ``momentum`` in ``get_lr`` (halving the lr and
    moving the momentum from 0.5 to 0.9)."""

    def get_lr(self) -> list[float]:
        for group in self.optimizer.param_groups:
            group["momentum"] = min(0.5 + 0.1 * self.last_epoch, 0.9)
        return [base * 0.5 ** self.last_epoch for base in self.base_lrs]


def scheduled_by(make_opt: Callable[[nn.Module], Any], make: Callable[[Any], Any]) -> Case:
    def after(opt, model):
        sched = make(opt)
        return lambda s: sched.step()
    return with_opt(make_opt, after=after)


def swa_recipe() -> tuple[nn.Module, Any]:
    """The torch SWA recipe: ``CosineAnnealingLR`` for 3 steps, then ``SWALR(anneal_strategy="linear")`` and an
    ``AveragedModel`` updated after every step (Adam)."""
    model = mlp()
    opt = adam(model)
    cosine = lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    swa_sched = SWALR(opt, swa_lr=0.005, anneal_epochs=2, anneal_strategy="linear")
    swa = AveragedModel(model)

    def after(s):
        if s < 3:
            cosine.step()
        else:
            swa.update_parameters(model)
            swa_sched.step()

    return model, train(model, opt, after=after)


def bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def update_bn_after() -> tuple[nn.Module, Any]:
    """A batch-norm MLP trained with SGD momentum, then ``torch.optim.swa_utils.update_bn`` run over the training
    data on the trained model itself after ``with rec:`` (its running statistics recomputed)."""
    X, y, _ = data()
    model = bn_mlp()
    traj = train(model, sgd(model))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=8)
    torch.optim.swa_utils.update_bn(loader, model)
    return model, traj


def update_bn_loaded_back() -> tuple[nn.Module, Any]:
    """:func:`update_bn_after`, then the recorded last values loaded back into the model (the fix its warning
    names): ``model.load_state_dict({**model.state_dict(), **traj.params(n), **traj.buffers(n)})``."""
    model, traj = update_bn_after()
    model.load_state_dict({**model.state_dict(), **traj.params(traj.n_steps), **traj.buffers(traj.n_steps)})
    return model, traj


# ---------------------------------------------------------------------------------------------- dtype habits


def default_dtype_after_build() -> tuple[nn.Module, Any]:
    """``torch.set_default_dtype(torch.float64)`` called after a float64 model is built and before recording
    (the data made after it, in float64); the default is set back afterwards."""
    old = torch.get_default_dtype()
    model = mlp()
    try:
        torch.set_default_dtype(torch.float64)
        traj = train(model, sgd(model))
    finally:
        torch.set_default_dtype(old)
    return model, traj


def float32_model_default_float64() -> tuple[nn.Module, Any]:
    """A float32 model and float32 data, ``torch.set_default_dtype(torch.float64)`` set after the model is built
    (the recorder runs while the default is float64); the default is set back afterwards."""
    X, y, _ = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = sgd(model)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X.float(), y))
        with rec:
            for s, idx in enumerate(batches()):
                plain(s, model, opt, X.float(), y, idx, rec)
    finally:
        torch.set_default_dtype(old)
    return model, rec.trajectory


CASES: dict[str, Case] = {
    # DP-SGD, gradient surgery, gradients by hand
    "dp_sgd_clip_factors_as_log_batch_weights": with_opt(sgd, dp_step(weighted=True, logged=True, noise=False)),
    "dp_sgd_clip_weighted_loss_weights_not_logged": with_opt(sgd, dp_step(weighted=True, logged=False, noise=False)),
    "dp_sgd_clipped_sum_written_into_grad": with_opt(sgd, dp_clip_sum),
    "dp_sgd_clip_weights_logged_plus_noise": with_opt(sgd, dp_step(weighted=True, logged=True, noise=True)),
    "pcgrad_two_task_projection": with_opt(sgd, pcgrad_step),
    "gradnorm_task_weights_edited_every_step": gradnorm_weights,
    "head_grad_set_to_none_at_two_steps": with_opt(sgd, grad_step(head_grad_none)),
    "head_grad_assigned_from_autograd_grad": with_opt(sgd, head_grad_from_autograd),
    "torch_func_grad_assigned_no_backward": with_opt(sgd, func_grad_assigned),
    # teachers
    "distillation_teacher_logits_in_targets": lambda: distillation(True),
    "distillation_teacher_in_loop_cross_entropy": lambda: distillation(False),
    "ema_teacher_submodule_updated_by_hand": ema_teacher_submodule,
    "ema_teacher_kept_outside_the_model": ema_teacher_outside,
    # samplers, loaders, padding, curricula
    "weighted_random_sampler_with_replacement": lambda: loader_run(weighted_sampler()),
    "loader_two_workers_shuffled": lambda: loader_run({"shuffle": True, "num_workers": 2}),
    "augmentation_in_getitem_no_workers": lambda: loader_run({"shuffle": True}, noise=0.1),
    "augmentation_in_getitem_two_workers": lambda: loader_run({"shuffle": True, "num_workers": 2}, noise=0.1),
    "augmentation_in_getitem_two_workers_store_data_false": lambda: loader_run(
        {"shuffle": True, "num_workers": 2}, noise=0.1, store_data=False),
    "augmentation_drawn_once_before_recording": lambda: loader_run({"shuffle": True}, drawn_once=True),
    "collate_pads_per_batch_masked_mean": lambda: bucketed_padding(True),
    "collate_pads_per_batch_unmasked_mean": lambda: bucketed_padding(False),
    "curriculum_dataset_swapped_mid_run": lambda: curriculum_swap(False),
    "curriculum_both_datasets_offset_indices": lambda: curriculum_swap(True),
    # optimizer options by hand
    "rmsprop_each_groups_lr_set_every_step": group_edit(per_group_lr_every_step, two_groups(
        torch.optim.RMSprop, {}, {"lr": 0.02}, lr=0.01, momentum=0.5)),
    "adamw_weight_decay_ramped_every_step": group_edit(
        weight_decay_ramp, lambda m: torch.optim.AdamW(m.parameters(), lr=0.02)),
    "nadam_betas_set_by_hand_twice": group_edit(betas_edit, lambda m: torch.optim.NAdam(m.parameters(), lr=0.02)),
    # schedulers
    "user_lrscheduler_subclass_warmup_inverse_sqrt": scheduled_by(adam, WarmupInverseSqrt),
    "user_lrscheduler_subclass_writing_momentum": scheduled_by(sgd, MomentumAndLr),
    "swa_recipe_cosine_then_swalr_linear": swa_recipe,
    "update_bn_on_the_trained_model_after_recording": update_bn_after,
    "update_bn_then_recorded_values_loaded_back": update_bn_loaded_back,
    # dtype habits
    "set_default_dtype_float64_after_build": default_dtype_after_build,
    "float32_model_under_default_float64": float32_model_default_float64,
    # untuned learning rates, ReLU-heavy models
    "deep_relu_adamw_lr1_weight_decay": with_opt(lambda m: torch.optim.AdamW(m.parameters(), lr=1.0,
                                                                             weight_decay=0.1), build=DeepRelu),
    "relu_cnn_sgd_nesterov_lr1": with_opt(lambda m: torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9,
                                                                    nesterov=True), build=ReluCNN),
    "deep_relu_rmsprop_lr0.1_centered": with_opt(lambda m: torch.optim.RMSprop(m.parameters(), lr=0.1,
                                                                               centered=True), build=DeepRelu),
}

#: Cases whose ReLU paths are measured with the default estimators (adaptive rule) instead of the 8-node rule.
DEFAULT_RULE = ("deep_relu_adamw_lr1_weight_decay", "relu_cnn_sgd_nesterov_lr1", "deep_relu_rmsprop_lr0.1_centered")


#: Cases whose batch-norm statistics the reference replays (``replay_reference.BufferReference``).
BATCH_NORM = ("update_bn_on_the_trained_model_after_recording", "update_bn_then_recorded_values_loaded_back")


def figures(name: str, model: nn.Module, traj: Any) -> dict[str, Any]:
    """The figures of case ``name``: :func:`~_stranger_loops_kit.measure` against the slow loop reference (the
    batch-norm cases against ``BufferReference``, which replays the batch statistics and the recorded buffers)."""
    return measure(model, traj, BufferReference if name in BATCH_NORM else Reference)
