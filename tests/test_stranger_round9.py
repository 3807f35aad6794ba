"""Ninth round of models, layers and losses nobody tuned for (tests/_round9_cases.py), the exact ones: float64, each
within the bounds (replica <= 1e-6 against the trained model in evaluation mode, residual share <= 1e-9 with no
warning, the slow reference's own residual <= 1e-10, ``keep=("train",)`` scores within 1e-9 of it, or within 3x its
own quadrature error where its panels cannot resolve kinks computed inside ``forward``):

* graph networks by hand: a GCN whose messages are summed with ``Tensor.scatter_add`` (also at Adam lr 0.5) or
  multiplied by a dense normalised adjacency, GraphSAGE's mean aggregator (``scatter_reduce("mean")``), a GAT
  layer with a segment softmax (``scatter_reduce("amax", include_self=False)``, ``exp``, out-of-place
  ``index_add``); a Kolmogorov-Arnold network of cubic B-splines (Cox-de Boor from comparisons);
* sequences: a Mamba-style selective scan (``cumsum``, ``exp`` of the lower triangle, ``masked_fill(-inf)``; also at
  Adam lr 1),
  ``nn.RNNCell(nonlinearity="relu")`` unrolled by hand, ``torch.logcumsumexp``;
* spectral and convolutional: a 2-D Fourier neural operator (``rfft2``, complex weights from ``torch.complex``,
  the spectrum padded by ``F.pad``, ``irfft2(s=...)``), ``F.unfold`` with a matrix product and ``F.fold`` (also at
  SGD lr 5),
  ``nn.CircularPad2d``/``ReplicationPad2d``/``ReflectionPad2d`` with ReLUs (also at SGD lr 3),
  ``ConvTranspose2d(groups=2, dilation=2, output_padding=1)``, ``torch.stft``/``istft`` with a learned complex gain;
* linear algebra: ``torch.linalg.qr``, ``eigvalsh`` and ``svdvals``, ``cholesky`` with ``cholesky_solve``,
  ``lstsq``, ``pinv``, ``torch.kron``;
* transforms inside ``forward``: ``torch.func.vmap`` of ``functional_call`` over stacked ensemble weights
  (``stack_module_state``), an input gradient by ``torch.func.grad``, input Jacobians by ``torch.func.jacrev``;
* value-dependent code: ``torch.where`` with the double-where guard on ``sqrt``, ``atan2``/``hypot`` polar features
  where no pair crosses the branch cut, stick-breaking weights by ``cumprod`` at Adam lr 0.3,
  ``Tensor.masked_scatter`` of a learned mask token, PACT's ``clamp`` with a learned tensor ``max``,
  ``Tensor.renorm`` of a weight with ``F.pairwise_distance`` logits, ``torch.linalg.vector_norm`` of ReLU units
  explained where they are all 0;
* losses: the evidential (``digamma``) loss, ``Dirichlet``, ``Beta``, ``StudentT`` (learned degrees of freedom) and
  ``MixtureSameFamily`` log-likelihoods, ``poisson_nll_loss(log_input=False, full=True)``, ``gaussian_nll_loss(full=
  True)`` with one variance per sample, ``ctc_loss(zero_infinity=True)`` with an impossible target;
* against the reference that replays the recorded buffers: ``BatchNorm1d(momentum=None)`` (a cumulative average).

The loud cases are in tests/test_stranger_round9_more.py; the table is tests/stranger_round9_table.py.
"""

from __future__ import annotations

import pytest
from _round8_kit import assert_buffers_exact, assert_exact
from _round9_cases import CASES

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = [
    "gcn_scatter_add_degree_norm", "gcn_scatter_add_adam_0_5", "gcn_dense_adjacency", "graphsage_scatter_reduce_mean",
    "gat_segment_softmax_amax_index_add", "kan_cubic_bsplines",
    "selective_scan_cumsum_exp", "selective_scan_adam_1", "rnncell_relu_unrolled", "logcumsumexp_over_time",
    "fno2d_rfft2_irfft2_padded", "unfold_matmul_fold", "unfold_matmul_fold_sgd_5",
    "circular_replication_reflection_pads", "circular_replication_reflection_pads_sgd_3",
    "conv_transpose_groups_dilation_output_padding", "stft_complex_gain_istft", "linalg_qr_projection",
    "eigvalsh_svdvals_pooling", "cholesky_kernel_head", "lstsq_head", "pinv_head", "kron_factored_linear",
    "vmap_functional_call_ensemble", "energy_gradient_torch_func_grad", "jacobian_features_torch_func_jacrev",
    "where_unused_branch_double_where",
    "atan2_hypot_polar", "stick_breaking_cumprod", "masked_scatter_mask_token", "pact_clamp_learned_tensor_max",
    "renorm_weight_pairwise_distance", "vector_norm_of_a_zero_vector",
    # losses
    "evidential_digamma", "dirichlet_log_prob_lgamma", "beta_log_prob", "student_t_learned_df", "mixture_same_family",
    "poisson_nll_rates_full", "gaussian_nll_full_shared_variance", "ctc_zero_infinity",
]


@pytest.mark.parametrize("case", EXACT)
def test_exact(case):
    assert_exact(CASES[case]())


def test_cumulative_batch_norm_is_exact_against_the_recorded_buffers():
    """``BatchNorm1d(momentum=None)``: its factor ``1 / num_batches_tracked`` reads a buffer the forward counts up."""
    assert_buffers_exact(CASES["batchnorm_momentum_none_cumulative"]())
