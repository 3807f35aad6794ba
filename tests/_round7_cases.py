"""Loops and cases of the seventh round (tests/test_stranger_round7.py, tests/stranger_round7_table.py).

Every case trains as tests/_round5_kit.py does (float64, SGD 0.5 unless the case names another optimizer, 3 steps of
4 of 12 samples, 2 held-out inputs). :data:`CASES` maps each case's name to a function that trains it and returns
its figures (tests/_round6_kit.py :func:`figures`), or raises the error a user sees. The models and losses are in
tests/_round7_models.py; ``model_case`` and ``loop_case`` are the sixth round's, ``loss_case`` the fifth's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round5_kit import N_TRAIN, XI, XS, XT, XV, YI, YS, YT, YV, fit, head
from _round5_models import loss_data
from _round6_cases import XP, YP, loop_case
from _round7_kit import figures
from _round7_models import (
    XA,
    XW,
    YA,
    YW,
    BatchStatsInEval,
    ConvAutoencoder,
    DetachedNorm,
    DictOutput,
    DilatedAudio,
    DropoutHead,
    DropoutLSTM,
    FractionalPool,
    FrozenCenter,
    FrozenStatsBN,
    FunctionalInside,
    MaxNormEmbedding,
    PairDistances,
    ParameterContainers,
    ProbabilitiesInEval,
    Recurrent,
    ShuffledPads,
    TinyDecoder,
    TinyUNet,
    VAEKLAttribute,
    VAEKLColumn,
    VideoNet,
    batch_hard_triplet,
    bce_of_sigmoid,
    ce_plus_kl_column,
    deep_relu,
    hinge_embedding,
    margin_ranking,
    nll_class_weighted_ignore,
    ohem,
    pairs_views,
    pinball,
    quantile_heads,
    smooth_l1_small_beta,
    soft_f1,
    soft_margin,
    supcon,
    symmetric_weights,
)
from replay_reference import BufferReference, ReplayReference


def model_case(build: Callable[[], torch.nn.Module], X: Any, y: Any, panels: int = 2,
               reference: type = ReplayReference, **kw: Any) -> Callable[[], dict[str, Any]]:
    """tests/_round6_cases.py's model case with the reference's class as a parameter (``BufferReference`` for batch
    norm)."""
    def run() -> dict[str, Any]:
        model, traj = fit(build, X, y, **kw)
        return figures(model, traj, X[N_TRAIN:], panels=panels, reference=reference)
    return run


def two_views_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Two views per step, the loss of each summed: the batch and its features reversed (a flip augmentation)."""
    opt.zero_grad()
    (batch_loss(model(X[idx]), y[idx]) + batch_loss(model(X[idx].flip(-1)), y[idx])).backward()
    rec.log_batch(idx)
    opt.step()


def kl_attribute_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The VAE tutorials' step: the reconstruction (here classification) loss plus ``model.kl`` set by ``forward``."""
    opt.zero_grad()
    (batch_loss(model(X[idx]), y[idx]) + 0.1 * model.kl).backward()
    rec.log_batch(idx)
    opt.step()


def accuracy_forward_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """An extra forward under ``no_grad`` in training mode (for the batch's accuracy) before the training forward:
    with dropout it draws masks of its own."""
    opt.zero_grad()
    with torch.no_grad():
        model(X[idx]).argmax(1).eq(y[idx]).double().mean()
    batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


class HeadOnlyBackward:
    """``loss.backward(inputs=[...])``: gradients for the last layer only at odd steps (the others keep none)."""

    def __init__(self):
        self.step = 0

    def __call__(self, model, opt, X, y, idx, rec, batch_loss) -> None:
        opt.zero_grad()
        loss = batch_loss(model(X[idx]), y[idx])
        loss.backward(inputs=list(model.b.parameters()) if self.step % 2 else None)
        rec.log_batch(idx)
        opt.step()
        self.step += 1


def optimizer_in_backward(model: torch.nn.Module) -> Any:
    """The torch tutorial's optimizer step fused into backward: one SGD per parameter, stepped from a
    ``register_post_accumulate_grad_hook``; the loop's own ``opt`` is a no-op holder of the first one."""
    opts = {p: torch.optim.SGD([p], lr=0.5) for p in model.parameters()}
    def hook(q: torch.Tensor) -> None:
        opts[q].step()
        opts[q].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return next(iter(opts.values()))


def fused_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The tutorial's loop: ``loss.backward()`` only (the hooks step); ``log_batch`` before the backward."""
    rec.log_batch(idx)
    batch_loss(model(X[idx]), y[idx]).backward()


class RampedLoss:
    """The loss multiplied by a per-step ramp ``(s + 1) / 6`` (a warm-up applied to the loss, not the rate)."""

    def __init__(self):
        self.step = 0

    def __call__(self, model, opt, X, y, idx, rec, batch_loss) -> None:
        opt.zero_grad()
        (batch_loss(model(X[idx]), y[idx]) * (self.step + 1) / 6).backward()
        self.step += 1
        rec.log_batch(idx)
        opt.step()


def dict_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The loop reads ``out["logits"]``."""
    opt.zero_grad()
    batch_loss(model(X[idx])["logits"], y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def warmup_by_hand(s: int, model: torch.nn.Module, opt: Any) -> None:
    """Linear warm-up written into ``param_groups`` by hand after every step."""
    for g in opt.param_groups:
        g["lr"] = 0.5 * min(1.0, (s + 2) / 3)


def with_opt(after: Callable) -> Callable:
    """``fit``'s ``after(s, model)`` from ``after(s, model, opt)``: the optimizer found through the recorder-free
    closure ``holder``."""
    holder: dict[str, Any] = {}

    def opt(model):
        holder["opt"] = torch.optim.SGD(model.parameters(), lr=0.5 / 3)
        return holder["opt"]

    return opt, lambda s, m: after(s, m, holder["opt"])


def freeze_bn_after(step: int = 0) -> Callable[[int, torch.nn.Module], None]:
    """After ``step``, the BatchNorm layers' statistics are frozen: ``m.eval()`` for them only."""
    def after(s, model):
        if s == step:
            model.bn.eval()
    return after


def toggle_first_layer(s: int, model: torch.nn.Module) -> None:
    """``requires_grad_`` of the first layer switched every step: trained at even steps, frozen at odd ones."""
    model.a.requires_grad_(s % 2 == 1)


def autoencoder_case() -> dict[str, Any]:
    """MSE of the reconstruction against the image itself: 36 outputs per sample."""
    model, traj = fit(ConvAutoencoder, XI, XI, loss="mse", batch_loss=F.mse_loss)
    return figures(model, traj, XI[N_TRAIN:])


def loss_case(kind: str, loss: Callable, build: Callable[[], torch.nn.Module] = head,
              **recorder: Any) -> Callable[[], dict[str, Any]]:
    """tests/_round5_cases.py's loss case, measured with the sixth round's figures."""
    def run() -> dict[str, Any]:
        X, y = loss_data(kind)
        model, traj = fit(build, X, y, loss=loss, **recorder)
        return figures(model, traj, X[N_TRAIN:])
    return run


def dict_output_case() -> dict[str, Any]:
    """A forward returning ``{"logits": ..., "embedding": ...}``; the replica is compared with the logits."""
    model, traj = fit(DictOutput, XV, YV, step=dict_step)
    with torch.no_grad():
        truth = model.eval()(XV[N_TRAIN:])["logits"]
    return figures(model, traj, XV[N_TRAIN:], truth=truth)


def warmup_case() -> dict[str, Any]:
    opt, after = with_opt(warmup_by_hand)
    model, traj = fit(head, XV, YV, opt=opt, after=after, steps=4)
    return figures(model, traj, XV[N_TRAIN:])


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # models
    "conv1d_dilated_same_padding_audio": model_case(DilatedAudio, XA, YA),
    "conv3d_video": model_case(VideoNet, XW, YW),
    "unet_interpolate_bilinear_align_corners": model_case(lambda: TinyUNet("bilinear", True), XI, YI),
    "unet_interpolate_bicubic": model_case(lambda: TinyUNet("bicubic", False), XI, YI),
    "unet_interpolate_nearest_exact": model_case(lambda: TinyUNet("nearest-exact"), XI, YI),
    "conv_autoencoder_mse_on_the_image": autoencoder_case,
    "rope_rmsnorm_swiglu_tied_decoder": model_case(TinyDecoder, XT, YT, panels=16),
    "sdpa_enable_gqa": model_case(lambda: TinyDecoder(4, 2), XT, YT, panels=16),
    "alibi_float_attention_bias": model_case(lambda: TinyDecoder(alibi=True), XT, YT, panels=16),
    "embedding_max_norm": model_case(MaxNormEmbedding, XT, YT),
    "symmetric_parametrization": model_case(symmetric_weights, XV, YV),
    "functional_call_inside_forward": model_case(FunctionalInside, XV, YV),
    "dict_output": dict_output_case,
    "deep_relu_30_layers": model_case(deep_relu, XV, YV, opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    "fractional_max_pool": model_case(FractionalPool, XI, YI),
    "fractional_max_pool_captured": model_case(FractionalPool, XI, YI, capture_random=True),
    "pads_shuffles_lppool_fold": model_case(ShuffledPads, XI, YI, panels=16),
    "cosine_pairwise_glu_softmin_logsigmoid": model_case(PairDistances, XP, YP),
    "bidirectional_lstm_proj_gru": model_case(Recurrent, XS, YS),
    # losses
    "pinball_quantile": loss_case("scalar", pinball, quantile_heads),
    "margin_ranking": loss_case("pairs", margin_ranking, pairs_views),
    "hinge_embedding": loss_case("pairs", hinge_embedding, pairs_views),
    "soft_margin": loss_case("pairs", soft_margin, pairs_views),
    "smooth_l1_beta_0_01": loss_case("real", smooth_l1_small_beta),
    "bce_of_sigmoid": loss_case("multilabel", bce_of_sigmoid),
    "nll_class_weights_ignore_index": loss_case("classes", nll_class_weighted_ignore),
    "nll_class_weights_ignore_index_check_off": loss_case("classes", nll_class_weighted_ignore,
                                                          check_gradients=False),
    "batch_hard_triplet": loss_case("classes", batch_hard_triplet),
    "batch_hard_triplet_check_off": loss_case("classes", batch_hard_triplet, check_gradients=False),
    "supervised_contrastive": loss_case("classes", supcon),
    "supervised_contrastive_check_off": loss_case("classes", supcon, check_gradients=False),
    "soft_f1_batch_metric": loss_case("classes", soft_f1),
    "soft_f1_batch_metric_check_off": loss_case("classes", soft_f1, check_gradients=False),
    "ohem_topk_hardest": loss_case("classes", ohem),
    "ohem_topk_hardest_check_off": loss_case("classes", ohem, check_gradients=False),
    # loops
    "two_views_summed": loop_case(step=two_views_step),
    "two_views_summed_check_off": loop_case(step=two_views_step, check_gradients=False),
    "vae_kl_kept_on_the_model": loop_case(build=VAEKLAttribute, step=kl_attribute_step, capture_random=True),
    "vae_kl_kept_on_the_model_check_off": loop_case(build=VAEKLAttribute, step=kl_attribute_step,
                                                    capture_random=True, check_gradients=False),
    "accuracy_forward_with_dropout": loop_case(build=DropoutHead, step=accuracy_forward_step),
    "accuracy_forward_with_dropout_check_off": loop_case(build=DropoutHead, step=accuracy_forward_step,
                                                         check_gradients=False),
    "backward_inputs_head_only": loop_case(build=head, step=HeadOnlyBackward),
    "warmup_written_into_param_groups": warmup_case,
    "batchnorm_statistics_frozen_mid_run": loop_case(build=FrozenStatsBN, after=freeze_bn_after()),
    "requires_grad_toggled_every_step": loop_case(build=head, after=toggle_first_layer),
    "requires_grad_toggled_every_step_record_frozen": loop_case(build=head, after=toggle_first_layer,
                                                                record_frozen=True),
    "detached_weight_norm": model_case(DetachedNorm, XV, YV),
    "probabilities_in_eval_mode": model_case(ProbabilitiesInEval, XV, YV),
    "frozen_parameter_moved_in_forward": model_case(FrozenCenter, XV, YV),
    "plain_tensor_moved_in_forward": model_case(lambda: FrozenCenter(False), XV, YV),
    "optimizer_step_in_backward_hooks": loop_case(build=head, opt=optimizer_in_backward, step=fused_step),
    "loss_times_a_per_step_ramp": loop_case(build=head, step=RampedLoss, steps=6),
}


def ohem_logged_step(model, opt, X, y, idx, rec, batch_loss, k: int = 2) -> None:
    """The fix the refusal names: the ``k`` hardest samples selected in the loop, only they logged."""
    opt.zero_grad()
    losses = F.cross_entropy(model(X[idx]), y[idx], reduction="none")
    keep = losses.topk(k).indices
    losses[keep].mean().backward()
    rec.log_batch(idx[keep])
    opt.step()


CASES["ohem_selected_in_the_loop_and_logged"] = loop_case(build=head, step=ohem_logged_step)
CASES["probabilities_in_eval_mode_captured"] = model_case(ProbabilitiesInEval, XV, YV, capture_random=True)


def autoencoder_trained_with_another_loss_case() -> dict[str, Any]:
    """The autoencoder recorded with ``loss="mse"`` while the loop takes ``F.cross_entropy`` of the one-channel image
    (a user's slip): the loop's gradient is zero (log_softmax over one channel is 0)."""
    model, traj = fit(ConvAutoencoder, XI, XI, loss="mse", batch_loss=F.cross_entropy)
    return figures(model, traj, XI[N_TRAIN:])


CASES["autoencoder_loop_loss_with_zero_gradient"] = autoencoder_trained_with_another_loss_case
CASES["fractional_max_pool_replaced_by_adaptive"] = model_case(lambda: FractionalPool(adaptive=True), XI, YI)


def cached_parametrization_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The step under ``parametrize.cached()``: the symmetric weight is computed once per step."""
    from torch.nn.utils import parametrize

    opt.zero_grad()
    with parametrize.cached():
        batch_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def optim(cls: type, **kw: Any) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    return lambda m: cls(m.parameters(), **kw)


CASES.update({
    "batchnorm_batch_statistics_in_eval": model_case(BatchStatsInEval, XV, YV),
    "batchnorm_cumulative_average_momentum_none": model_case(lambda: BatchStatsInEval(True), XV, YV,
                                                             reference=BufferReference),
    "lstm_dropout_between_layers": model_case(DropoutLSTM, XS, YS),
    "gru_dropout_between_layers": model_case(lambda: DropoutLSTM("gru"), XS, YS),
    "parameter_list_dict_module_dict": model_case(ParameterContainers, XV, YV),
    "parametrize_cached_step": loop_case(build=symmetric_weights, step=cached_parametrization_step),
    "adam_decoupled_weight_decay": loop_case(build=head, opt=optim(torch.optim.Adam, lr=0.05, weight_decay=0.5,
                                                                   decoupled_weight_decay=True)),
    "nadam_decoupled_weight_decay": loop_case(build=head, opt=optim(torch.optim.NAdam, lr=0.05, weight_decay=0.5,
                                                                    decoupled_weight_decay=True)),
    "radam_decoupled_weight_decay": loop_case(build=head, opt=optim(torch.optim.RAdam, lr=0.05, weight_decay=0.5,
                                                                    decoupled_weight_decay=True)),
    "sgd_dampening": loop_case(build=head, opt=optim(torch.optim.SGD, lr=0.5, momentum=0.9, dampening=0.5)),
})
CASES["batchnorm_default_momentum_control"] = model_case(FrozenStatsBN, XV, YV, reference=BufferReference)
CASES["vae_kl_as_an_output_column"] = model_case(VAEKLColumn, XV, YV, loss=ce_plus_kl_column, capture_random=True)


def nll_counted_logged_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The fix the refusal names: the loop's class-weighted ``nll_loss`` with ``ignore_index=2``; only the counted
    samples logged, with their class weights normalised, under ``loss="cross_entropy"``."""
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=X.dtype)
    opt.zero_grad()
    F.nll_loss(F.log_softmax(model(X[idx]), -1), y[idx], weight=weight, ignore_index=2).backward()
    keep = idx[y[idx] != 2]
    rec.log_batch(keep, weights=weight[y[keep]] / weight[y[keep]].sum())
    opt.step()


def nll_counted_case() -> dict[str, Any]:
    X, y = loss_data("classes")
    model, traj = fit(head, X, y, step=nll_counted_logged_step)
    return figures(model, traj, X[N_TRAIN:])


CASES["nll_class_weights_ignore_index_counted_samples_logged"] = nll_counted_case
