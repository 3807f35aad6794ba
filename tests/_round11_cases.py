"""Losses, loops and cases of the eleventh round (tests/test_stranger_round11.py, tests/test_stranger_round11_more.py,
tests/stranger_round11_table.py).

Every case trains as tests/_round5_kit.py does (float64, SGD 0.5 unless the case names another optimizer or rate, 3
steps of 4 of 12 samples, 2 held-out inputs) and is measured by tests/_round6_kit.py's :func:`figures`.
:data:`CASES` maps each case's name to a function that trains it and returns its figures, or raises the error a user
sees. The models are in tests/_round11_models.py; ``model_case`` is the seventh round's, ``loss_case`` the eighth's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round5_kit import N_TRAIN, XI, XS, XV, YI, YS, YV, KinkReference, fit, head
from _round7_cases import model_case
from _round7_kit import figures
from _round8_cases import loss_case
from _round10_cases import CAPTURE, optim, outputs
from _round10_models import relu_mlp
from _round11_models import (
    AntialiasShuffle,
    BesselFeatures,
    BesselFixed,
    ChebyshevCdist,
    ElementwiseMore,
    FactorisedLinear,
    FunctionalBN,
    GumbelSoft,
    LinalgMore,
    MixupInForward,
    NoForwardDerivative,
    NoisyUnits,
    PackedProjLSTM,
    PrunedConv,
    SampledExpert,
    SavedTensorHooks,
    Sequence1d,
    SpecialFunctions2,
    StochasticBinary,
    StraightThrough,
    SyncBN,
    VectorQuantiser,
    Volume3d,
    padded,
    relu_bn_cnn,
    relu_dropout_mlp,
    vq_loss,
)
from replay_reference import BufferReference
from torch import Tensor, nn
from torch.nn.utils import prune

#: The weight of the L2 penalty of :func:`l2_penalty_step` (and the ``weight_decay`` of its fix).
L2 = 0.01
#: Mixup's weight of the first sample of a pair (a fixed one, so that the fix's pairs are the loop's).
MIX = 0.7


def l2_penalty_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """The batch loss plus ``L2 / 2 * sum ||W||^2`` over the parameters (the regulariser tutorials add by hand)."""
    opt.zero_grad()
    penalty = sum((p ** 2).sum() for p in model.parameters())
    (batch_loss(model(X[idx]), y[idx]) + L2 / 2 * penalty).backward()
    rec.log_batch(idx)
    opt.step()


def mixup_step(model, opt, X, y, idx, rec, batch_loss) -> None:
    """Mixup (Zhang et al. 2018) in the loop: each input mixed with the next of its batch, ``MIX x_i + (1 - MIX)
    x_j``, the loss the same mixture of the two labels' losses."""
    opt.zero_grad()
    j = idx.roll(1)
    out = model(MIX * X[idx] + (1 - MIX) * X[j])
    (MIX * batch_loss(out, y[idx]) + (1 - MIX) * batch_loss(out, y[j])).backward()
    rec.log_batch(idx)
    opt.step()


def soft_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Cross entropy to probability targets ``y`` ``(n, 3)``."""
    return F.cross_entropy(out, y)


def mixup_fixed() -> dict[str, Any]:
    """Mixup's fix: the mixed pairs made once before recording, each row ``MIX x_i + (1 - MIX) x_(i+1)`` with the
    soft label ``MIX onehot(y_i) + (1 - MIX) onehot(y_(i+1))``: each training row is a pair, its atom that pair's."""
    nxt = torch.arange(N_TRAIN).roll(-1)
    Xm = torch.cat([MIX * XV[:N_TRAIN] + (1 - MIX) * XV[nxt], XV[N_TRAIN:]])
    hot = F.one_hot(YV, 3).to(XV.dtype)
    ym = torch.cat([MIX * hot[:N_TRAIN] + (1 - MIX) * hot[nxt], hot[N_TRAIN:]])
    model, traj = fit(head, Xm, ym, loss=soft_cross_entropy)
    return figures(model, traj, Xm[N_TRAIN:])


def prune_removed_after_step_0() -> dict[str, Any]:
    """The pruned CNN whose head's pruning is made permanent by ``prune.remove`` after step 0 (``weight_orig`` and
    the mask go, ``weight`` becomes a new ``nn.Parameter`` the optimizer does not hold)."""
    def after(s: int, model: nn.Module) -> None:
        if s == 0:
            prune.remove(model.head, "weight")

    model, traj = fit(PrunedConv, XI, YI, after=after)
    return figures(model, traj, XI[N_TRAIN:])


def prune_removed_after_the_run() -> dict[str, Any]:
    """The pruned CNN trained, then ``prune.remove`` on both layers after the recorded run and before explaining:
    ``weight_orig`` is gone, ``weight`` a new parameter the recording does not hold."""
    model, traj = fit(PrunedConv, XI, YI)
    prune.remove(model.conv, "weight")
    prune.remove(model.head, "weight")
    return figures(model, traj, XI[N_TRAIN:])


def prune_remove_on_a_copy() -> dict[str, Any]:
    """The fix both refusals name: the recorded model kept as it is, ``prune.remove`` on a deep copy."""
    model, traj = fit(PrunedConv, XI, YI)
    pruned = copy.deepcopy(model)
    prune.remove(pruned.conv, "weight")
    prune.remove(pruned.head, "weight")
    got = figures(model, traj, XI[N_TRAIN:])
    with torch.no_grad():
        got["copy"] = float((pruned.eval()(XI[N_TRAIN:]) - model.eval()(XI[N_TRAIN:])).abs().max())
    return got


def _half_linear_outputs(module: nn.Module, args: Any, out: Any) -> Any:
    """A global forward hook halving every ``nn.Linear``'s output."""
    return 0.5 * out if isinstance(module, nn.Linear) else None


def global_forward_hook(removed_before_explaining: bool) -> Callable[[], dict[str, Any]]:
    """A hook for every module of the process, ``torch.nn.modules.module.register_module_forward_hook``, registered
    before training and removed after explaining, or (``removed_before_explaining``) right after training."""
    def run() -> dict[str, Any]:
        handle = torch.nn.modules.module.register_module_forward_hook(_half_linear_outputs)
        try:
            model, traj = fit(head, XV, YV)
            if removed_before_explaining:
                handle.remove()
            return figures(model, traj, XV[N_TRAIN:])
        finally:
            handle.remove()
    return run


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # estimators whose gradient is not their forward's derivative, draws in training forwards
    "straight_through_argmax_soft_in_eval": model_case(StraightThrough, XV, YV, **CAPTURE),
    "straight_through_argmax_in_both_modes": model_case(lambda: StraightThrough(False), XV, YV),
    "vq_vae_codebook_argmin_straight_through": model_case(VectorQuantiser, XV, YV, loss=vq_loss),
    "gumbel_softmax_soft_tau_0_5": model_case(GumbelSoft, XV, YV, **CAPTURE),
    "multinomial_route_in_training": model_case(SampledExpert, XV, YV, **CAPTURE),
    "torch_normal_and_exponential_noise": model_case(NoisyUnits, XV, YV, **CAPTURE),
    "bernoulli_binary_units_straight_through": model_case(StochasticBinary, XV, YV, **CAPTURE),
    # pruning, batch norm written otherwise, parametrizations
    "prune_ln_structured_and_random_unstructured": model_case(PrunedConv, XI, YI),
    "prune_remove_after_step_0": prune_removed_after_step_0,
    "prune_remove_after_the_run": prune_removed_after_the_run,
    "prune_remove_on_a_copy": prune_remove_on_a_copy,
    "sync_batchnorm_one_process_cpu": model_case(SyncBN, XV, YV, reference=BufferReference),
    "functional_batch_norm_with_buffers": model_case(FunctionalBN, XV, YV, reference=BufferReference),
    "functional_batch_norm_captured": model_case(FunctionalBN, XV, YV, reference=BufferReference, **CAPTURE),
    "parametrize_unsafe_factorised_right_inverse": model_case(FactorisedLinear, XV, YV),
    # layers in one and three dimensions, resampling
    "conv_transpose1d_lppool1d_adaptive_max1d_channel_shuffle": model_case(Sequence1d, XS, YS, reference=KinkReference),
    "conv_transpose3d_maxpool3d_trilinear_softmax2d": model_case(Volume3d, XI, YI, reference=KinkReference),
    "bicubic_antialias_pixel_shuffle_unshuffle": model_case(AntialiasShuffle, XI, YI),
    "packed_lengths_from_batch_positions": model_case(lambda: PackedProjLSTM("position"), XS, YS),
    "packed_lengths_from_the_padding": model_case(PackedProjLSTM, padded(XS), YS),
    # functions
    "special_bessel_i_erfcx_ndtri_polygamma_digamma": model_case(SpecialFunctions2, XV, YV),
    "linalg_matrix_exp_inv_lu_nuclear_householder": model_case(LinalgMore, XV, YV),
    "logaddexp_cummin_quantile_trapezoid": model_case(ElementwiseMore, XV, YV, reference=KinkReference),
    "cdist_p_inf_prototypes": model_case(ChebyshevCdist, XV, YV, reference=KinkReference),
    "special_bessel_j0_k0_no_derivative": model_case(BesselFeatures, XV, YV),
    "bessel_by_quadrature_fix": model_case(BesselFixed, XV, YV, panels=16),
    "special_zeta_no_forward_derivative": model_case(NoForwardDerivative, XV, YV),
    "saved_tensors_hooks_in_forward": model_case(SavedTensorHooks, XV, YV),
    "global_module_forward_hook": global_forward_hook(False),
    "global_module_forward_hook_removed_before_explaining": global_forward_hook(True),
    # losses as modules
    "l1_loss_module": loss_case("real", nn.L1Loss(), outputs(3)),
    "multilabel_soft_margin_loss_weighted": loss_case(
        "multilabel", nn.MultiLabelSoftMarginLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))),
    "gaussian_nll_loss_module_full_eps": loss_case("real", lambda out, y: nn.GaussianNLLLoss(full=True, eps=1e-3)(
        out[:, :3], y, F.softplus(out[:, 3:])), outputs(6)),
    # loops: regularisers and batch-coupled inputs
    "l2_penalty_in_loss": model_case(head, XV, YV, step=l2_penalty_step),
    "l2_penalty_as_weight_decay": model_case(head, XV, YV, opt=optim("SGD", 0.5, weight_decay=L2)),
    "mixup_in_the_loop": model_case(head, XV, YV, step=mixup_step),
    "mixup_pairs_made_before_recording": mixup_fixed,
    "mixup_inside_forward_training_only": model_case(MixupInForward, XV, YV),
    "mixup_inside_forward_captured": model_case(MixupInForward, XV, YV, **CAPTURE),
    # ReLU-heavy models at untuned rates
    "relu_bn_cnn_adam_1": model_case(relu_bn_cnn, XI, YI, opt=optim("Adam", 1.0), reference=BufferReference),
    "relu_bn_cnn_adam_1_conv_without_bias": model_case(lambda: relu_bn_cnn(False), XI, YI, opt=optim("Adam", 1.0),
                                                       reference=BufferReference),
    "relu_dropout_mlp_sgd_3_momentum": model_case(relu_dropout_mlp, XV, YV, opt=optim("SGD", 3.0, momentum=0.9)),
    "relu_mlp5_rmsprop_0_5": model_case(relu_mlp, XV, YV, opt=optim("RMSprop", 0.5)),
    "relu_mlp5_adagrad_1": model_case(relu_mlp, XV, YV, opt=optim("Adagrad", 1.0)),
    "relu_mlp5_adamax_1": model_case(relu_mlp, XV, YV, opt=optim("Adamax", 1.0)),
    "relu_mlp5_nadam_0_5": model_case(relu_mlp, XV, YV, opt=optim("NAdam", 0.5)),
}
