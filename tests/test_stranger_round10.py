"""Tenth round of models, layers and losses nobody tuned for (tests/_round10_cases.py), the exact ones: float64, each
within the bounds (replica <= 1e-6 against the trained model in evaluation mode, residual share <= 1e-9 with no
warning, the slow reference's own residual <= 1e-10, ``keep=("train",)`` scores within 1e-9 of it, or within 3x its
own quadrature error where its panels cannot resolve the path):

* attention and sequences: rotary embeddings as complex numbers (``view_as_complex`` times ``torch.polar`` factors
  held as a real ``(..., 2)`` buffer), ``F.scaled_dot_product_attention`` with a boolean mask, ``dropout_p=0.2`` and
  ``scale=0.3`` (``capture_random=True``), a Set Transformer's pooling by attention with a DeepSets sum, Perceiver
  cross attention (``kdim``/``vdim``) from learned latents, a causal TCN (``F.pad`` on the left, dilated ``Conv1d``),
  sliding windows by ``Tensor.unfold`` and by ``Tensor.as_strided``;
* forwards users write: ``torch.einsum`` with an ellipsis, methods under ``@torch.jit.ignore``/``@torch.jit.unused``,
  a parameter hook that only reads gradients (registered in ``__init__``), a hypernetwork's per-sample kernels by one
  grouped ``F.conv2d`` (``groups=n``), a sparsemax head by hand (sort, ``cumsum``, ``clamp``), FiLM conditioning,
  ``nn.Unflatten`` into ``Conv2d``, ``checkpoint_sequential`` over a block with dropout and ``checkpoint`` imported
  by name (``use_reentrant=False``, ``capture_random=True``; the reference with the checkpointing switched off), a
  functional hypernetwork (``vmap`` of ``functional_call`` of a target layer with generated weights), a forward
  pre-hook ``with_kwargs=True, prepend=True`` that standardises a layer's input; units written into a buffer by the
  out-of-place ``Tensor.scatter`` or by ``F.pad`` (the fixes of the in-place writes refused in the loud file); a
  method under ``@torch.compiler.disable`` and a parametrized weight read twice under ``parametrize.cached()``
  inside ``forward``;
* torch's attention modules with every option: ``nn.MultiheadAttention(add_bias_kv, add_zero_attn, kdim, vdim)``
  with a ``key_padding_mask`` and per-head weights read downstream, ``nn.Transformer`` with a causal ``tgt_mask`` and
  all three key padding masks, dropout 0.1 (reference on 16 panels);
* spatial transformers resampling by ``F.grid_sample(padding_mode="reflection", align_corners=False)``, bicubic
  (the reference split at the pixel lattice and the reflection borders) and nearest (the localisation net gets no
  gradient through it and never moves);
* linear algebra and functions: ``torch.linalg.det`` and ``matrix_power``, ``eigh`` eigenvectors (squared),
  ``torch.func.hessian`` inside ``forward``, index and shape operations (``diff``, ``take_along_dim``,
  ``index_select``, ``tensor_split``, ``block_diag``, ``cartesian_prod``), ``var_mean`` and ``std`` normalisation,
  ``torch.special`` (``erfinv``, ``xlogy``, ``i0e``, ``sinc``, ``logit(eps=)``);
* ReLU-heavy models at untuned rates: a 5-hidden-layer ReLU MLP at SGD 2 with Nesterov momentum 0.9 and at AdamW 0.3
  with ``amsgrad``, a ReLU CNN with max pooling at Adam 0.1;
* losses from ``torch.distributions``: ``LowRankMultivariateNormal``, ``Independent(Normal)``, a tanh-squashed
  ``TransformedDistribution``, ``MultivariateNormal`` with ``scale_tril`` from ``transform_to(lower_cholesky)``
  (reference on 64 panels), ``Gamma``, ``VonMises``, ``ContinuousBernoulli``, ``Kumaraswamy``, ``Laplace``,
  ``RelaxedOneHotCategorical``.

The loud cases are in tests/test_stranger_round10_more.py; the table is tests/stranger_round10_table.py.
"""

from __future__ import annotations

import pytest
from _round8_kit import assert_exact
from _round10_cases import CASES

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = [
    "rotary_view_as_complex_polar", "sdpa_bool_mask_dropout_scale", "set_transformer_pma_deepsets",
    "perceiver_cross_attention_kdim_vdim", "tcn_causal_pad_dilated_conv1d", "tensor_unfold_windows",
    "as_strided_windows", "einsum_ellipsis", "jit_ignore_and_unused_methods", "parameter_hook_reads_in_init",
    "hypernetwork_grouped_conv_per_sample", "sparsemax_sort_cumsum", "film_conditioning", "unflatten_conv_flatten",
    "checkpoint_sequential_dropout", "checkpoint_imported_by_name_dropout", "spatial_transformer_bicubic_reflection",
    "spatial_transformer_nearest_reflection",
    "mha_bias_kv_zero_attn_kdim_vdim_padding", "transformer_all_four_masks_dropout",
    "functional_hypernetwork_vmap_functional_call", "scatter_out_of_place", "f_pad_out_of_place",
    "forward_pre_hook_with_kwargs_standardises", "compiler_disable_and_parametrize_cached_in_forward",
    "linalg_det_matrix_power", "eigh_eigenvectors_squared",
    "hessian_features_torch_func", "index_and_shape_ops", "var_mean_std_normalisation", "torch_special_functions",
    "relu_mlp5_sgd_nesterov_2", "relu_mlp5_adamw_amsgrad_0_3", "relu_cnn_maxpool_adam_0_1",
    # losses
    "low_rank_multivariate_normal", "independent_normal", "tanh_transformed_normal",
    "multivariate_normal_lower_cholesky", "gamma", "von_mises", "continuous_bernoulli", "kumaraswamy", "laplace",
    "relaxed_one_hot_categorical",
]


@pytest.mark.parametrize("case", EXACT)
def test_exact(case):
    assert_exact(CASES[case]())
