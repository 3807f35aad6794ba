"""Losses, loops and cases of the eighth round (tests/test_stranger_round8.py, tests/stranger_round8_table.py).

Every case trains as tests/_round5_kit.py does (float64, SGD 0.5 unless the case names another optimizer, 3 steps of
4 of 12 samples, 2 held-out inputs) and is measured by tests/_round6_kit.py's :func:`figures`. :data:`CASES` maps each
case's name to a function that trains it and returns its figures, or raises the error a user sees. The models are in
tests/_round8_models.py; ``model_case`` is the seventh round's, ``loss_case`` the fifth's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round5_kit import N_TRAIN, XI, XS, XT, XV, YI, YS, YT, YV, fit, head
from _round5_models import loss_data
from _round6_kit import figures
from _round7_cases import model_case
from _round7_models import XW, YW
from _round8_models import (
    MDN,
    RK4ODE,
    Antialiased,
    AttentionWeightsPooling,
    BucketEmbedding,
    ClampedOutput,
    Clip3d,
    CrossMapLRN,
    DecoderLayerPreNorm,
    EncoderLayerGelu,
    FixedPoint,
    FunctionalHardshrink,
    HookSpectralNorm,
    InstanceNorm1dSeq,
    LazyConv,
    LazyMLP,
    LoRAMLP,
    MaxIndexRouter,
    PoolsUpsample,
    Pruned,
    RealNVP,
    RidgeHead,
    Sawtooth,
    SegNet,
    SparseEmbedding,
    SpectralConv1d,
    flow_nll,
    lazy_after_dry_run,
    mdn_nll,
    prune_again,
)
from replay_reference import BufferReference
from torch import Tensor, nn

#: Per-pixel labels of ``XI`` (n, 6, 6): class of the sign pattern of two pixel sums; ``SEG_IGNORED`` marks a
#: border of 255 (ignored) on every image.
SEG = ((XI[:, 0] > 0).long() + (XI[:, 0] > 1).long())
SEG_IGNORED = SEG.clone()
SEG_IGNORED[:, 0, :] = 255
#: Pixels of small magnitude ignored: a different count on every image.
SEG_IGNORED_VARYING = torch.where(XI[:, 0].abs() < 0.3, 255, SEG)


def segmentation_case(loss: Any, y: Tensor = SEG, **recorder: Any) -> Callable[[], dict[str, Any]]:
    """:class:`SegNet` trained on per-pixel labels ``y`` with ``loss`` (a string or a callable)."""
    def run() -> dict[str, Any]:
        model, traj = fit(SegNet, XI, y, loss=loss, batch_loss=None if isinstance(loss, str) else loss, **recorder)
        return figures(model, traj, XI[N_TRAIN:])
    return run


def seg_nll_ignore(out: Tensor, y: Tensor) -> Tensor:
    """``nn.NLLLoss(ignore_index=255)`` on the 4-D log-probabilities: the mean over the batch's counted pixels."""
    return F.nll_loss(F.log_softmax(out, 1), y, ignore_index=255)


def seg_ce(out: Tensor, y: Tensor) -> Tensor:
    """``F.cross_entropy`` of the 4-D logits, every pixel counted: the mean over the batch's pixels."""
    return F.cross_entropy(out, y)


def dice_batch(out: Tensor, y: Tensor, eps: float = 1.0) -> Tensor:
    """The usual soft Dice loss over the whole batch: ``1 - (2 sum p t + eps) / (sum p + sum t + eps)``."""
    p, t = out.softmax(1), F.one_hot(y, 3).permute(0, 3, 1, 2).to(out.dtype)
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def dice_per_image(out: Tensor, y: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice per image, then the batch mean (a ratio over each sample's own pixels)."""
    p, t = out.softmax(1), F.one_hot(y, 3).permute(0, 3, 1, 2).to(out.dtype)
    dice = (2 * (p * t).sum((1, 2, 3)) + eps) / (p.sum((1, 2, 3)) + t.sum((1, 2, 3)) + eps)
    return (1 - dice).mean()


CLASS_WEIGHTS = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


def smoothed_weighted_ce(out: Tensor, y: Tensor) -> Tensor:
    """``nn.CrossEntropyLoss(weight=..., label_smoothing=0.1)``: torch divides by the batch's sum of target weights."""
    return F.cross_entropy(out, y, weight=CLASS_WEIGHTS, label_smoothing=0.1)


def smoothed_ce(out: Tensor, y: Tensor) -> Tensor:
    """``nn.CrossEntropyLoss(label_smoothing=0.1)`` without class weights."""
    return F.cross_entropy(out, y, label_smoothing=0.1)


def multi_margin_p2(out: Tensor, y: Tensor) -> Tensor:
    """``nn.MultiMarginLoss(p=2, margin=0.5, weight=...)``."""
    return F.multi_margin_loss(out, y, p=2, margin=0.5, weight=CLASS_WEIGHTS)


def multilabel_margin(out: Tensor, y: Tensor) -> Tensor:
    """``nn.MultiLabelMarginLoss``: ``y (n, 3)`` holds each sample's label indices, ended by -1."""
    return F.multilabel_margin_loss(out, y)


def multilabel_targets() -> tuple[Tensor, Tensor]:
    """``XV`` with targets ``[c, -1, -1]`` or ``[c, c', -1]`` (one or two labels per sample)."""
    y = torch.full((len(XV), 3), -1, dtype=torch.long)
    y[:, 0] = YV
    y[::2, 1] = (YV[::2] + 1) % 3
    return XV, y


def triplet_with_distance(out: Tensor, y: Tensor) -> Tensor:
    """``nn.TripletMarginWithDistanceLoss`` with a cosine distance and ``swap=True`` over each sample's triplet."""
    loss = nn.TripletMarginWithDistanceLoss(distance_function=lambda a, b: 1 - F.cosine_similarity(a, b),
                                            margin=0.3, swap=True)
    return loss(out[:, 0], out[:, 1], out[:, 2])


def triplet_embedder() -> nn.Module:
    """A shared tanh embedder applied to each of a sample's three views ``(n, 3, 4) -> (n, 3, 3)``."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def loss_case(kind: str, loss: Callable, build: Callable[[], nn.Module] = head,
              **recorder: Any) -> Callable[[], dict[str, Any]]:
    """tests/_round5_cases.py's loss case, measured with the sixth round's figures."""
    def run() -> dict[str, Any]:
        X, y = loss_data(kind) if isinstance(kind, str) else kind()
        model, traj = fit(build, X, y, loss=loss, **recorder)
        return figures(model, traj, X[N_TRAIN:])
    return run


class TemperatureCE(nn.Module):
    """A loss module that owns a learned temperature: ``cross_entropy(out / exp(log_t), y)``."""

    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, out, y):
        return F.cross_entropy(out / self.log_t.exp(), y)


def learned_temperature_case() -> dict[str, Any]:
    """The loss module's parameter trained by the same optimizer as the model (the CLIP/SimCLR recipe)."""
    loss = TemperatureCE()
    model, traj = fit(head, XV, YV, loss=loss,
                      opt=lambda m: torch.optim.SGD([*m.parameters(), *loss.parameters()], lr=0.5))
    return figures(model, traj, XV[N_TRAIN:])


def lazy_case() -> dict[str, Any]:
    """``LazyLinear`` layers, the optimizer and the recorder built before the first forward."""
    torch.manual_seed(0)
    model = LazyMLP().to(torch.float64)
    model, traj = fit(model, XV, YV)
    return figures(model, traj, XV[N_TRAIN:])


def sparse_embedding_case() -> dict[str, Any]:
    model, traj = fit(SparseEmbedding, XT, YT)
    return figures(model, traj, XT[N_TRAIN:])


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # layers and models
    "lazy_linear_before_the_first_forward": lazy_case,
    "lazy_linear_after_a_dry_run": model_case(lazy_after_dry_run, XV, YV),
    "lazy_conv_batchnorm_after_a_dry_run": model_case(LazyConv, XI, YI, reference=BufferReference),
    "prune_l1_unstructured_relu": model_case(Pruned, XV, YV),
    "prune_again_between_steps": model_case(Pruned, XV, YV, after=prune_again),
    "prune_again_between_steps_check_off": model_case(Pruned, XV, YV, after=prune_again, check_gradients=False),
    "spectral_norm_hook_based": model_case(HookSpectralNorm, XV, YV, reference=BufferReference),
    "dropout3d_conv3d_elu": model_case(Clip3d, XW, YW),
    "instancenorm1d_running_stats": model_case(InstanceNorm1dSeq, XS, YS,
                                                         reference=BufferReference),
    "avgpool_ceil_upsample_divisor_selu_hardtanh_softsign": model_case(PoolsUpsample, XI, YI, panels=8),
    "mha_per_head_weights_used_downstream": model_case(AttentionWeightsPooling, XS, YS, panels=8),
    "transformer_encoder_layer_gelu_padding_mask": model_case(EncoderLayerGelu, XT, YT, panels=8),
    "transformer_decoder_layer_prenorm_memory_mask": model_case(DecoderLayerPreNorm, XT, YT, panels=8),
    "realnvp_flow_slogdet_nll": model_case(RealNVP, XV, YV, loss=flow_nll),
    "realnvp_flow_slogdet_nll_sgd_0_05": model_case(RealNVP, XV, YV, loss=flow_nll,
                                                    opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.05)),
    "mixture_density_network": model_case(MDN, *loss_data("scalar"), loss=mdn_nll),
    "neural_ode_rk4": model_case(RK4ODE, XV, YV),
    "fno_spectral_conv_rfft": model_case(SpectralConv1d, XS, YS),
    "deq_fixed_point_until_converged": model_case(FixedPoint, XV, YV),
    "linalg_solve_layer": model_case(RidgeHead, XV, YV),
    "remainder_sawtooth": model_case(Sawtooth, XV, YV),
    "functional_hardshrink": model_case(FunctionalHardshrink, XV, YV),
    "integer_cast_bucket_embedding": model_case(BucketEmbedding, XV, YV),
    "max_indices_router": model_case(MaxIndexRouter, XV, YV, opt=lambda m: torch.optim.SGD(m.parameters(), lr=2.0)),
    "max_indices_router_switching": model_case(MaxIndexRouter, XV, YV,
                                               opt=lambda m: torch.optim.SGD(m.parameters(), lr=20.0)),
    "clamped_logits": model_case(ClampedOutput, XV, YV, panels=8),
    "sparse_embedding_sgd": sparse_embedding_case,
    "lora_by_parametrize_frozen_base": model_case(LoRAMLP, XV, YV),
    "interpolate_antialias": model_case(Antialiased, XI, YI),
    "cross_map_lrn2d": model_case(CrossMapLRN, XI, YI),
    # losses
    "segmentation_ce_string_4d": segmentation_case("cross_entropy"),
    "segmentation_ce_callable_4d": segmentation_case(seg_ce),
    "segmentation_nll_ignore_index": segmentation_case(seg_nll_ignore, SEG_IGNORED),
    "segmentation_nll_ignore_index_check_off": segmentation_case(seg_nll_ignore, SEG_IGNORED,
                                                                 check_gradients=False),
    "segmentation_nll_ignore_index_counts_differ": segmentation_case(seg_nll_ignore, SEG_IGNORED_VARYING),
    "segmentation_nll_ignore_index_counts_differ_check_off": segmentation_case(seg_nll_ignore, SEG_IGNORED_VARYING,
                                                                               check_gradients=False),
    "dice_over_the_batch": segmentation_case(dice_batch),
    "dice_over_the_batch_check_off": segmentation_case(dice_batch, check_gradients=False),
    "dice_per_image": segmentation_case(dice_per_image),
    "label_smoothing_class_weights": loss_case("classes", smoothed_weighted_ce),
    "label_smoothing_class_weights_check_off": loss_case("classes", smoothed_weighted_ce, check_gradients=False),
    "label_smoothing": loss_case("classes", smoothed_ce),
    "multi_margin_p2_weighted": loss_case("classes", multi_margin_p2),
    "multilabel_margin": loss_case(multilabel_targets, multilabel_margin),
    "triplet_with_cosine_distance_swap": loss_case("triplet", triplet_with_distance, triplet_embedder),
    "loss_module_with_a_learned_temperature": learned_temperature_case,
}


def counted_pixels_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The fix the refusal names: the loop's ``nll_loss(ignore_index=255)`` over the batch's counted pixels, each
    image logged with its share of them, ``n / n.sum()``."""
    opt.zero_grad()
    batch_loss(model(X[idx]), y[idx]).backward()
    n = (y[idx] != 255).flatten(1).sum(1).to(X.dtype)
    rec.log_batch(idx, weights=n / n.sum())
    opt.step()


def counted_pixels_case() -> dict[str, Any]:
    model, traj = fit(SegNet, XI, SEG_IGNORED_VARYING, loss=seg_nll_ignore, step=counted_pixels_step)
    return figures(model, traj, XI[N_TRAIN:])


CASES["segmentation_nll_ignore_index_counted_pixels_logged"] = counted_pixels_case
