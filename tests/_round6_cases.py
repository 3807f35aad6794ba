"""Loops and cases of the sixth round (tests/test_stranger_round6.py, tests/stranger_round6_table.py).

Every case trains as tests/_round5_kit.py does (float64, SGD 0.5 unless the case names another optimizer, 3 steps of
4 of 12 samples, 2 held-out inputs). :data:`CASES` maps each case's name to a function that trains it and returns
its figures (tests/_round5_kit.py :func:`figures`), or raises the error a user sees.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round5_kit import BATCH, DT, N_TRAIN, XI, XS, XV, YI, YS, YV, fit, seeded, sgd
from _round6_kit import figures
from _round6_models import (
    BinaryConnect,
    Capsules,
    ConvNeXtBlock,
    CumMax,
    EulerODE,
    FakeQuant,
    HyperNet,
    LogSumExpPool,
    MessagePassing,
    Mixer,
    PointNet,
    Siamese,
    SortPool,
    SqueezeExcite,
    Top1MoE,
    Top2MoE,
    WeightStandardised,
    celu_stack,
    floor_quantised,
    gumbel_hard,
    sign_features,
    softplus_threshold,
    where_branches,
)
from torch import nn

import explaind

#: Pairs of XV rows (n, 2, 4) and whether their labels agree: the Siamese model's data.
_PAIRS = torch.randint(0, 14, (14, 2), generator=torch.Generator().manual_seed(5))
XP, YP = XV[_PAIRS], (YV[_PAIRS[:, 0]] == YV[_PAIRS[:, 1]]).long()


def relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def dp_sgd_step(model, opt, X, y, idx, rec, batch_loss, clip: float = 0.5, sigma: float = 0.5) -> None:
    """DP-SGD by hand: each sample's gradient clipped to norm ``clip``, summed, Gaussian noise of scale
    ``sigma * clip`` added, divided by the batch size, written into ``.grad``."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for k in idx:
        g = torch.autograd.grad(batch_loss(model(X[k:k + 1]), y[k:k + 1]), params)
        factor = min(1.0, clip / float(torch.sqrt(sum((gi ** 2).sum() for gi in g))))
        for t, gi in zip(total, g):
            t.add_(gi, alpha=factor)
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()  # the recorder sees a backward; then .grad is overwritten
    for p, t in zip(params, total):
        p.grad = (t + sigma * clip * torch.randn_like(t)) / len(idx)
    rec.log_batch(idx)
    opt.step()


def centralised_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Gradient centralisation: each weight matrix's gradient minus its mean over the input dimension."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    for p in model.parameters():
        if p.ndim > 1:
            p.grad.sub_(p.grad.mean(1, keepdim=True))
    rec.log_batch(idx)
    opt.step()


def l1_penalty_step(model, opt, X, y, idx, rec, batch_loss, lam: float = 1e-2) -> None:
    """An L1 penalty on the weights added to the loss (sparsity)."""
    opt.zero_grad()
    reg = sum(p.abs().sum() for n, p in model.named_parameters() if n.endswith("weight"))
    (batch_loss(model(X[idx]), y[idx]) + lam * reg).backward()
    rec.log_batch(idx)
    opt.step()


#: Fixed per-sample importance weights of the training set (e.g. inverse propensities).
IMPORTANCE = torch.linspace(0.5, 2.0, N_TRAIN, dtype=DT)


def importance_step(model, opt, X, y, idx, rec, batch_loss, log_weights: bool = True, scale: Any = None) -> None:
    """A weighted mean of per-sample losses, ``sum(w l) / sum(w)``; the weights logged with the batch."""
    w = IMPORTANCE[idx] if scale is None else scale(idx)
    opt.zero_grad()
    ((w * F.cross_entropy(model(X[idx]), y[idx], reduction="none")).sum() / w.sum()).backward()
    rec.log_batch(idx, weights=w / w.sum()) if log_weights else rec.log_batch(idx)
    opt.step()


class Curriculum:
    """A curriculum that reweights samples per step: weight ``1 + step * difficulty`` (difficulty = the index's
    parity), so hard samples count more as training goes on."""

    def __init__(self):
        self.step = 0

    def __call__(self, model, opt, X, y, idx, rec, batch_loss) -> None:
        scale = lambda i: 1.0 + self.step * (i % 2).to(DT)  # noqa: E731 - the user's one-liner
        importance_step(model, opt, X, y, idx, rec, batch_loss, scale=scale)
        self.step += 1


def input_gradient_penalty_step(model, opt, X, y, idx, rec, batch_loss, lam: float = 0.1) -> None:
    """A WGAN-GP-style penalty: the squared norm of the loss's gradient with respect to the inputs
    (``create_graph=True``) added to the loss, a double backward."""
    opt.zero_grad()
    x = X[idx].clone().requires_grad_(True)
    loss = batch_loss(model(x), y[idx])
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + lam * (gx ** 2).sum()).backward()
    rec.log_batch(idx)
    opt.step()


def lookahead_after(k: int = 2, alpha: float = 0.5) -> Callable[[int, nn.Module], None]:
    """Lookahead by hand: slow weights kept aside; every ``k`` steps they move ``alpha`` toward the fast weights and
    the fast weights are reset to them."""
    slow: list[torch.Tensor] = []

    def after(s: int, model: nn.Module) -> None:
        params = list(model.parameters())
        if not slow:
            slow.extend(p.detach().clone() for p in params)  # (after step 0: close enough to the start for a user)
        if (s + 1) % k == 0:
            with torch.no_grad():
                for q, p in zip(slow, params):
                    q.add_(p - q, alpha=alpha)
                    p.copy_(q)
    return after


def manual_sgd_case() -> dict[str, Any]:
    """No optimizer: ``p -= lr * p.grad`` under ``no_grad``; the user passes ``None`` as the optimizer."""
    model = seeded(relu_mlp)
    rec = explaind.TrajectoryRecorder(model, None, loss="cross_entropy", train_data=(XV[:N_TRAIN], YV[:N_TRAIN]))
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(3):
            idx = torch.randperm(N_TRAIN, generator=gen)[:BATCH]
            model.zero_grad()
            F.cross_entropy(model(XV[idx]), YV[idx]).backward()
            rec.log_batch(idx)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
    return figures(model, rec.trajectory, XV[N_TRAIN:])


def annealed_temperature_case(check: bool = True) -> dict[str, Any]:
    """A loss callable dividing the logits by a temperature kept in its closure, doubled after every step."""
    state = {"T": 1.0}

    def loss(out, y):
        return F.cross_entropy(out / state["T"], y)

    def after(s, m):
        state["T"] *= 2.0

    model, traj = fit(relu_mlp, XV, YV, loss=loss, after=after, check_gradients=check)
    return figures(model, traj, XV[N_TRAIN:])


def mean_teacher_case(check: bool = True) -> dict[str, Any]:
    """Mean teacher: cross entropy plus the squared distance of the softmax to an EMA teacher's on the same batch,
    the teacher (a deep copy) moved halfway to the student after every step."""
    model = seeded(relu_mlp)
    teacher = copy.deepcopy(model).requires_grad_(False)
    held: dict[str, torch.Tensor] = {}

    def loss(out, y):
        return F.cross_entropy(out, y) + F.mse_loss(out.softmax(-1), held["probs"])

    def step(model, opt, X, y, idx, rec, batch_loss):
        opt.zero_grad()
        with torch.no_grad():
            held["probs"] = teacher(X[idx]).softmax(-1)
        loss(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()

    def after(s, m):
        with torch.no_grad():
            for pt, p in zip(teacher.parameters(), m.parameters()):
                pt.lerp_(p, 0.5)

    model, traj = fit(model, XV, YV, loss=loss, step=step, after=after, check_gradients=check)
    return figures(model, traj, XV[N_TRAIN:])


def batch_balanced(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class-balanced cross entropy with weights from the batch's own class counts (a weighted mean)."""
    w = (1.0 / torch.bincount(y, minlength=3).to(DT).clamp(min=1))[y]
    return (w * F.cross_entropy(out, y, reduction="none")).sum() / w.sum()


def model_case(build: Callable[[], nn.Module], X: Any, y: Any, panels: int = 2,
               **kw: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        model, traj = fit(build, X, y, **kw)
        return figures(model, traj, X[N_TRAIN:], panels=panels)
    return run


def loop_case(build: Callable[[], nn.Module] = relu_mlp, **kw: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        step = kw.get("step")
        extra = {**kw, "step": step() if isinstance(step, type) else step} if step is not None else kw
        model, traj = fit(build, XV, YV, **extra)
        return figures(model, traj, XV[N_TRAIN:])
    return run


def sgd2(model: nn.Module) -> torch.optim.Optimizer:
    """SGD at the untuned rate 2 (the gate's route switches along a step)."""
    return sgd(model, 2.0)


def adam(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr)


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # forwards with jumps
    "torch_sign_features": model_case(sign_features, XV, YV),
    "floor_quantised_activations": model_case(floor_quantised, XV, YV),
    "where_with_two_branches": model_case(where_branches, XV, YV),
    "softplus_threshold_switch": model_case(softplus_threshold, XV, YV),
    "gumbel_softmax_hard_captured": model_case(gumbel_hard, XV, YV, capture_random=True),
    "top1_moe_argmax_routing": model_case(Top1MoE, XV, YV),
    "top2_moe_topk_routing": model_case(Top2MoE, XV, YV),
    "top1_moe_argmax_route_switches": model_case(Top1MoE, XV, YV, opt=sgd2),
    "top2_moe_topk_route_switches": model_case(Top2MoE, XV, YV, opt=sgd2),
    "binaryconnect_sign_weights": model_case(BinaryConnect, XV, YV),
    "fake_quantize_qat": model_case(FakeQuant, XV, YV),
    # models from tutorials and papers
    "pointnet_max_over_points": model_case(PointNet, XS, YS),
    "gnn_index_add_sum": model_case(MessagePassing, XS, YS),
    "gnn_scatter_reduce_amax": model_case(lambda: MessagePassing("amax"), XS, YS),
    "mlp_mixer_block": model_case(Mixer, XS, YS, panels=16),
    "convnext_block": model_case(ConvNeXtBlock, XI, YI),
    "squeeze_excitation": model_case(SqueezeExcite, XI, YI),
    "weight_standardised_conv_groupnorm": model_case(WeightStandardised, XI, YI),
    "hypernetwork": model_case(HyperNet, XV, YV),
    "capsules_routing_by_agreement": model_case(Capsules, XV, YV),
    "neural_ode_euler": model_case(EulerODE, XV, YV),
    "siamese_pairs": model_case(Siamese, XP, YP),
    "celu_alpha": model_case(celu_stack, XV, YV),
    "cummax_sequence": model_case(CumMax, XS, YS),
    "sort_pooling": model_case(SortPool, XS, YS),
    "logsumexp_pooling": model_case(LogSumExpPool, XS, YS),
    # loops
    "lookahead_by_hand": loop_case(after=lookahead_after()),
    "dp_sgd_by_hand": loop_case(step=dp_sgd_step),
    "dp_sgd_by_hand_check_off": loop_case(step=dp_sgd_step, check_gradients=False),
    "gradient_centralisation": loop_case(step=centralised_step),
    "gradient_centralisation_check_off": loop_case(step=centralised_step, check_gradients=False),
    "l1_penalty_in_loss": loop_case(step=l1_penalty_step),
    "l1_penalty_in_loss_check_off": loop_case(step=l1_penalty_step, check_gradients=False),
    "input_gradient_penalty_check_off": loop_case(step=input_gradient_penalty_step, check_gradients=False),
    "importance_weighted_mean_logged": loop_case(step=importance_step),
    "importance_weighted_mean_not_logged": loop_case(
        step=lambda *a: importance_step(*a, log_weights=False)),
    "importance_weighted_mean_not_logged_check_off": loop_case(
        step=lambda *a: importance_step(*a, log_weights=False), check_gradients=False),
    "curriculum_reweighting": loop_case(step=Curriculum),
    "input_gradient_penalty_double_backward": loop_case(step=input_gradient_penalty_step),
    "manual_sgd_without_optimizer": manual_sgd_case,
    "sgd_lr_1e4_diverging": loop_case(opt=lambda m: sgd(m, 1e4)),
    "temperature_annealed_in_loss_closure": annealed_temperature_case,
    "temperature_annealed_in_loss_closure_check_off": lambda: annealed_temperature_case(False),
    "mean_teacher_ema_targets": mean_teacher_case,
    "mean_teacher_ema_targets_check_off": lambda: mean_teacher_case(False),
    "batch_class_balanced_loss": loop_case(loss=batch_balanced),
    "batch_class_balanced_loss_check_off": loop_case(loss=batch_balanced, check_gradients=False),
    "adam_lr_1_relu_loss_spikes": loop_case(opt=adam(1.0), steps=3),
}
