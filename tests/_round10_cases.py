"""Losses and cases of the tenth round (tests/test_stranger_round10.py, tests/test_stranger_round10_more.py,
tests/stranger_round10_table.py).

Every case trains as tests/_round5_kit.py does (float64, SGD 0.5 unless the case names another optimizer or rate, 3
steps of 4 of 12 samples, 2 held-out inputs) and is measured by tests/_round6_kit.py's :func:`figures`.
:data:`CASES` maps each case's name to a function that trains it and returns its figures, or raises the error a user
sees. The models are in tests/_round10_models.py; ``model_case`` is the seventh round's, ``loss_case`` the eighth's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round5_kit import N_TRAIN, XI, XS, XT, XV, YI, YS, YT, YV, KinkReference, fit, head
from _round5_models import loss_data
from _round7_cases import model_case
from _round7_kit import figures
from _round8_cases import loss_case
from _round10_attention import (
    AllOptionsAttention,
    FullMaskTransformer,
    Perceiver,
    RotaryComplex,
    SDPAScaled,
    SetPooling,
)
from _round10_models import (
    CausalTCN,
    CheckpointByName,
    CheckpointSequential,
    CompilerDisabled,
    DetPower,
    EighVectors,
    EinsumEllipsis,
    FiLM,
    FunctionalHyper,
    GradInputClip,
    HessianFeatures,
    HyperConv,
    InPlaceWrites,
    JitIgnored,
    ParamHook,
    PreHookStandardise,
    Siren,
    Sparsemax,
    SpatialSampler,
    SpecialFunctions,
    TensorOps,
    UnflattenConv,
    VarMeanNorm,
    Windows,
    relu_cnn,
    relu_mlp,
)
from replay_reference import ReplayReference
from torch import Tensor, distributions
from torch.distributions import constraints, transforms


def optim(kind: str, lr: float, **options: Any) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    """``torch.optim.<kind>(model.parameters(), lr=lr, **options)``."""
    return lambda m: getattr(torch.optim, kind)(m.parameters(), lr=lr, **options)


def outputs(n: int) -> Callable[[], torch.nn.Module]:
    return lambda: head(out=n)


def targets(kind: str, change: Callable[[Tensor], Tensor]) -> Callable[[], tuple[Tensor, Tensor]]:
    """tests/_round5_models.py's ``loss_data(kind)`` with its targets mapped by ``change`` (into a support)."""
    def data() -> tuple[Tensor, Tensor]:
        X, y = loss_data(kind)
        return X, change(y)
    return data


def loss_case_on_panels(kind: str, loss: Callable, build: Callable[[], torch.nn.Module],
                        panels: int) -> Callable[[], dict[str, Any]]:
    """tests/_round8_cases.py's loss case with the reference on ``panels`` panels (strongly curved paths)."""
    def run() -> dict[str, Any]:
        X, y = loss_data(kind)
        model, traj = fit(build, X, y, loss=loss)
        return figures(model, traj, X[N_TRAIN:], panels=panels)
    return run


def scale(t: Tensor) -> Tensor:
    return F.softplus(t) + 0.1


def low_rank_mvn_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-LowRankMultivariateNormal(loc, cov_factor (3, 1), cov_diag).log_prob(y)`` from 7 outputs."""
    dist = distributions.LowRankMultivariateNormal(out[:, :3], out[:, 3:6, None], scale(out[:, 6:9]))
    return -dist.log_prob(y).mean()


def independent_normal_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-Independent(Normal(loc, scale), 1).log_prob(y)`` over 3 targets."""
    return -distributions.Independent(distributions.Normal(out[:, :3], scale(out[:, 3:])), 1).log_prob(y).mean()


def tanh_normal_nll(out: Tensor, y: Tensor) -> Tensor:
    """A SAC-style squashed Gaussian: ``TransformedDistribution(Normal, [TanhTransform(cache_size=1)])`` at
    targets in (-1, 1)."""
    dist = distributions.TransformedDistribution(distributions.Normal(out[:, 0], scale(out[:, 1])),
                                                 [transforms.TanhTransform(cache_size=1)])
    return -dist.log_prob(y).mean()


def cholesky_mvn_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-MultivariateNormal(loc, scale_tril).log_prob(y)``, ``scale_tril`` from 9 outputs by
    ``transform_to(constraints.lower_cholesky)`` (the lower triangle, the diagonal through ``exp``)."""
    tril = distributions.transform_to(constraints.lower_cholesky)(out[:, 3:].reshape(-1, 3, 3))
    return -distributions.MultivariateNormal(out[:, :3], scale_tril=tril).log_prob(y).mean()


def gamma_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-Gamma(concentration, rate).log_prob(y)`` at positive targets."""
    return -distributions.Gamma(scale(out[:, 0]), scale(out[:, 1])).log_prob(y).mean()


def von_mises_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-VonMises(loc, concentration).log_prob(angle)`` (a Bessel function of the concentration inside)."""
    return -distributions.VonMises(out[:, 0], scale(out[:, 1])).log_prob(y).mean()


def continuous_bernoulli_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-ContinuousBernoulli(logits).log_prob(y)`` at targets in [0, 1] (its normaliser switches to a Taylor
    expansion near probability 0.5)."""
    return -distributions.ContinuousBernoulli(logits=out).log_prob(y).sum(-1).mean()


def kumaraswamy_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-Kumaraswamy(a, b).log_prob(y)`` (a ``TransformedDistribution`` of a uniform) at targets in (0, 1)."""
    return -distributions.Kumaraswamy(scale(out[:, 0]) + 0.5, scale(out[:, 1]) + 0.5).log_prob(y).mean()


def laplace_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-Laplace(loc, scale).log_prob(y)`` over 3 targets (``|y - loc|``: a kink of the loss, not of the model)."""
    return -distributions.Laplace(out[:, :3], scale(out[:, 3:])).log_prob(y).sum(-1).mean()


def relaxed_one_hot_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-RelaxedOneHotCategorical(temperature 0.5, logits).log_prob(y)`` at points of the simplex."""
    dist = distributions.RelaxedOneHotCategorical(torch.tensor(0.5, dtype=out.dtype), logits=out)
    return -dist.log_prob(y).mean()


def simplex() -> tuple[Tensor, Tensor]:
    """``(14, 4)`` inputs and targets inside the simplex of 3 classes."""
    X, y = loss_data("real")
    return X, torch.softmax(y, -1).clamp_min(1e-3) / torch.softmax(y, -1).clamp_min(1e-3).sum(-1, keepdim=True)


class PlainCallReference(ReplayReference):
    """The replaying reference with a model's own checkpointing switched off (``module.checkpointing = False``):
    the reference takes its gradients inside ``torch.func.functional_call``, and torch's non-reentrant checkpoint
    recomputes the block in backward after ``functional_call`` has put the module's own parameters back, so the
    reference would differentiate at the initial parameters. Checkpointing changes no value, so the reference's
    function is the model's."""

    def before_forward(self, module: torch.nn.Module, step: int, micro: int) -> None:
        module.checkpointing = False


CAPTURE = {"capture_random": True}


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # models
    "rotary_complex_buffer": model_case(lambda: RotaryComplex(real_buffer=False), XT, YT),
    "rotary_view_as_complex_polar": model_case(RotaryComplex, XT, YT),
    "einsum_ellipsis": model_case(EinsumEllipsis, XS, YS),
    "jit_ignore_and_unused_methods": model_case(JitIgnored, XV, YV),
    "parameter_hook_reads_in_init": model_case(ParamHook, XV, YV),
    "parameter_hook_clamps_in_init": model_case(lambda: ParamHook("clamp"), XV, YV),
    "parameter_hook_clamps_unchecked": model_case(lambda: ParamHook("clamp"), XV, YV, check_gradients=False),
    "full_backward_hook_clips_grad_input": model_case(GradInputClip, XV, YV),
    "full_backward_hook_clips_unchecked": model_case(GradInputClip, XV, YV, check_gradients=False),
    "sdpa_bool_mask_dropout_scale": model_case(SDPAScaled, XS, YS, **CAPTURE),
    "hypernetwork_grouped_conv_per_sample": model_case(HyperConv, XI, YI),
    "set_transformer_pma_deepsets": model_case(SetPooling, XS, YS),
    "perceiver_cross_attention_kdim_vdim": model_case(Perceiver, XS, YS),
    "sparsemax_sort_cumsum": model_case(Sparsemax, XV, YV, reference=KinkReference),
    "siren_fourier_features": model_case(Siren, XV, YV, panels=32),
    "tcn_causal_pad_dilated_conv1d": model_case(CausalTCN, XS, YS),
    "linalg_det_matrix_power": model_case(DetPower, XV, YV),
    "eigh_eigenvectors_squared": model_case(EighVectors, XV, YV, panels=16),
    "hessian_features_torch_func": model_case(HessianFeatures, XV, YV),
    "tensor_unfold_windows": model_case(Windows, XS, YS),
    "as_strided_windows": model_case(lambda: Windows("strided"), XS, YS),
    "index_and_shape_ops": model_case(TensorOps, XV, YV),
    "var_mean_std_normalisation": model_case(VarMeanNorm, XV, YV),
    "torch_special_functions": model_case(SpecialFunctions, XV, YV, reference=KinkReference),
    "film_conditioning": model_case(FiLM, XV, YV),
    "unflatten_conv_flatten": model_case(UnflattenConv, XV, YV),
    "spatial_transformer_bicubic_reflection": model_case(SpatialSampler, XI, YI, reference=KinkReference),
    "spatial_transformer_nearest_reflection": model_case(lambda: SpatialSampler("nearest"), XI, YI,
                                                         reference=KinkReference),
    "mha_bias_kv_zero_attn_kdim_vdim_padding": model_case(AllOptionsAttention, XS, YS),
    "transformer_all_four_masks_dropout": model_case(FullMaskTransformer, XS, YS, panels=16),
    "functional_hypernetwork_vmap_functional_call": model_case(FunctionalHyper, XV, YV),
    "forward_pre_hook_with_kwargs_standardises": model_case(PreHookStandardise, XV, YV),
    "scatter_into_zeros_inplace": model_case(lambda: InPlaceWrites("scatter_"), XV, YV),
    "index_copy_into_zeros_inplace": model_case(lambda: InPlaceWrites("index_copy_"), XV, YV),
    "masked_scatter_into_zeros_inplace": model_case(lambda: InPlaceWrites("masked_scatter_"), XV, YV),
    "add_into_a_zeros_slice_inplace": model_case(lambda: InPlaceWrites("add_"), XV, YV),
    "scatter_out_of_place": model_case(lambda: InPlaceWrites("scatter"), XV, YV),
    "f_pad_out_of_place": model_case(lambda: InPlaceWrites("pad"), XV, YV),
    "compiler_disable_and_parametrize_cached_in_forward": model_case(CompilerDisabled, XV, YV),
    "checkpoint_sequential_dropout": model_case(CheckpointSequential, XV, YV, reference=PlainCallReference, **CAPTURE),
    "checkpoint_imported_by_name_dropout": model_case(CheckpointByName, XV, YV, reference=PlainCallReference,
                                                      **CAPTURE),
    # ReLU-heavy models at untuned rates
    "relu_mlp5_sgd_nesterov_2": model_case(relu_mlp, XV, YV, opt=optim("SGD", 2.0, momentum=0.9, nesterov=True)),
    "relu_mlp5_adamw_amsgrad_0_3": model_case(relu_mlp, XV, YV, opt=optim("AdamW", 0.3, amsgrad=True)),
    "relu_cnn_maxpool_sgd_5": model_case(relu_cnn, XI, YI, opt=optim("SGD", 5.0)),
    "relu_cnn_maxpool_adam_0_1": model_case(relu_cnn, XI, YI, opt=optim("Adam", 0.1)),
    # losses from torch.distributions
    "low_rank_multivariate_normal": loss_case("real", low_rank_mvn_nll, outputs(9)),
    "independent_normal": loss_case("real", independent_normal_nll, outputs(6)),
    "tanh_transformed_normal": loss_case(targets("scalar", lambda y: 0.9 * torch.tanh(y)), tanh_normal_nll,
                                         outputs(2)),
    "multivariate_normal_lower_cholesky": loss_case_on_panels("real", cholesky_mvn_nll, outputs(12), 64),
    "gamma": loss_case(targets("scalar", torch.exp), gamma_nll, outputs(2)),
    "von_mises": loss_case(targets("scalar", lambda y: math.pi * torch.tanh(y)), von_mises_nll, outputs(2)),
    "continuous_bernoulli": loss_case(targets("real", torch.sigmoid), continuous_bernoulli_nll),
    "kumaraswamy": loss_case(targets("scalar", torch.sigmoid), kumaraswamy_nll, outputs(2)),
    "laplace": loss_case("real", laplace_nll, outputs(6)),
    "relaxed_one_hot_categorical": loss_case(simplex, relaxed_one_hot_nll),
}
