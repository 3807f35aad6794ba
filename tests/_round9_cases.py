"""Losses, loops and cases of the ninth round (tests/test_stranger_round9.py, tests/stranger_round9_table.py).

Every case trains as tests/_round5_kit.py does (float64, SGD 0.5 unless the case names another optimizer or rate, 3
steps of 4 of 12 samples, 2 held-out inputs) and is measured by tests/_round6_kit.py's :func:`figures`. :data:`CASES`
maps each case's name to a function that trains it and returns its figures, or raises the error a user sees. The
models are in tests/_round9_models.py and tests/_round9_functions.py; ``model_case`` is the seventh round's,
``loss_case`` the eighth's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round5_kit import XI, XS, XT, XV, YI, YS, YT, YV, KinkReference, fit, head
from _round7_cases import model_case
from _round7_kit import figures
from _round7_models import XA, YA
from _round8_cases import loss_case
from _round9_functions import (
    DataNormalised,
    EnergyGradient,
    GradientReversal,
    HookReversal,
    JacobianFeatures,
    QuantizedSTE,
    RetainsGrad,
    dann_loss,
)
from _round9_graphs import AdjacencyGCN, GATSegmentSoftmax, GCNScatterAdd, SageMean
from _round9_models import (
    KAN,
    PACT,
    BucketizeEmbedding,
    CholeskyKernelHead,
    ComplexLogits,
    CondBranch,
    CumulativeBatchNorm,
    FNO2d,
    GlobalTemperature,
    GroupedDilatedTranspose,
    KronLinear,
    LengthFeature,
    LogCumSumExp,
    LstsqHead,
    MaskTokens,
    NumpyRoundTrip,
    Pads,
    PinvHead,
    PolarFeatures,
    QRProjection,
    RenormPrototypes,
    RNNCellLoop,
    SelectiveScan,
    SpectralPool,
    SpectrogramFilter,
    StickBreaking,
    UnfoldFold,
    VmapEnsemble,
    WhereUnusedNaN,
    all_off,
    double_temperature,
)
from replay_reference import BufferReference, ForwardJacobianReference
from torch import Tensor, distributions

#: ``XV`` with a class and a domain per sample (the domain: the sign of the first feature).
YD = torch.stack([YV, (XV[:, 0] > 0).long()], 1)


def adam(lr: float) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr)


def sgd(lr: float) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr)


def evidential(out: Tensor, y: Tensor) -> Tensor:
    """The evidential classification loss (Sensoy et al. 2018), its digamma form: Dirichlet ``alpha = softplus + 1``,
    ``sum_c y_c (digamma(S) - digamma(alpha_c))``."""
    alpha = F.softplus(out) + 1
    onehot = F.one_hot(y, out.shape[1]).to(out.dtype)
    return (onehot * (torch.digamma(alpha.sum(1, keepdim=True)) - torch.digamma(alpha))).sum(1).mean()


def dirichlet_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-Dirichlet(softplus(out) + 1).log_prob`` of the smoothed one-hot label (``lgamma`` inside)."""
    target = F.one_hot(y, out.shape[1]).to(out.dtype) * 0.8 + 0.2 / out.shape[1]
    return -distributions.Dirichlet(F.softplus(out) + 1).log_prob(target).mean()


def beta_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-Beta(a, b).log_prob(sigmoid(y))`` with ``a, b = softplus(out[:, :2]) + 0.5`` (a regression into (0, 1))."""
    a, b = (F.softplus(out[:, :2]) + 0.5).unbind(1)
    return -distributions.Beta(a, b).log_prob(torch.sigmoid(y)).mean()


def student_t_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-StudentT(df, loc, scale).log_prob(y)`` with a learned degree of freedom per sample."""
    df, scale = F.softplus(out[:, 0]) + 1, F.softplus(out[:, 2]) + 0.1
    return -distributions.StudentT(df, out[:, 1], scale).log_prob(y).mean()


def mixture_nll(out: Tensor, y: Tensor) -> Tensor:
    """``-MixtureSameFamily(Categorical(logits), Normal(loc, scale)).log_prob(y)``, two components from 6 outputs."""
    mix = distributions.MixtureSameFamily(distributions.Categorical(logits=out[:, :2]),
                                          distributions.Normal(out[:, 2:4], F.softplus(out[:, 4:6]) + 0.1))
    return -mix.log_prob(y).mean()


def magnitude_ce(out: Tensor, y: Tensor) -> Tensor:
    """Cross entropy of the magnitudes of complex logits."""
    return F.cross_entropy(out.abs(), y)


def poisson_rate_full(out: Tensor, y: Tensor) -> Tensor:
    """``nn.PoissonNLLLoss(log_input=False, full=True)`` on rates ``softplus(out)`` (Stirling's term where y > 1)."""
    return F.poisson_nll_loss(F.softplus(out), y, log_input=False, full=True)


def gaussian_full_shared_var(out: Tensor, y: Tensor) -> Tensor:
    """``nn.GaussianNLLLoss(full=True)`` with one variance per sample (an ``(n, 1)`` column broadcast over 3
    targets)."""
    return F.gaussian_nll_loss(out[:, :3], y, F.softplus(out[:, 3:]) + 1e-3, full=True)


def ctc_zero_infinity(out: Tensor, y: Tensor) -> Tensor:
    """``nn.CTCLoss(zero_infinity=True)``: 6 frames, targets of 2 to 4 labels whose repeats need blanks; a target of
    4 equal labels needs 7 frames, so its loss is infinite and zeroed."""
    logp = F.log_softmax(out, -1).transpose(0, 1)
    lengths = (y > 0).sum(1)
    return F.ctc_loss(logp, y, torch.full((len(y),), out.shape[1], dtype=torch.long), lengths, zero_infinity=True)


def ctc_targets() -> tuple[Tensor, Tensor]:
    """``XS`` with CTC targets padded by 0 (the blank): 2 to 4 labels, sample 3 impossible (``[1, 1, 1, 1]``)."""
    gen = torch.Generator().manual_seed(5)
    y = torch.randint(1, 4, (len(XS), 4), generator=gen)
    y[::2, 2:] = 0
    y[1::4, 3] = 0
    y[3] = 1
    return XS, y


class FrameHead(torch.nn.Module):
    """Per-frame logits over 4 classes (class 0 the blank) from ``XS`` frames by a GRU-free tanh MLP."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 6), torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def outputs(n: int) -> Callable[[], torch.nn.Module]:
    return lambda: head(out=n)


def all_off_case(vector_norm: bool) -> Callable[[], dict[str, Any]]:
    """:class:`LengthFeature` explained at :func:`all_off` inputs, where its two ReLU units are 0."""
    def run() -> dict[str, Any]:
        model, traj = fit(lambda: LengthFeature(vector_norm), XV, YV)
        return figures(model, traj, all_off(model))
    return run


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # graph neural nets by hand
    "gcn_scatter_add_degree_norm": model_case(GCNScatterAdd, XS, YS),
    "gcn_scatter_add_adam_0_5": model_case(GCNScatterAdd, XS, YS, opt=adam(0.5)),
    "gcn_dense_adjacency": model_case(AdjacencyGCN, XS, YS),
    "graphsage_scatter_reduce_mean": model_case(SageMean, XS, YS),
    "gcn_sparse_adjacency_sparse_mm": model_case(lambda: AdjacencyGCN(sparse=True), XS, YS),
    "gat_segment_softmax_amax_index_add_inplace": model_case(GATSegmentSoftmax, XS, YS),
    "gat_segment_softmax_amax_index_add": model_case(lambda: GATSegmentSoftmax(inplace=False), XS, YS, panels=8),
    # sequence models
    "selective_scan_cumsum_exp": model_case(SelectiveScan, XS, YS),
    "selective_scan_adam_1": model_case(SelectiveScan, XS, YS, panels=8, opt=adam(1.0)),
    "rnncell_relu_unrolled": model_case(RNNCellLoop, XS, YS, reference=KinkReference),
    "logcumsumexp_over_time": model_case(LogCumSumExp, XS, YS),
    "kan_cubic_bsplines": model_case(KAN, XV, YV, panels=16),
    # spectral and convolutional
    "fno2d_rfft2_irfft2_slice_assignment": model_case(FNO2d, XI, YI),
    "fno2d_rfft2_irfft2_padded": model_case(lambda: FNO2d(slices=False), XI, YI),
    "unfold_matmul_fold": model_case(UnfoldFold, XI, YI),
    "unfold_matmul_fold_sgd_5": model_case(UnfoldFold, XI, YI, opt=sgd(5.0)),
    "circular_replication_reflection_pads": model_case(Pads, XI, YI),
    "circular_replication_reflection_pads_sgd_3": model_case(Pads, XI, YI, opt=sgd(3.0)),
    "conv_transpose_groups_dilation_output_padding": model_case(GroupedDilatedTranspose, XI, YI),
    "stft_complex_gain_istft": model_case(SpectrogramFilter, XA, YA),
    # linear algebra
    "linalg_qr_projection": model_case(QRProjection, XV, YV),
    "eigvalsh_svdvals_pooling": model_case(SpectralPool, XS, YS),
    "cholesky_kernel_head": model_case(CholeskyKernelHead, XV, YV),
    "lstsq_head": model_case(LstsqHead, XV, YV),
    "pinv_head": model_case(PinvHead, XV, YV),
    "kron_factored_linear": model_case(KronLinear, XV, YV),
    # functional transforms and custom gradients inside forward
    "vmap_functional_call_ensemble": model_case(VmapEnsemble, XV, YV),
    "energy_gradient_torch_func_grad": model_case(EnergyGradient, XV, YV),
    "energy_gradient_autograd_grad": model_case(lambda: EnergyGradient(autograd=True), XV, YV),
    "gradient_reversal_dann": model_case(GradientReversal, XV, YD, loss=dann_loss,
                                         reference=ForwardJacobianReference),
    "gradient_reversal_by_tensor_hook": model_case(HookReversal, XV, YD, loss=dann_loss,
                                                   reference=ForwardJacobianReference),
    "jacobian_features_torch_func_jacrev": model_case(JacobianFeatures, XV, YV),
    "jacobian_features_autograd_functional": model_case(lambda: JacobianFeatures(autograd=True), XV, YV),
    "torch_cond_learned_gate": model_case(CondBranch, XV, YV),
    "weight_data_in_forward": model_case(DataNormalised, XV, YV),
    "numpy_round_trip_in_forward": model_case(NumpyRoundTrip, XV, YV),
    "retain_grad_in_forward": model_case(RetainsGrad, XV, YV),
    "complex_outputs": model_case(ComplexLogits, XV, YV, loss=magnitude_ce),
    "batchnorm_momentum_none_cumulative": model_case(CumulativeBatchNorm, XV, YV, reference=BufferReference),
    "gradient_reversal_jvp_mirrors_backward": model_case(lambda: GradientReversal(mirrored=True), XV, YD,
                                                         loss=dann_loss),
    "straight_through_round_function": model_case(QuantizedSTE, XV, YV),
    # value-dependent code
    "where_unused_branch_nan": model_case(WhereUnusedNaN, XV, YV),
    "where_unused_branch_double_where": model_case(lambda: WhereUnusedNaN(safe=True), XV, YV,
                                                   reference=KinkReference),
    "bucketize_embedding": model_case(BucketizeEmbedding, XV, YV),
    "atan2_hypot_polar": model_case(PolarFeatures, XV, YV),
    "atan2_hypot_polar_sgd_5": model_case(PolarFeatures, XV, YV, opt=sgd(5.0)),
    "stick_breaking_cumprod": model_case(StickBreaking, XV, YV, opt=adam(0.3)),
    "pact_clamp_learned_tensor_max": model_case(PACT, XV, YV, reference=KinkReference),
    "hand_written_norm_of_a_zero_vector": all_off_case(False),
    "module_level_global_temperature": model_case(GlobalTemperature, XV, YV, after=double_temperature),
    "vector_norm_of_a_zero_vector": all_off_case(True),
    "renorm_weight_pairwise_distance": model_case(RenormPrototypes, XV, YV, reference=KinkReference),
    "masked_scatter_mask_token": model_case(MaskTokens, XT, YT),
    # losses
    "evidential_digamma": loss_case("classes", evidential),
    "dirichlet_log_prob_lgamma": loss_case("classes", dirichlet_nll),
    "beta_log_prob": loss_case("scalar", beta_nll, outputs(2)),
    "student_t_learned_df": loss_case("scalar", student_t_nll),
    "mixture_same_family": loss_case("scalar", mixture_nll, outputs(6)),
    "poisson_nll_rates_full": loss_case("counts", poisson_rate_full),
    "gaussian_nll_full_shared_variance": loss_case("real", gaussian_full_shared_var, outputs(4)),
    "ctc_zero_infinity": loss_case(ctc_targets, ctc_zero_infinity, FrameHead),
}
