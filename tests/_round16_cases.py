"""Cases of the sixteenth round (tests/test_stranger_round16.py, tests/test_stranger_round16_more.py,
tests/stranger_round16_table.py): metric-learning heads, peft's LoRA, losses from papers, Hugging Face's warm-up
schedule, optimizer options, loops that edit gradients, parameters, the optimizer's state or the loss weight.

Every case builds on tests/_stranger_loops_kit.py (float64 unless the name says float32, 6 steps of 6 of 24
samples; models, losses and steps in tests/_round16_models.py) and is measured by :func:`figures` (replica against
the trained model in evaluation mode, residual share, ``keep=("train",)`` scores against the slow float64 loop
reference and that reference's own per-step residual); the ReLU cases (:data:`DEFAULT_RULE`) with the default
estimators. A case is a function returning ``(model, trajectory)``; one that the library refuses raises. The
default gradient check (``"auto"``) runs at steps 0, 1 and 4 of these 6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _loops8_kit import grad_step as grad_edit_step
from _round14_cases import loss_step, record, run
from _round16_models import (
    CenterLossNet,
    CosFaceNet,
    adaptive_clip,
    center_groups,
    center_loss,
    centralize_gradients,
    centred_mlp,
    cosface_loss,
    cosine_with_warmup,
    fgsm_step,
    lora_mlp,
    lora_parameters,
    poly1_loss,
    shrink_through_vector,
    soft_bootstrap_loss,
)
from _stranger_loops_kit import DT, adam, batches, data, measure, mlp, sgd
from reference import Reference
from replay_reference import ReplayReference
from torch import nn

import explaind

Case = Callable[[], tuple[nn.Module, Any]]


def center_loss_run(act: type[nn.Module] = nn.Tanh, lr: float = 0.1) -> Case:
    """:class:`~_round16_models.CenterLossNet` under SGD momentum with the centers' own rate (one optimizer)."""
    def case():
        model = CenterLossNet(act)
        groups = center_groups(model)
        groups[1]["lr"] = 5 * lr
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
        return model, record(model, opt, loss_step(center_loss), loss=center_loss)
    return case


def per_batch_warmup() -> tuple[nn.Module, Any]:
    """AdamW under Hugging Face's cosine schedule with 2 warm-up steps, stepped after every batch."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    sched = cosine_with_warmup(opt, 2, 6)
    return model, record(model, opt, after=lambda s: sched.step())


def clip_l1(s, model, opt, X, y, idx, rec) -> None:
    """The textbook step with ``clip_grad_norm_(..., norm_type=1.0, foreach=True)`` before the step."""
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.5, norm_type=1.0, foreach=True)
    rec.log_batch(idx)
    opt.step()


# ------------------------------------------------------------------ the loss weight and the optimizer's state


def wide_mlp(dtype: torch.dtype = DT) -> nn.Sequential:
    """A tanh MLP whose middle weight has 48 x 48 = 2,304 entries (the state watch samples every third)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 3)).to(dtype)


def loss_weight_at(step: int, weight: float, dtype: torch.dtype = DT, class_weight: bool = False, **rec_kw) -> Case:
    """The loss times ``weight`` at ``step`` only (``class_weight``: class 1's weight in ``F.cross_entropy(...,
    weight=...)`` set to ``weight`` there), recorded with ``loss="cross_entropy"``, in ``dtype``."""
    def case():
        X, y, _ = data()
        model = mlp().to(dtype)
        opt = sgd(model)
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X.to(dtype), y), **rec_kw)
        with rec:
            for s, idx in enumerate(batches()):
                opt.zero_grad()
                out = model(X[idx].to(dtype))
                if class_weight:
                    cw = torch.tensor([1.0, weight if s == step else 1.0, 1.0], dtype=dtype)
                    loss = F.cross_entropy(out, y[idx], weight=cw)
                else:
                    loss = F.cross_entropy(out, y[idx]) * (weight if s == step else 1.0)
                loss.backward()
                rec.log_batch(idx)
                opt.step()
        return model, rec.trajectory
    return case


class ScaledCrossEntropy:
    """A loss callable holding its weight as an attribute, ``scale * F.cross_entropy(out, y)``."""

    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.scale * F.cross_entropy(out, y)


def callable_scale_at(step: int, weight: float, dtype: torch.dtype = DT) -> Case:
    """The loss callable's ``scale`` set to ``weight`` for ``step`` only, the loop and the recorder sharing it."""
    def case():
        loss = ScaledCrossEntropy()
        model = mlp().to(dtype)

        def before(s):
            loss.scale = weight if s == step else 1.0

        def step_fn(s, model, opt, X, y, idx, rec):
            before(s)
            opt.zero_grad()
            loss(model(X[idx].to(dtype)), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
        X, y, _ = data()
        rec = explaind.TrajectoryRecorder(model, sgd(model), loss=loss, train_data=(X.to(dtype), y))
        with rec:
            for s, idx in enumerate(batches()):
                step_fn(s, model, rec.optimizer, X, y, idx, rec)
        return model, rec.trajectory
    return case


def exp_avg_edited_after(step: int, edit: str) -> Case:
    """Adam on :func:`wide_mlp`; after ``step`` two unsampled entries (1 and 2) of the middle weight's ``exp_avg``
    edited through ``.data``: ``"flip"`` both signs, ``"swap"`` the two exchanged (their 64-bit words' changes
    cancel in the watch's wrapping sum)."""
    def case():
        model = wide_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)

        def after(s):
            if s == step:
                flat = opt.state[model[2].weight]["exp_avg"].data.view(-1)
                if edit == "flip":
                    flat[1], flat[2] = -flat[1], -flat[2]
                else:
                    flat[1], flat[2] = flat[2].clone(), flat[1].clone()
        return model, record(model, opt, after=after)
    return case


CASES: dict[str, Case] = {
    # heads and losses from papers
    "cosface_head_sgd_momentum": run(build=CosFaceNet, step=loss_step(cosface_loss), loss=cosface_loss),
    "center_loss_centers_own_rate_one_sgd": center_loss_run(),
    "peft_lora_dropout_scaling_adamw": lambda: (lambda m: (m, record(
        m, torch.optim.AdamW(lora_parameters(m), lr=0.05), capture_random=True)))(lora_mlp()),
    "poly1_loss_adam": run(make_opt=adam, step=loss_step(poly1_loss), loss=poly1_loss),
    "soft_bootstrap_loss_sgd": run(step=loss_step(soft_bootstrap_loss), loss=soft_bootstrap_loss),
    # schedules, clipping and optimizer options
    "hf_cosine_schedule_with_warmup_adamw_per_batch": per_batch_warmup,
    "clip_grad_norm_l1_foreach_adam": run(make_opt=adam, step=clip_l1),
    "rmsprop_centered_momentum_maximize_foreach": run(make_opt=lambda m: torch.optim.RMSprop(
        m.parameters(), lr=0.01, centered=True, momentum=0.9, maximize=True, foreach=True)),
    "adagrad_lr_decay_maximize_foreach": run(make_opt=lambda m: torch.optim.Adagrad(
        m.parameters(), lr=0.1, lr_decay=0.05, maximize=True, foreach=True)),
    "nadam_decoupled_weight_decay_maximize": run(make_opt=lambda m: torch.optim.NAdam(
        m.parameters(), lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    # the loss weight at a step the check skips
    "loss_weight_1.001_at_step_2_float32": loss_weight_at(2, 1.001, torch.float32),
    "loss_weight_1.001_at_step_2": loss_weight_at(2, 1.001),
    "class_weight_1.5_at_step_2_float32": loss_weight_at(2, 1.5, torch.float32, class_weight=True),
    "loss_callable_scale_attribute_at_step_2": callable_scale_at(2, 1.001),
    "loss_callable_scale_attribute_at_step_2_float32": callable_scale_at(2, 1.001, torch.float32),
    # the optimizer's state edited where the watch's sum cancels
    "adam_exp_avg_two_signs_flipped_before_a_checked_step": exp_avg_edited_after(3, "flip"),
    "adam_exp_avg_two_entries_swapped_before_a_checked_step": exp_avg_edited_after(3, "swap"),
    "adam_exp_avg_two_signs_flipped_between_unchecked_steps": exp_avg_edited_after(2, "flip"),
    # loops that edit gradients, parameters or inputs
    "gradient_centralization": run(step=grad_edit_step(centralize_gradients)),
    "gradient_centralization_as_a_parametrization_sgd": run(build=centred_mlp),
    "nfnets_adaptive_gradient_clipping": run(make_opt=adam, step=grad_edit_step(adaptive_clip)),
    "vector_to_parameters_shrink_after_step_2": lambda: (lambda m: (m, record(
        m, sgd(m), after=lambda s: shrink_through_vector(m) if s == 2 else None)))(mlp()),
    "fgsm_adversarial_training_in_the_loop": run(step=fgsm_step()),
    # ReLU at untuned rates (default estimators)
    "center_loss_relu_sgd_lr3_momentum": center_loss_run(nn.ReLU, 3.0),
    "cosface_relu_adam_lr0.5": run(build=lambda: CosFaceNet(nn.ReLU), make_opt=lambda m: torch.optim.Adam(
        m.parameters(), lr=0.5), step=loss_step(cosface_loss), loss=cosface_loss),
}

#: Cases measured with the default estimators (ReLU at untuned rates).
DEFAULT_RULE = ("center_loss_relu_sgd_lr3_momentum", "cosface_relu_adam_lr0.5")

#: Cases whose training forward draws: against the reference that replays the recorded draws.
REPLAYED = ("peft_lora_dropout_scaling_adamw",)


def figures(name: str, model: nn.Module, traj: Any) -> dict[str, Any]:
    """The figures of case ``name``: :func:`~_stranger_loops_kit.measure` against the slow loop reference (the
    replayed cases against ``ReplayReference``); the float32 cases on float32 test inputs."""
    X_test = data()[2].to(next(model.parameters()).dtype)
    return measure(model, traj, ReplayReference if name in REPLAYED else Reference, X_test=X_test)
