"""Eleventh round of models, layers and losses nobody tuned for (tests/_round11_cases.py), the exact ones: float64, each
within the bounds (replica <= 1e-6 against the trained model in evaluation mode, residual share <= 1e-9 with no
warning, the slow reference's own residual <= 1e-10, ``keep=("train",)`` scores within 1e-9 of it, or within 3x its
own quadrature error where its panels cannot resolve the path; batch norm against the reference that replays the
recorded buffers, the scores held to 1e-9):

* training forwards that are not the explained function: a straight-through ``argmax`` one-hot in training with the
  softmax in evaluation, ``F.gumbel_softmax(hard=False)``, a route drawn by ``torch.multinomial``, noise from
  ``torch.normal`` and ``Tensor.exponential_``, stochastic binary units by ``torch.bernoulli`` under a straight-through
  estimator (all with ``capture_random=True``);
* pruning by ``prune.ln_structured`` and ``prune.random_unstructured`` before training, and ``prune.remove`` on a deep
  copy after it; ``nn.SyncBatchNorm`` in one CPU process; ``F.batch_norm`` on the module's own buffers with
  ``capture_random=True``; a shape-changing parametrization (``unsafe=True``) with ``right_inverse``;
* ``ConvTranspose1d``, ``LPPool1d``, ``AdaptiveMaxPool1d``, ``F.channel_shuffle``; ``ConvTranspose3d``, ``MaxPool3d``,
  trilinear ``F.interpolate``, ``AdaptiveAvgPool3d``, ``Softmax2d``; bicubic ``F.interpolate(antialias=True)`` with
  ``F.pixel_shuffle``/``pixel_unshuffle``; ``LSTM(proj_size=2)`` on packed sequences whose lengths come from each
  input's own padding (the fix of the loud lengths from batch positions);
* ``torch.special`` (``i0``, ``i1``, ``i1e``, ``erfcx``, ``log_ndtr``, ``ndtri``, ``polygamma``, ``multigammaln``,
  ``entr``, ``digamma`` of a parameter), ``torch.linalg`` (``matrix_exp``, ``inv``, ``solve_triangular``,
  ``lu_factor``/``lu_solve``, the nuclear norm, ``multi_dot`` under ``vmap``, ``vecdot``, ``householder_product``,
  ``tensordot``), ``logaddexp``, ``cummin``, ``ldexp``, ``quantile``, ``nanmedian``, ``trapezoid``,
  ``cumulative_trapezoid``, ``torch.cdist(p=inf)``, Bessel functions by quadrature (the fix of the loud
  ``bessel_j0``);
* losses as modules: ``nn.L1Loss``, ``nn.MultiLabelSoftMarginLoss(weight=...)``, ``nn.GaussianNLLLoss(full=True)``;
  an L2 penalty as ``weight_decay`` and mixup pairs made before recording (the fixes the loud cases' messages name);
  mixup written inside the model's training forward (a roll over the batch) with ``capture_random=True``: each
  sample's atom is the gradient of its own loss term through the mixed batch, as with batch norm;
* a forward hook on every module of the process (``register_module_forward_hook``) kept while explaining;
* ReLU models at untuned rates: dropout at SGD 3 with momentum 0.9, a 5-layer MLP at RMSprop 0.5, Adagrad 1,
  Adamax 1 and NAdam 0.5.

The loud cases are in tests/test_stranger_round11_more.py; the table is tests/stranger_round11_table.py.
"""

from __future__ import annotations

import pytest
from _round8_kit import assert_buffers_exact, assert_exact
from _round11_cases import CASES

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = [
    "straight_through_argmax_soft_in_eval", "gumbel_softmax_soft_tau_0_5", "multinomial_route_in_training",
    "torch_normal_and_exponential_noise", "prune_ln_structured_and_random_unstructured",
    "parametrize_unsafe_factorised_right_inverse", "conv_transpose1d_lppool1d_adaptive_max1d_channel_shuffle",
    "conv_transpose3d_maxpool3d_trilinear_softmax2d", "bicubic_antialias_pixel_shuffle_unshuffle",
    "special_bessel_i_erfcx_ndtri_polygamma_digamma", "linalg_matrix_exp_inv_lu_nuclear_householder",
    "logaddexp_cummin_quantile_trapezoid", "cdist_p_inf_prototypes", "bessel_by_quadrature_fix",
    "l1_loss_module", "multilabel_soft_margin_loss_weighted", "gaussian_nll_loss_module_full_eps",
    "l2_penalty_as_weight_decay", "mixup_pairs_made_before_recording", "relu_dropout_mlp_sgd_3_momentum",
    "relu_mlp5_rmsprop_0_5", "relu_mlp5_adagrad_1", "packed_lengths_from_the_padding", "mixup_inside_forward_captured",
    "global_module_forward_hook", "bernoulli_binary_units_straight_through", "relu_mlp5_adamax_1",
    "relu_mlp5_nadam_0_5",
]


@pytest.mark.parametrize("case", EXACT)
def test_exact(case):
    assert_exact(CASES[case]())


@pytest.mark.parametrize("case", ["sync_batchnorm_one_process_cpu", "functional_batch_norm_captured"])
def test_batch_norm_exact_against_the_recorded_buffers(case):
    assert_buffers_exact(CASES[case]())


def test_prune_remove_on_a_copy_is_exact_and_the_copy_computes_the_same():
    """The fix the two ``prune.remove`` refusals name: the recorded model explained as it is, the permanent pruning
    done on a deep copy, whose outputs equal the recorded model's."""
    got = CASES["prune_remove_on_a_copy"]()
    assert_exact(got)
    assert got["copy"] <= 1e-14, got
