"""Loops and cases of the fifth round (tests/test_stranger_round5.py, tests/stranger_round5_table.py).

:data:`CASES` maps each case's name to a function that trains it (tests/_round5_kit.py :func:`fit`) and returns its
figures (:func:`figures`), or raises the error a user sees.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round5_kit import (
    DT,
    N_TRAIN,
    QUAD,
    XI,
    XS,
    XT,
    XV,
    YI,
    YS,
    YT,
    YV,
    KinkReference,
    figures,
    fit,
    head,
    plain_step,
    seeded,
)
from _round5_models import (
    REG,
    XU,
    AdaptiveSoftmax,
    AuxRouter,
    CellLoop,
    ChannelDropout,
    ComplexAsReal,
    ComplexFilter,
    CosineClassifier,
    FrameConv,
    MixedDtype,
    PaddedAttention,
    PaddedConvs,
    Prototypes,
    RenormalisedHead,
    Reparameterised,
    RReLUNet,
    SpatialTransformer,
    StatefulGRU,
    TiedAutoencoder,
    TwoHeads,
    Uint8Images,
    Uncertainty,
    UncertaintyInOutputs,
    Views,
    cosine_pairs,
    ctc,
    distillation,
    focal,
    gaussian_nll,
    hooked_output,
    huber,
    info_nce,
    loss_data,
    mc_dropout,
    multi_margin,
    multi_task_loss,
    multilabel_soft_margin,
    norms,
    poisson_nll,
    pos_weighted_bce,
    triplet,
    uncertainty_in_outputs,
    uncertainty_loss,
)
from replay_reference import ReplayReference
from torch import Tensor, nn

import explaind
from explaind.exceptions import ExplaindWarning


def noisy_inputs_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Gaussian-noise augmentation of the batch inside the loop."""
    opt.zero_grad()
    batch_loss(model(X[idx] + 0.1 * torch.randn_like(X[idx])), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def reseeded_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """``torch.manual_seed(0)`` at the top of every step (the same dropout masks at every step)."""
    torch.manual_seed(0)
    plain_step(model, opt, X, y, idx, rec, batch_loss)


def late_zero_grad_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """``zero_grad()`` between ``backward()`` and ``step()``: the optimizer steps on zero gradients."""
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.zero_grad(set_to_none=False)
    opt.step()


def halved_grads_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Every gradient halved by hand after ``log_batch`` (a global factor, as a fixed loss scale)."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    for p in model.parameters():
        p.grad.mul_(0.5)
    opt.step()


def mask_logged_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The batch logged as a boolean mask over the training set instead of its indices."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[idx] = True
    rec.log_batch(mask)
    opt.step()


def twice_stepped(model, opt, X, y, idx, rec, batch_loss) -> None:
    """``optimizer.step()`` called twice on one logged batch (a copy-paste slip)."""
    plain_step(model, opt, X, y, idx, rec, batch_loss)
    opt.step()


def twice_logged(model, opt, X, y, idx, rec, batch_loss) -> None:
    """``rec.log_batch(idx)`` called twice for one batch (once in the loop, once in a helper)."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    rec.log_batch(idx)
    opt.step()


def float32_loss_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """A float64 model whose loss the loop computes on ``out.float()`` (a habit from float32 code)."""
    opt.zero_grad()
    batch_loss(model(X[idx]).float(), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def aux_loss_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The loop adds the model's auxiliary (load-balancing) loss, the second output, with weight 0.1."""
    opt.zero_grad()
    out, aux = model(X[idx])
    (F.cross_entropy(out, y[idx]) + 0.1 * aux).backward()
    rec.log_batch(idx)
    opt.step()


def relabel(s: int, model: nn.Module, y: Tensor) -> None:
    """Self-training: after step 0, the training labels are overwritten in place with the model's predictions."""
    if s == 0:
        with torch.no_grad():
            y[:N_TRAIN] = model(XV[:N_TRAIN]).argmax(-1)


def multi_task_tuple_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Cross entropy on the first head plus the squared error of the second against REG."""
    opt.zero_grad()
    a, b = model(X[idx])
    (F.cross_entropy(a, y[idx]) + F.mse_loss(b, REG[idx])).backward()
    rec.log_batch(idx)
    opt.step()


def sam_step(model, opt, X, y, idx, rec, batch_loss, rho: float = 0.05) -> None:
    """Sharpness-aware minimisation: ascend to ``theta + rho g / |g|``, take the gradient there, come back, step."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    eps = [rho * p.grad / norm for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    rec.log_batch(idx)
    opt.step()


def reset_head(s: int, model: nn.Module) -> None:
    """``reset_parameters()`` of the head after step 1 (re-initialising a layer mid-run)."""
    if s == 1:
        model.b.reset_parameters()


def ema_copy_run() -> tuple[nn.Module, nn.Module, Any]:
    """A hand-written EMA of the weights (a deep copy updated with ``lerp_`` after every step):
    ``(model, ema, trajectory)``."""
    model = seeded(head)
    ema = copy.deepcopy(model)

    def after(s, m):
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), m.parameters()):
                pe.lerp_(p, 0.5)

    _, traj = fit(model, XV, YV, after=after)
    return model, ema, traj


def tensor_lr_adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01, dtype=DT))


def no_decay_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with biases and norm weights in a group without weight decay (the common recipe)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=0.05)


def model_case(build: Callable[[], nn.Module], X: Any, y: Tensor, reference: type = ReplayReference,
               **recorder: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        model, traj = fit(build, X, y, **recorder)
        return figures(model, traj, X[N_TRAIN:], reference=reference)
    return run


def loss_case(kind: str, loss: Callable, build: Callable[[], nn.Module] = head,
              **recorder: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        X, y = loss_data(kind)
        model, traj = fit(build, X, y, loss=loss, **recorder)
        return figures(model, traj, X[N_TRAIN:])
    return run


def loop_case(**kw: Any) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        build = kw.pop("build", head)
        model, traj = fit(build, XV, YV, **kw)
        return figures(model, traj, XV[N_TRAIN:])
    return run


def uncertainty_case() -> dict[str, Any]:
    model = seeded(Uncertainty)
    model, traj = fit(model, XV, YV, loss=uncertainty_loss(model))
    return figures(model, traj, XV[N_TRAIN:])


def ema_case() -> dict[str, Any]:
    model, ema, traj = ema_copy_run()
    got = figures(model, traj, XV[N_TRAIN:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        report = explaind.KernelReplica(**QUAD).fit(traj).fidelity_report(XV[N_TRAIN:], model=ema)
    got["ema_error"] = float(report["model_max_rel_error"])
    got["warnings"] += [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]
    return got


def relabel_case(**recorder: Any) -> dict[str, Any]:
    y = YV.clone()
    model, traj = fit(head, XV, y, after=lambda s, m: relabel(s, m, y), **recorder)
    return figures(model, traj, XV[N_TRAIN:])


def uncertainty_check_off_case() -> dict[str, Any]:
    model = seeded(Uncertainty)
    model, traj = fit(model, XV, YV, loss=uncertainty_loss(model), check_gradients=False)
    return figures(model, traj, XV[N_TRAIN:])


def multi_task_concat_case() -> dict[str, Any]:
    y = torch.cat([YV[:, None].to(DT), REG], 1)
    model, traj = fit(lambda: TwoHeads(concat=True), XV, y, loss=multi_task_loss)
    return figures(model, traj, XV[N_TRAIN:])


def ctc_case() -> dict[str, Any]:
    y = torch.randint(1, 4, (14, 2), generator=torch.Generator().manual_seed(9))
    model, traj = fit(FrameConv, XS, y, loss=ctc)
    return figures(model, traj, XS[N_TRAIN:])


def inference_mode_data_case() -> dict[str, Any]:
    """Training data made under ``torch.inference_mode()`` (features precomputed there: no version counter)."""
    with torch.inference_mode():
        X, y = XV.clone(), YV.clone()
    model, traj = fit(head, X, y)
    return figures(model, traj, XV[N_TRAIN:])


def normalised_in_place_case() -> dict[str, Any]:
    """The inputs standardised in place after step 1 (``X.sub_(mean).div_(std)``), the loop going on with them."""
    X = XV.clone()

    def after(s, m):
        if s == 1:
            X.sub_(X.mean(0)).div_(X.std(0))

    model, traj = fit(head, X, YV, after=after)
    return figures(model, traj, XV[N_TRAIN:])


def stateful_gru_case() -> dict[str, Any]:
    model, traj = fit(StatefulGRU, XS, YS)
    model.h = None
    return figures(model, traj, XS[N_TRAIN:])


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # layers and models
    "rrelu": model_case(RReLUNet, XV, YV),
    "rrelu_captured": model_case(RReLUNet, XV, YV, capture_random=True),
    "mc_dropout": model_case(mc_dropout, XV, YV),
    "mc_dropout_captured": model_case(mc_dropout, XV, YV, capture_random=True),
    "dropout1d_feature_alpha": model_case(ChannelDropout, XS, YS),
    "rmsnorm_layernorm_no_bias": model_case(norms, XV, YV),
    "conv_padding_modes_output_padding_unfold": model_case(PaddedConvs, XI, YI),
    "spatial_transformer_grid_sample": model_case(SpatialTransformer, XI, YI, reference=KinkReference),
    "gru_lstm_cells": model_case(CellLoop, XS, YS),
    "mha_add_zero_attn_key_padding": model_case(PaddedAttention, XT, YT),
    "adaptive_log_softmax": model_case(AdaptiveSoftmax, XV, YV % 5),
    "complex_parameter": model_case(ComplexFilter, XV, YV),
    "complex_as_real_pairs": model_case(ComplexAsReal, XV, YV),
    "float32_layer_in_float64_model": model_case(MixedDtype, XV, YV),
    "float32_layer_cast_to_its_weight_dtype": model_case(lambda: MixedDtype(follow=True), XV, YV),
    "cosine_classifier_learned_scale": model_case(CosineClassifier, XV, YV),
    "tied_autoencoder_w_and_wT": model_case(TiedAutoencoder, XV, YV),
    # losses
    "bce_pos_weight": loss_case("multilabel", pos_weighted_bce),
    "multilabel_soft_margin_weight": loss_case("multilabel", multilabel_soft_margin),
    "huber": loss_case("real", huber),
    "gaussian_nll": loss_case("scalar", gaussian_nll, lambda: head(out=2)),
    "poisson_nll": loss_case("counts", poisson_nll),
    "focal_by_hand": loss_case("classes", focal),
    "multi_margin": loss_case("classes", multi_margin),
    "triplet_margin": loss_case("triplet", triplet, Views),
    "cosine_embedding": loss_case("pairs", cosine_pairs, Views),
    "distillation_kl_log_target": loss_case("teacher", distillation),
    "info_nce_check_off": loss_case("pairs", info_nce, Views, check_gradients=False),
    "uncertainty_weighted_loss": uncertainty_case,
    "uncertainty_weighted_loss_check_off": uncertainty_check_off_case,
    "uncertainty_weight_in_outputs": loss_case("classes", uncertainty_in_outputs, UncertaintyInOutputs),
    # loops
    "noise_augmentation_in_loop": loop_case(step=noisy_inputs_step),
    "noise_augmentation_check_off": loop_case(step=noisy_inputs_step, check_gradients=False),
    "manual_seed_each_step_dropout": loop_case(build=lambda: head(lambda m, h: F.dropout(h, 0.3, m.training)),
                                               step=reseeded_step, capture_random=True),
    "zero_grad_between_backward_and_step": loop_case(step=late_zero_grad_step),
    "grads_halved_by_hand": loop_case(step=halved_grads_step),
    "reset_parameters_mid_run": loop_case(after=reset_head),
    "ema_copy_explained": ema_case,
    "tbptt_hidden_state_carried": stateful_gru_case,
    "adam_tensor_lr": loop_case(opt=tensor_lr_adam),
    "log_batch_with_a_boolean_mask": loop_case(step=mask_logged_step),
    "optimizer_step_twice": loop_case(step=twice_stepped),
    "log_batch_twice": loop_case(step=twice_logged),
    "float32_loss_of_float64_model": loop_case(step=float32_loss_step),
    "aux_load_balancing_loss": loop_case(build=AuxRouter, step=aux_loss_step),
    "labels_overwritten_in_place": relabel_case,
    "labels_overwritten_in_place_check_off": lambda: relabel_case(check_gradients=False),
    "inputs_normalised_in_place": normalised_in_place_case,
    "train_data_made_under_inference_mode": inference_mode_data_case,
    "uint8_images_scaled_in_forward": model_case(Uint8Images, XU, YV),
    "ctc_loss": ctc_case,
    "prototypes_cdist": model_case(Prototypes, XV, YV),
    "prototypes_distances_by_hand": model_case(lambda: Prototypes(by_hand=True), XV, YV),
    "vae_rsample": model_case(Reparameterised, XV, YV),
    "vae_rsample_captured": model_case(Reparameterised, XV, YV, capture_random=True),
    "forward_hook_rescaling_output": model_case(hooked_output, XV, YV),
    "weight_renormalised_in_place_in_forward": model_case(RenormalisedHead, XV, YV),
    "multi_task_heads_as_a_tuple": loop_case(build=TwoHeads, step=multi_task_tuple_step),
    "multi_task_heads_concatenated": multi_task_concat_case,
    "sharpness_aware_minimisation": loop_case(step=sam_step),
    "adamw_no_decay_groups": loop_case(opt=no_decay_adamw),
}

